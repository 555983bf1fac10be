"""Run inside a booted host by dev/chaos (python3 chaos_probe.py): one JSON line with what
the invariant checker needs from that machine — meshletd's main PID, restart count and
state, and each active replica unit (`meshlet-*.service`) with systemd's activation time
and its podman container's id and start time."""

import json
import subprocess

NOT_REPLICAS = ("meshlet-podman-pause.service",)


def show(units, props):
    out = subprocess.run(
        ["systemctl", "show", "-p", ",".join(props), "--", *units],
        capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip
    blocks, cur = [], {}
    for line in out.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        k, _, v = line.partition("=")
        cur[k] = v
    if cur:
        blocks.append(cur)
    return blocks


def main():
    daemon = show(["meshletd.service"], ["MainPID", "NRestarts", "ActiveState"])[0]
    listed = subprocess.run(
        ["systemctl", "list-units", "--plain", "--no-legend", "--state=active", "meshlet-*"],
        capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip
    names = [ln.split()[0] for ln in listed.splitlines() if ln.strip()]
    names = [n for n in names if n.endswith(".service") and n not in NOT_REPLICAS]
    units = []
    if names:
        for b in show(names, ["Id", "ActiveState", "ActiveEnterTimestampMonotonic"]):
            if b.get("ActiveState") == "active":
                units.append({"unit": b["Id"], "since": int(b["ActiveEnterTimestampMonotonic"])})
    containers = {}
    if units:
        ps = subprocess.run(
            ["runuser", "-u", "meshlet", "--", "env", "XDG_RUNTIME_DIR=/run/user/1000",
             "podman", "ps", "--format", "json"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        try:
            for c in json.loads(ps or "[]"):
                for n in c.get("Names") or ():
                    containers[n] = {"id": c.get("Id", ""), "started": c.get("StartedAt", "")}
        except ValueError:
            pass
    for u in units:
        c = containers.get(u["unit"].removesuffix(".service"), {})
        u["container"] = c.get("id", "")
        u["started"] = str(c.get("started", ""))
    print(
        json.dumps(
            {
                "daemon_pid": int(daemon.get("MainPID") or 0),
                "daemon_restarts": int(daemon.get("NRestarts") or 0),
                "daemon_state": daemon.get("ActiveState", ""),
                "units": units,
            }
        )
    )


if __name__ == "__main__":
    main()
