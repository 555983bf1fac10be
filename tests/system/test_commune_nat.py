"""Meshlets behind NAT take part fully (docs/protocol.md section 8, "Meshlets without
inbound reachability"): each host its own network namespace and address, the NATed ones
with no inbound connection at all (dev/hostenv `nat`: input drop, outbound masqueraded).

- carol behind NAT, alice and bob reachable: carol's meshlet publishes no endpoint and
  writes a lease; healthy, it is never suspected and keeps its slot; powered off, its slot
  runs elsewhere within the lease bound.
- every meshlet behind NAT: nobody can probe anybody; a service still runs, and a powered-off
  host's slot still runs elsewhere within the bound.

The lease is renewed every 5 s and valid 12 s here (the defaults are 90 s and 150 s): the
bound is the same formula, V + 3 probe intervals + the replacement round + the start.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.commune import PEOPLE, Commune, Meshlet, booted, wait_for
from tests.system.hostenv import host_kind

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
)

LEASE_RENEW_MS = 4_000
LEASE_VALID_MS = 20_000  # at least R + 15 s (meshletd refuses less: docs/protocol.md, 8)
SCHEDULING = {"lease_renew_ms": LEASE_RENEW_MS, "lease_valid_ms": LEASE_VALID_MS}
# docs/protocol.md section 8: detection <= V + 5 probe intervals of 0.5 s (+ R when no watcher
# can probe anyone: it waits for a renewal to show its own view is current), then the
# replacement round (W + settle = 3 s, less with early close), then the start (~3 s here).
# The test allows 15 s more for a loaded 2-core machine.
NAT_FAILOVER_BOUND_S = LEASE_VALID_MS / 1000 + 2.5 + 3 + 3
ALL_NAT_FAILOVER_BOUND_S = NAT_FAILOVER_BOUND_S + LEASE_RENEW_MS / 1000
MARGIN_S = 15
HEALTHY_WATCH_S = 45  # many lease renewals and expiries of a lease not renewed
BID = "commune.scheduler.bid"
LEASE = "commune.scheduler.lease"
SERVICE = ["sh", "-c", "while true; do sleep 1; done"]


@pytest.fixture(scope="module")
def carol_behind_nat(devnet: Any) -> Iterator[Commune]:
    with booted(devnet, scheduling=SCHEDULING, nat=("carol",)) as c:
        yield c


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What one test leaves for the next (they run in order and share the commune)."""
    return {}


@pytest.fixture(scope="module")
def all_behind_nat(devnet: Any) -> Iterator[Commune]:
    with booted(devnet, scheduling=SCHEDULING, nat=PEOPLE) as c:
        yield c


# -- helpers ------------------------------------------------------------------------------


def list_records(pds_url: str, repo: str, collection: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"repo": repo, "collection": collection, "limit": "100"})
    url = f"{pds_url}/xrpc/com.atproto.repo.listRecords?{q}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return list(json.load(r)["records"])


def replacement_bids(commune: Commune, workload_uri: str) -> list[str]:
    """Bids of any meshlet in a round >= 1 of the workload: a slot's owner was suspected
    (or drained) and someone opened a replacement round."""
    out = []
    for m in commune:
        for r in list_records(m.mesh.pds_url, m.did, BID):
            v = r["value"]
            if v["workload"]["uri"] == workload_uri and v.get("round", 0) >= 1:
                out.append(
                    f"{m.person}: round {v['round']} slot {v.get('slot')} slots {v.get('slots')}"
                    f" at {v.get('createdAt')}"
                )
    return out


def placement(m: Meshlet, uri: str) -> dict[int, tuple[str, str]]:
    """slot -> (meshlet DID, state) of the highest round of each slot, as m reports it."""
    best: dict[int, dict[str, Any]] = {}
    for w in m.ctl_json("workloads", "--all"):
        if w["uri"] != uri:
            continue
        for r in w.get("running", []):
            s = int(r["slot"])
            if r.get("meshletDid") and (s not in best or r["round"] > best[s]["round"]):
                best[s] = r
    return {s: (r["meshletDid"], r["state"]) for s, r in sorted(best.items())}


def agreed(
    commune: Commune, uri: str, n: int, people: tuple[str, ...] = PEOPLE
) -> dict[int, str] | None:
    """slot -> meshlet when every meshlet in `people` reports the same, all running."""
    seen = []
    for p in people:
        got = placement(commune[p], uri)
        if len(got) != n or any(state != "running" for _, state in got.values()):
            return None
        seen.append({s: d for s, (d, _) in got.items()})
    return seen[0] if all(s == seen[0] for s in seen) else None


