"""Pause and rolling updates on a real commune (issue 18, "Updates and pause"): three
meshlets, each meshletd on its own booted systemd host, one module-scoped commune.

- `meshletctl pause` stops a workload's replicas and keeps their slots; `resume` starts
  them again on the same meshlets (docs/protocol.md, section 10);
- `meshletctl update NAME --image ...` rolls the replicas to the new version one slot at
  a time, make-before-break (the container of one slot changes, then the other's; never
  both down), and a version that cannot start is rolled back with the reason shown
  (docs/protocol.md, section 25).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.commune import Commune, Meshlet, booted, wait_for, wait_formed
from tests.system.hostenv import host_kind
from tests.system.test_commune_e2e import agreed_placement, find, publish

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
)

TICKER = ["sh", "-c", 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 1; done']
PLACED_S = 45  # bid window + settle + image check + unit start, on 2 busy cores


@pytest.fixture(scope="module")
def commune(devnet: Any) -> Iterator[Commune]:
    with booted(devnet) as c:
        yield c


@pytest.fixture(scope="module")
def formed(commune: Commune) -> None:
    wait_formed(commune, 60)


def containers(commune: Commune, uri: str) -> dict[str, list[tuple[str, str]]]:
    """person -> [(container name, container id)] of the workload's running containers."""
    return {
        p: sorted((name, cid) for name, cid, _ in rows)
        for p, rows in running_containers(commune, uri).items()
    }


def running_containers(commune: Commune, uri: str) -> dict[str, list[tuple[str, str, str]]]:
    """person -> [(container name, container id, image)] of the workload's containers."""
    rkey = uri.rsplit("/", 1)[1]
    out: dict[str, list[tuple[str, str, str]]] = {}
    for m in commune:
        done = m.host.run(
            "podman", "ps", "--format", "{{.Names}} {{.ID}} {{.Image}}", user="meshlet"
        )
        rows = [line.split() for line in done.stdout.splitlines() if rkey in line]
        out[m.person] = sorted((r[0], r[1], r[2]) for r in rows if len(r) == 3)
    return out


def slot_of(container: str) -> int:
    """The slot of a replica's container name (`meshlet-<h>-<w>-<slot>[.<lane>]-<tag>`)."""
    return int(container.rsplit("-", 2)[1].split(".")[0])


def placed_units(commune: Commune, uri: str) -> dict[str, list[str]]:
    rkey = uri.rsplit("/", 1)[1]
    return {m.person: [u for u in m.replica_units() if rkey in u] for m in commune}


def slot_states(m: Meshlet, name: str) -> dict[int, tuple[str, str]]:
    view = find(m, name) or {}
    return {
        int(r["slot"]): (r.get("meshletDid", ""), r.get("state", ""))
        for r in view.get("running", [])
        if r.get("meshletDid")
    }


def test_a_paused_workload_stops_its_replicas_keeps_its_slots_and_resumes_where_it_was(
    commune: Commune, formed: None
) -> None:
    alice = commune["alice"]
    uri = publish(
        alice, TICKER, "--name", "sleeper", "--replicas", "2", "--cpu", "100", "--memory", "32"
    )
    before = wait_for(
        lambda: agreed_placement(commune, "sleeper", 2), PLACED_S, "sleeper placed and running"
    )
    first = containers(commune, uri)
    assert sum(len(v) for v in first.values()) == 2, first

    done = alice.ctl("pause", "sleeper")
    assert done.returncode == 0, done.stdout + done.stderr

    def all_paused() -> dict[int, tuple[str, str]] | None:
        for m in commune:
            got = slot_states(m, "sleeper")
            if sorted(got) != [0, 1] or any(st != "paused" for _, st in got.values()):
                return None
        return slot_states(alice, "sleeper")

    paused = wait_for(all_paused, 60, "every meshlet to report both slots paused")
    # the slots stay where they were
    assert {s: d for s, (d, _) in paused.items()} == before
    # nothing of it runs anywhere: no unit, no container
    wait_for(lambda: not any(placed_units(commune, uri).values()), 30, "the replica units to stop")
    assert not any(containers(commune, uri).values())
    # and it stays so (no failover of a paused slot: liveness watches meshlets)
    time.sleep(8)
    assert all_paused() is not None
    assert not any(placed_units(commune, uri).values())

    done = alice.ctl("resume", "sleeper")
    assert done.returncode == 0, done.stdout + done.stderr
    after = wait_for(
        lambda: agreed_placement(commune, "sleeper", 2), PLACED_S, "sleeper running again"
    )
    assert after == before  # the same meshlets
    again = containers(commune, uri)
    assert sum(len(v) for v in again.values()) == 2, again
    for person, rows in again.items():
        # started anew on the same machine: same container names, new containers
        assert [n for n, _ in rows] == [n for n, _ in first[person]]
        assert not set(rows) & set(first[person])
    alice.ctl("stop", "sleeper")


# -- rolling updates ----------------------------------------------------------------------

V1 = "localhost/busybox:latest"
V2 = "localhost/busybox:v2"  # the same bits under another name: a new spec version
MISSING = "localhost/busybox:does-not-exist"  # a version that cannot start (no such image)


