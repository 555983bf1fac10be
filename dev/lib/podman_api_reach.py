"""Inside a booted host: can a process sandboxed like meshletd.service reach podman's API?

Starts `podman system service` as user meshlet (socket /run/meshlet-podman-api/podman.sock),
then connects to it from transient units with meshletd.service's identity and sandbox
(uid root, Group=meshlet, no capabilities; and with ProtectHome=yes for the default socket
under /run/user/1000). Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from podman_service import start_podman_service

SOCK_DIR = Path("/run/meshlet-podman-api")
CONNECT = (
    "import socket,sys; s=socket.socket(socket.AF_UNIX); "
    "s.connect(sys.argv[1]); s.sendall(b'GET /_ping HTTP/1.0\\r\\n\\r\\n'); "
    "print(s.recv(100).split(b'\\r\\n')[0].decode())"
)


def sandboxed(path: str, *extra: str) -> str:
    r = subprocess.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--collect",
            "-q",
            "-p",
            "Group=meshlet",
            "-p",
            "CapabilityBoundingSet=",
            *extra,
            "/usr/bin/python3",
            "-c",
            CONNECT,
            path,
        ],
        capture_output=True,
        text=True,
    )
    return (r.stdout.strip() or r.stderr.strip().splitlines()[-1])[:120]


def main() -> None:
    SOCK_DIR.mkdir(exist_ok=True)
    os.chown(SOCK_DIR, 1000, 1000)
    units = []
    for unit, url in [
        ("meshlet-podman-api-a.service", f"unix://{SOCK_DIR}/podman.sock"),
        ("meshlet-podman-api-b.service", "unix:///run/user/1000/podman/podman.sock"),
    ]:
        start_podman_service(unit, url)
        units.append(unit)
    time.sleep(2)
    a = f"{SOCK_DIR}/podman.sock"
    b = "/run/user/1000/podman/podman.sock"
    out = {
        "socket_a": oct(os.stat(a).st_mode & 0o777) + f" {os.stat(a).st_uid}:{os.stat(a).st_gid}",
        "root_with_capabilities_a": sandboxed(a, "-p", "CapabilityBoundingSet=~"),
        "meshletd_sandbox_a": sandboxed(a),
        "meshletd_sandbox_b_protecthome": sandboxed(b, "-p", "ProtectHome=yes"),
        "meshletd_sandbox_b_no_protecthome": sandboxed(b),
    }
    for unit in units:
        subprocess.run(["systemctl", "stop", unit], capture_output=True)
    print(json.dumps(out))


main()