def run_service(commune: Commune, person: str, name: str, replicas: int, *extra: str) -> str:
    out = commune[person].ctl_json(
        "run", "--name", name, "--replicas", str(replicas), "--cpu", "100", "--memory", "32",
        *extra, "localhost/busybox:latest", "--", *SERVICE,
    )  # fmt: skip
    return str(out["uri"])


def power_off_and_time_failover(
    commune: Commune, uri: str, n: int, victim: Meshlet, limit_s: float
) -> tuple[float, dict[int, str]]:
    """Pull the plug on victim's host; seconds until systemd started its slot elsewhere."""
    before = wait_for(lambda: agreed(commune, uri, n), 60, "a running placement")
    lost = next(s for s, d in before.items() if d == victim.did)
    watchers = tuple(p for p in PEOPLE if p != victim.person)
    t0 = time.monotonic()
    commune.power_off(victim.person)

    def replaced() -> dict[int, str] | None:
        now = agreed(commune, uri, n, watchers)
        return now if now and victim.did not in now.values() else None

    after = wait_for(replaced, limit_s + 60, f"slot {lost} to run elsewhere")
    new_host = commune.by_did(after[lost])
    rkey = uri.rsplit("/", 1)[1]
    units = [u for u in new_host.replica_units() if rkey in u]
    started = max(s for u in units if (s := new_host.active_since(u)) is not None)
    return started - t0, after


# -- carol behind NAT -----------------------------------------------------------------------


def test_a_meshlet_behind_nat_publishes_no_endpoint_and_renews_a_lease(
    carol_behind_nat: Commune,
) -> None:
    c = carol_behind_nat
    carol = c["carol"]
    assert carol.host.faults() == ["nat"]
    owner = list_records(carol.mesh.pds_url, carol.did, "commune.scheduler.meshletOwner")
    assert owner and "endpoint" not in owner[0]["value"]
    first = wait_for(
        lambda: list_records(carol.mesh.pds_url, carol.did, LEASE), 60, "carol's lease"
    )[0]["value"]
    assert first["validMs"] == LEASE_VALID_MS
    renewed = wait_for(
        lambda: (
            (v := list_records(carol.mesh.pds_url, carol.did, LEASE)[0]["value"])["renewedAt"]
            != first["renewedAt"]
            and v
        ),
        LEASE_RENEW_MS / 1000 * 3,
        "carol to renew her lease",
    )
    assert renewed["renewedAt"] > first["renewedAt"]
    # The reachable meshlets write no lease.
    for p in ("alice", "bob"):
        m = c[p]
        assert list_records(m.mesh.pds_url, m.did, LEASE) == []


def test_a_healthy_meshlet_behind_nat_is_never_suspected_and_keeps_its_slot(
    carol_behind_nat: Commune, shared: dict[str, Any]
) -> None:
    c = carol_behind_nat
    # Three replicas with packing allowed: round 0 gives each meshlet one, and a survivor
    # may take a second (the next test).
    published = time.time()
    uri = run_service(c, "alice", "everywhere", 3, "--constraint", "packing")
    first = wait_for(lambda: agreed(c, uri, 3), 90, "three replicas running")
    assert c["carol"].did in first.values(), first

    def moved(what: str) -> str:
        who = {m.did: m.person for m in c}
        hosts = {s: who.get(d) for s, d in first.items()}
        return (
            f"{what}; slots were held by {hosts}"
            f"\nbids of rounds >= 1: {replacement_bids(c, uri)}"
            f"\nthe meshlets' logs since the service was published:\n{c.story(published, uri)}"
        )

    deadline = time.monotonic() + HEALTHY_WATCH_S
    while time.monotonic() < deadline:
        now = agreed(c, uri, 3)
        assert now in (None, first), moved(f"the placement moved: {first} -> {now}")
        time.sleep(2)
    assert agreed(c, uri, 3) == first, moved("the placement moved")
    # Nobody opened a replacement round: carol was never suspected (a watcher that suspects
    # a slot's owner opens the next round of the slot at once, section 8).
    assert replacement_bids(c, uri) == [], moved("a replacement round was opened")
    shared["uri"] = uri