@pytest.fixture(scope="module")
def roller(commune: Commune, formed: None) -> dict[str, Any]:
    """alice's 2-replica service at V1, running, with V2 tagged on every host."""
    for m in commune:
        m.host.run("podman", "tag", V1, V2, user="meshlet", check=True)
    alice = commune["alice"]
    uri = publish(
        alice, TICKER, "--name", "roller", "--replicas", "2", "--cpu", "100", "--memory", "32"
    )
    placed = wait_for(
        lambda: agreed_placement(commune, "roller", 2), PLACED_S, "roller placed and running"
    )
    return {"uri": uri, "placement": placed}


def by_slot(rows: dict[str, list[tuple[str, str, str]]]) -> dict[int, list[tuple[str, str]]]:
    """slot -> [(container id, image)] running anywhere."""
    out: dict[int, list[tuple[str, str]]] = {}
    for items in rows.values():
        for name, cid, image in items:
            out.setdefault(slot_of(name), []).append((cid, image))
    return out


def rollout_events(commune: Commune, uri: str) -> dict[tuple[str, int], float]:
    """(start, slot): when a slot's new version was started (lane 1); (stop, slot): when
    its old one was stopped for the update — from every meshletd's journal (wall clock)."""
    out: dict[tuple[str, int], float] = {}
    for m in commune:
        lines = m.run(
            "journalctl", "-u", "meshletd.service", "-o", "short-unix", "--no-pager", "-n", "2000"
        ).stdout.splitlines()
        for line in lines:
            if uri not in line:
                continue
            t = float(line.split(" ", 1)[0])
            if "starting replica " in line and "(lane 1)" in line:
                slot = int(line.split("starting replica ", 1)[1].split()[0])
                out["start", slot] = t
            elif "stopping replica " in line and line.endswith("(updated)"):
                slot = int(line.split("stopping replica ", 1)[1].split()[0])
                out["stop", slot] = t
    return out


def versions(m: Meshlet, name: str) -> tuple[str, dict[int, str]]:
    """(the version the record asks for, slot -> the version its owner's status says)."""
    view = find(m, name) or {}
    slots = {
        int(r["slot"]): str(r.get("version", ""))
        for r in view.get("running", [])
        if r.get("meshletDid") and r.get("state") == "running"
    }
    return str(view.get("version", "")), slots


def test_an_update_rolls_the_replicas_one_at_a_time_never_both_down(
    commune: Commune, roller: dict[str, Any]
) -> None:
    alice, uri = commune["alice"], roller["uri"]
    first = by_slot(running_containers(commune, uri))
    assert sorted(first) == [0, 1] and all(len(v) == 1 for v in first.values()), first
    old = {s: v[0][0] for s, v in first.items()}
    done = alice.ctl_json("update", "roller", "--image", V2)
    assert done["version"] != done["previousVersion"] and done.get("cid")

    # Watch the containers until both slots run V2 only: every sample has each slot served.
    timeline: list[dict[int, list[tuple[str, str]]]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = by_slot(running_containers(commune, uri))
        timeline.append(now)
        assert sorted(now) == [0, 1], f"a slot with no running container: {now}"
        if all(len(v) == 1 and v[0][1] == V2 for v in now.values()):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not rolled to {V2} in 120 s; last {timeline[-1]}")
    new = {s: v[0][0] for s, v in timeline[-1].items()}
    assert not set(new.values()) & set(old.values())  # both containers replaced
    # One at a time, make-before-break, from the hosts' own logs (one kernel clock): each
    # slot's old replica stopped after its new one started, and slot 1's new one started
    # only after slot 0's old one had stopped (slot 0 served the new version).
    ev = rollout_events(commune, uri)
    assert ev["stop", 0] > ev["start", 0] and ev["stop", 1] > ev["start", 1], ev
    assert ev["start", 1] > ev["stop", 0], ev
    # (Not from the container samples: `podman ps` lists an old container until it has
    # stopped, and the hosts are asked one after the other, so a sample can show slot 0's
    # stopping container beside slot 1's new one: both slots "with two" though the logs show
    # one at a time. That sample failed a full run of session 5.)
    # the placement did not change, and every meshlet sees both slots at the new version
    assert agreed_placement(commune, "roller", 2) == roller["placement"]
    for m in commune:
        want, _ = wait_for(
            lambda m=m: v if (v := versions(m, "roller"))[1] == {0: v[0], 1: v[0]} else None,
            30,
            f"{m.person} to see both slots at the new version",
        )
        assert want == done["version"]
    roller["v2"] = done["version"]
    roller["containers"] = new


def test_a_meshletd_restart_after_an_update_adopts_the_new_lane_and_touches_nothing(
    commune: Commune, roller: dict[str, Any]
) -> None:
    """The updated replicas run in lane 1 (units `-<slot>.1-`): a restarted meshletd adopts
    them as they are, same containers, same version (DESIGN: restarts touch nothing)."""
    if "containers" not in roller:
        pytest.skip("needs the rolling update above")
    uri = roller["uri"]
    before = by_slot(running_containers(commune, uri))
    host = commune.by_did(roller["placement"][0])
    done = host.run("systemctl", "restart", "meshletd.service", timeout=150)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: host.ctl_json("status")["members"] == 2, 60, "meshletd back")
    time.sleep(10)  # long enough for a wrong decision to show
    assert by_slot(running_containers(commune, uri)) == before
    want = roller["v2"]
    wait_for(
        lambda: versions(host, "roller") == (want, {0: want, 1: want}),
        30,
        "the restarted meshletd to report both slots at the new version",
    )
    assert "adopted replica" in host.journal(lines=200)


