"""Run INSIDE a systemd host: start or stop a transient unit running a rootless podman container.

    podman_unit.py start UNIT CONTAINER MEMORY_MAX -- ARGS...   (ARGS go to the container)
    podman_unit.py stop UNIT                                     (returns once the unit is gone)

The unit is a system unit with User=meshlet, Delegate=yes (podman keeps conmon and the payload
in the unit's cgroup, so limits and `journalctl -u` apply) and KillMode=mixed (SIGTERM to
podman, which stops the container, before SIGKILL to the rest).
"""

from __future__ import annotations

import pwd
import sys
import time

import pystemd.run  # `from pystemd.run import run` fails: pystemd.run is rebound to the function
import pystemd.systemd1


def start(unit: str, container: str, memory_max: int, args: list[str]) -> None:
    user = pwd.getpwnam("meshlet")
    cmd = ["/usr/bin/podman", "run", "--rm", "--init", "--name", container]
    # One copy of the output in the journal: the attached stdout of the unit, not also
    # conmon's journald log driver.
    cmd += ["--log-driver=none", "localhost/busybox:latest", *args]
    pystemd.run(
        cmd,
        name=unit,
        user="meshlet",
        user_mode=False,
        env={
            "XDG_RUNTIME_DIR": f"/run/user/{user.pw_uid}",
            "HOME": user.pw_dir,
        },
        cwd=user.pw_dir,
        service_type="exec",
        extra={
            b"MemoryMax": memory_max,
            b"Delegate": True,
            b"KillMode": b"mixed",
            b"TimeoutStopUSec": 30_000_000,
            b"CollectMode": b"inactive-or-failed",
        },
    )
    print(unit)


def stop(unit: str) -> None:
    with pystemd.systemd1.Unit(unit.encode()) as u:
        u.Unit.Stop(b"replace")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with pystemd.systemd1.Unit(unit.encode()) as u:
            if u.Unit.LoadState == b"not-found":
                print("gone")
                return
        time.sleep(0.05)
    sys.exit(f"{unit} still loaded 30 s after stop")


if __name__ == "__main__":
    if sys.argv[1] == "start":
        sep = sys.argv.index("--")
        start(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[sep + 1 :])
    elif sys.argv[1] == "stop":
        stop(sys.argv[2])
    else:
        sys.exit(__doc__)