def test_a_watcher_cut_from_the_nat_host_s_pds_does_not_suspect_it(
    carol_behind_nat: Commune, shared: dict[str, Any]
) -> None:
    """Chaos finding 4 (docs/benchmarks.md): a watcher that still probes its other peers
    but is cut from the PDS holding carol's lease took the lease, no longer seen renewed,
    for expired and moved her slot. It now knows it has not heard that PDS lately."""
    c = carol_behind_nat
    uri = shared.get("uri") or pytest.fail("no service from the previous test", False)
    first = agreed(c, uri, 3)
    assert first is not None
    pds = c.devnet.pds_port(c.devnet.pds_index(c["carol"].mesh.pds_url))
    watcher = "alice"
    cut_at = time.time()
    c[watcher].host.cut_port(pds)
    try:
        # Her lease, unseen, would have expired (V) and 3 probe intervals passed, twice.
        time.sleep(2 * (LEASE_VALID_MS / 1000 + 3) + 5)
    finally:
        c.heal(watcher)
    healed_at = time.time() - cut_at
    time.sleep(10)  # bids held back by the cut (if alice's PDS is hers) are out by now

    def why() -> str:
        return (
            f"cut at 0.00, healed at {healed_at:.2f}"
            f"\nthe meshlets' logs since the cut:\n{c.story(cut_at, uri)}"
        )

    assert replacement_bids(c, uri) == [], why()
    assert agreed(c, uri, 3) == first, why()
    assert "not heard lately from the PDS of" in c[watcher].journal(lines=400)


def test_a_stalled_stream_from_the_nat_host_s_pds_does_not_make_it_look_dead(
    carol_behind_nat: Commune, shared: dict[str, Any]
) -> None:
    """Two full CI runs (sessions 16 and 17): a watcher that was not cut at all opened a
    replacement round for carol, healthy: its view of her lease had stopped advancing
    while her PDS answered its pings. Here her PDS's sequencer stalls for longer than a
    lease is valid (connections up, pings and reads answered): her watchers read her lease
    from the PDS before they act on its expiry (docs/protocol.md, section 8)."""
    c = carol_behind_nat
    uri = shared.get("uri") or pytest.fail("no service from the previous test", False)
    first = agreed(c, uri, 3)
    assert first is not None
    held_s = LEASE_VALID_MS / 1000 + 10
    held_at = time.time()
    c.hold_firehose("carol", held_s)
    time.sleep(held_s + 5)

    def why() -> str:
        return f"the meshlets' logs since the hold:\n{c.story(held_at, uri)}"

    assert replacement_bids(c, uri) == [], why()
    assert agreed(c, uri, 3) == first, why()
    # Her watchers did find her lease expired in their view, and newer on her PDS.
    stale = "newer than the stream's copy"
    assert any(stale in c[p].journal(lines=400) for p in ("alice", "bob")), why()


def test_a_meshlet_behind_nat_that_dies_is_replaced_within_the_lease_bound(
    carol_behind_nat: Commune, shared: dict[str, Any]
) -> None:
    c = carol_behind_nat
    uri = shared.get("uri") or pytest.fail("no service from the previous test", False)
    limit = NAT_FAILOVER_BOUND_S + MARGIN_S
    elapsed, after = power_off_and_time_failover(c, uri, 3, c["carol"], limit)
    print(f"carol (behind NAT) powered off: replacement running after {elapsed:.1f} s")
    assert c["carol"].did not in after.values()
    # Not before her lease could expire: it was the lease, not a probe, that told.
    assert elapsed >= (LEASE_VALID_MS - LEASE_RENEW_MS) / 1000, elapsed
    assert elapsed <= limit, (
        f"replacement running after {elapsed:.1f} s (bound {NAT_FAILOVER_BOUND_S:.0f} s); "
        f"bids: {replacement_bids(c, uri)}"
    )


# -- every meshlet behind NAT -----------------------------------------------------------------


def test_a_commune_where_every_meshlet_is_behind_nat_runs_a_service_and_fails_over(
    all_behind_nat: Commune,
) -> None:
    c = all_behind_nat
    for m in c:
        assert m.host.faults() == ["nat"]
    members = wait_for(
        lambda: all(m.ctl_json("status")["members"] == 2 for m in c), 90, "the cluster to form"
    )
    assert members
    uri = run_service(c, "alice", "natted", 2)
    first = wait_for(lambda: agreed(c, uri, 2), 90, "two replicas running")
    time.sleep(LEASE_VALID_MS / 1000 * 2)  # leases expire and are renewed meanwhile
    assert agreed(c, uri, 2) == first
    assert replacement_bids(c, uri) == []
    hosting = [c.by_did(d) for d in first.values()]
    victim = next((m for m in hosting if m.person != "alice"), hosting[0])
    limit = ALL_NAT_FAILOVER_BOUND_S + MARGIN_S
    elapsed, after = power_off_and_time_failover(c, uri, 2, victim, limit)
    print(f"every host behind NAT, {victim.person} powered off: replaced after {elapsed:.1f} s")
    assert victim.did not in after.values()
    assert elapsed <= limit, (
        f"replacement running after {elapsed:.1f} s (bound {ALL_NAT_FAILOVER_BOUND_S:.0f} s); "
        f"bids: {replacement_bids(c, uri)}"
    )