def test_a_version_that_cannot_start_is_rolled_back_with_the_reason_shown(
    commune: Commune, roller: dict[str, Any]
) -> None:
    alice, uri = commune["alice"], roller["uri"]
    if "v2" not in roller:
        alice.ctl_json("update", "roller", "--image", V2)
        wait_for(
            lambda: all(
                len(v) == 1 and v[0][1] == V2
                for v in by_slot(running_containers(commune, uri)).values()
            ),
            120,
            "roller at V2",
        )
        roller["v2"] = versions(alice, "roller")[0]
        roller["containers"] = {
            s: v[0][0] for s, v in by_slot(running_containers(commune, uri)).items()
        }
    before = roller["containers"]
    done = alice.ctl_json("update", "roller", "--image", MISSING)
    bad = done["version"]
    assert bad != roller["v2"]

    def rolled_back() -> dict[str, Any] | None:
        view = find(alice, "roller") or {}
        return view if view.get("rollback") and view.get("version") == roller["v2"] else None

    view = wait_for(rolled_back, 120, "alice's meshlet to roll roller back")
    assert bad in view["rollback"] and "could not start" in view["rollback"], view["rollback"]
    # shown by meshletctl workloads, in words
    text = alice.ctl("workloads").stdout
    assert "rolled back" in text and "could not start" in text, text
    # nothing that ran was touched: the same two containers, at V2, on the same meshlets
    time.sleep(3)
    now = by_slot(running_containers(commune, uri))
    assert {s: v for s, v in now.items()} == {s: [(cid, V2)] for s, cid in before.items()}
    assert agreed_placement(commune, "roller", 2) == roller["placement"]
    # every meshlet agrees the record asks for V2 again and both slots run it
    for m in commune:
        wait_for(
            lambda m=m: versions(m, "roller") == (roller["v2"], {0: roller["v2"], 1: roller["v2"]}),
            30,
            f"{m.person} to see roller back at its version",
        )


def xrpc(pds: str, method: str, body: dict[str, Any] | None = None, token: str = "") -> Any:
    """One XRPC call to a PDS (a query when `body` is None)."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{pds}/xrpc/{method}",
        data=None if body is None else json.dumps(body).encode(),
        headers={
            **({"Content-Type": "application/json"} if body is not None else {}),
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.load(r)


def test_a_spec_change_written_by_any_tool_rolls_the_replicas_too(
    commune: Commune, roller: dict[str, Any]
) -> None:
    """The owner rewrites the record with the PDS's own putRecord (not meshletd): a new env
    is a new version, rolled like any update (docs/protocol.md, section 25)."""
    import urllib.parse

    alice, uri = commune["alice"], roller["uri"]
    owner = alice.owner
    before = {s: v[0][0] for s, v in by_slot(running_containers(commune, uri)).items()}
    assert all(len(v) == 1 for v in by_slot(running_containers(commune, uri)).values())
    session = xrpc(
        owner.pds_url,
        "com.atproto.server.createSession",
        {"identifier": owner.did, "password": owner.app_password},
    )
    rkey = uri.rsplit("/", 1)[1]
    q = urllib.parse.urlencode(
        {"repo": owner.did, "collection": "commune.scheduler.workload", "rkey": rkey}
    )
    record = xrpc(owner.pds_url, f"com.atproto.repo.getRecord?{q}")["value"]
    record["env"] = [*record.get("env", []), {"name": "MODE", "value": "b"}]
    xrpc(
        owner.pds_url,
        "com.atproto.repo.putRecord",
        {
            "repo": owner.did,
            "collection": "commune.scheduler.workload",
            "rkey": rkey,
            "record": record,
        },
        token=session["accessJwt"],
    )

    down: list[dict[int, list[tuple[str, str]]]] = []

    def rolled() -> dict[int, list[tuple[str, str]]] | None:
        now = by_slot(running_containers(commune, uri))
        if sorted(now) != [0, 1]:
            down.append(now)
        done = all(len(v) == 1 and v[0][0] != before[s] for s, v in now.items())
        return now if done and sorted(now) == [0, 1] else None

    wait_for(rolled, 120, "both replicas replaced by the new version", every=0.2)
    assert down == [], f"a slot had no running container: {down}"
    want, _ = wait_for(
        lambda: v if (v := versions(alice, "roller"))[1] == {0: v[0], 1: v[0]} else None,
        30,
        "both slots at the record's new version",
    )
    assert want not in (roller.get("v2"), "")
    assert agreed_placement(commune, "roller", 2) == roller["placement"]
