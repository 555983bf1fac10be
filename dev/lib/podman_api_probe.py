"""Run inside a booted host (dev/benches/podman-api): the runtime's helper queries two ways.

1. Today: `SystemdPodmanMachine`, each podman call a transient unit as user meshlet.
2. podman-py (`podman` package) against the REST API of `podman system service`, started as
   one transient unit as user meshlet on a socket under /run/meshlet-podman-api.
Prints one JSON object: medians in ms, the API service's cold start, its RSS.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio
from podman_service import start_podman_service

from meshletd.runtime.systemd import SystemdPodmanMachine
from meshletd.runtime.units import RuntimeConfig

IMAGE = "localhost/busybox:latest"
LABEL = "io.meshlet.replica"
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
SOCK_DIR = Path("/run/meshlet-podman-api")
SOCK = SOCK_DIR / "podman.sock"
UNIT = "meshlet-podman-api-probe.service"


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


async def cli_side() -> dict[str, float]:
    m = SystemdPodmanMachine(RuntimeConfig())
    out: dict[str, list[float]] = {"image_exists": [], "list_containers": [], "inspect_missing": []}
    await m.image_present(IMAGE)  # warm
    for _ in range(RUNS):
        t = time.perf_counter()
        assert await m.image_present(IMAGE)
        out["image_exists"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await m.list_containers(LABEL)
        out["list_containers"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        assert await m.inspect_container("meshlet-no-such-container") is None
        out["inspect_missing"].append((time.perf_counter() - t) * 1000)
    return {k: med(v) for k, v in out.items()}


def api_side() -> dict[str, object]:
    import podman

    SOCK_DIR.mkdir(exist_ok=True)
    os.chown(SOCK_DIR, 1000, 1000)
    subprocess.run(["systemctl", "stop", UNIT], capture_output=True)
    t0 = time.perf_counter()
    start_podman_service(UNIT, f"unix://{SOCK}")
    client = podman.PodmanClient(base_url=f"unix://{SOCK}")
    first = None
    while time.perf_counter() - t0 < 20:
        try:
            if client.images.exists(IMAGE):
                first = (time.perf_counter() - t0) * 1000
                break
        except Exception:
            time.sleep(0.01)
    out: dict[str, list[float]] = {"image_exists": [], "list_containers": [], "inspect_missing": []}
    for _ in range(RUNS):
        t = time.perf_counter()
        assert client.images.exists(IMAGE)
        out["image_exists"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        client.containers.list(all=True, filters={"label": LABEL})
        out["list_containers"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        try:
            client.containers.get("meshlet-no-such-container")
        except podman.errors.NotFound:
            pass
        out["inspect_missing"].append((time.perf_counter() - t) * 1000)
    pid = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", UNIT], capture_output=True, text=True
    ).stdout.strip()
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    mode = oct(SOCK.stat().st_mode & 0o777)
    owner = f"{SOCK.stat().st_uid}:{SOCK.stat().st_gid}"
    subprocess.run(["systemctl", "stop", UNIT], capture_output=True)
    return {
        **{k: med(v) for k, v in out.items()},
        "cold_start_ms": round(first, 1) if first else None,
        "service_rss_mb": round(rss_kib / 1024, 1),
        "socket_mode": mode,
        "socket_owner": owner,
        "podman_py": podman.__version__,
    }


def main() -> None:
    cli = trio.run(cli_side)
    api = api_side()
    print(json.dumps({"cli_transient_unit_ms": cli, "podman_py_api_ms": api, "runs": RUNS}))


main()
