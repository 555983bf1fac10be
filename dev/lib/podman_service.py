"""Start podman's API service as user meshlet in a transient unit (for the podman-api
measurements: dev/lib/podman_api_probe.py and podman_api_reach.py, docs/runtime.md)."""

from __future__ import annotations

import subprocess


def start_podman_service(unit: str, url: str) -> None:
    """`podman system service` listening on `url`, in transient system unit `unit`."""
    subprocess.run(
        [
            "systemd-run",
            "--unit",
            unit,
            "-p",
            "User=meshlet",
            "-p",
            "Delegate=yes",
            "-p",
            "Environment=XDG_RUNTIME_DIR=/run/user/1000",
            "-p",
            "WorkingDirectory=~",
            "/usr/bin/podman",
            "system",
            "service",
            "--time=0",
            url,
        ],
        check=True,
        capture_output=True,
    )
