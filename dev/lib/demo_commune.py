"""dev/demo's main job: a local commune on an embedded atproto network running a workload.

Brings up the local atproto network (PLC + two PDSes) and three meshlets, alice's, bob's and
carol's, each meshletd a Type=notify service on its own booted systemd host; alice publishes
a two-replica service; every meshlet computes the same placement; the winners run it as
rootless podman containers in transient units. Prints what happened, then leaves it all
running for `dev/demo down`.

Usage: demo_commune.py STATE_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev" / "lib"))

from devnet import Devnet  # noqa: E402

from tests.system.commune import CTL, HOSTENV_RUN, Commune, Meshlet  # noqa: E402
from tests.system.hostenv import Network  # noqa: E402

HOSTS = ["demo-a", "demo-b", "demo-c"]
HELLO = [
    "sh",
    "-c",
    'i=1; while true; do echo "hello from $(hostname), line $i"; i=$((i+1)); sleep 1; done',
]
RUN = ["--name", "hello", "--replicas", "2", "--cpu", "200m", "--memory", "64Mi"]


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.rstrip().splitlines())


def placement(m: Meshlet) -> dict[int, str] | None:
    """slot -> meshlet DID of `hello` as m sees it, once every slot runs."""
    for w in m.ctl_json("workloads", "--all"):
        if w["name"] != "hello":
            continue
        best: dict[int, dict] = {}
        for r in w.get("running", []):
            s = int(r["slot"])
            if r.get("meshletDid") and (s not in best or r["round"] > best[s]["round"]):
                best[s] = r
        if len(best) == 2 and all(r["state"] == "running" for r in best.values()):
            return {s: r["meshletDid"] for s, r in sorted(best.items())}
    return None


def main(state: Path) -> int:
    t0 = time.monotonic()
    # The demo's hosts and network outlive this process (until `dev/demo down`).
    os.environ["MESHLET_HOSTENV_OWNER"] = "demo"
    gateway = Network.up().gateway
    net = Devnet.up(state / "devnet", host=gateway)
    print(f"  PLC {net.plc_url}; PDS0 {net.pds_urls[0]}; PDS1 {net.pds_urls[1]}")
    say("three meshlets on three booted systemd hosts (meshletd as a Type=notify service)")
    commune = Commune.up(net, HOSTS, tag="demo")
    for name in HOSTS:  # the demo keeps these hosts until `dev/demo down`
        (HOSTENV_RUN / name / "owner").write_text("\n")
    (state / "hosts").write_text("\n".join(HOSTS) + "\n")
    for m in commune:
        print(
            f"  {m.person:<6} host {m.host.name} at {m.address}: meshlet {m.did} "
            f"(owner {m.owner_did})"
        )
    (state / "web").write_text("".join(f"{m.person} {m.web_url}/\n" for m in commune))

    say("the cluster forms: alice's `meshletctl members`")
    deadline = time.monotonic() + 90
    while True:
        rows = commune["alice"].ctl_json("members")
        if sum(1 for r in rows if r["verified"]) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(indent(commune["alice"].ctl("members").stdout))

    say("alice: meshletctl run " + " ".join(RUN) + " localhost/busybox:latest -- sh -c '...'")
    published = time.monotonic()
    uri = commune["alice"].ctl_json("run", *RUN, "localhost/busybox:latest", "--", *HELLO)["uri"]
    print(f"  published {uri}")

    seen: dict[str, dict[int, str] | None] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen = {m.person: placement(m) for m in commune}
        first = seen["alice"]
        if first and all(p == first for p in seen.values()):
            break
        time.sleep(0.5)
    else:
        print(f"  the meshlets did not agree on a running placement in 90 s: {json.dumps(seen)}")
        print(indent(commune["alice"].journal(lines=40)))
        return 1
    agreed = seen["alice"] or {}
    print(
        f"  running {time.monotonic() - published:.1f} s after publishing; "
        "every meshlet reports the same placement:"
    )
    for slot, did in agreed.items():
        print(f"    slot {slot} -> {commune.by_did(did).person}'s meshlet ({did})")
    say("bob's view: `meshletctl workloads --all`")
    print(indent(commune["bob"].ctl("workloads", "--all").stdout))

    time.sleep(3)  # a few lines of output
    for slot, did in agreed.items():
        host = commune.by_did(did)
        units = [u for u in host.replica_units() if uri.rsplit("/", 1)[1] in u]
        for unit in units:
            say(f"on {host.host.name}: journalctl -u {unit}")
            out = host.run("journalctl", "-u", unit, "-o", "cat", "--no-pager", "-n", "3").stdout
            print(indent(out))
        say(f"alice, on her own machine: meshletctl logs hello --slot {slot} -n 3")
        print(indent(commune["alice"].ctl("logs", "hello", "--slot", str(slot), "-n", "3").stdout))

    web = "\n".join(f"  {m.person:<6} {m.web_url}/" for m in commune)
    print(f"""
Everything is up (it took {time.monotonic() - t0:.0f} s). Try, on any host (demo-a is alice's,
demo-b bob's, demo-c carol's):
  dev/hostenv exec demo-b -- {CTL} workloads --all
  dev/hostenv exec demo-a -- {CTL} members
  dev/hostenv exec demo-c -- {CTL} drain --wait     (then: ... undrain)
  dev/hostenv exec demo-a -- {CTL} stop hello
  dev/hostenv shell demo-a    (then journalctl -u 'meshlet-*', systemctl status meshletd)
  dev/devnet status --state {state / "devnet"}    (URLs, DIDs; read any repo with listRecords)
The commune's web page, as each meshlet serves it (read-only; /metrics for Prometheus):
{web}
Stop it all with: dev/demo down""")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
