"""Meshlets nobody can reach (no endpoint, behind NAT) live by a lease record
(docs/protocol.md section 8): they renew it, their watchers judge them by it instead of
probing, and a lease that is not renewed makes them suspected like a dead host."""

from __future__ import annotations

from dataclasses import replace

from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.core import (
    Bid,
    FeedsBehind,
    Lease,
    MeshletIdentity,
    MeshletOwner,
    ProbePeer,
    ProbeResult,
    PutRecord,
    RefreshLease,
    Scheduler,
    Tick,
    Timing,
    WakeAt,
)
from meshletd.core.records import NSID_LEASE, at_uri
from meshletd.core.timing import LEASE_MAX_VALID_MS

from .core_helpers import CPU, MEM, T0, bid, cluster_records, feed, mesh, owner, workload

CLOSE = T0 + 2000 + 2000
R, V = 5_000, 12_000
# Short leases; probes every second, 3 failures (a tick of these tests is one probe round).
TIMING = Timing(lease_renew_ms=R, lease_valid_ms=V, probe_interval_ms=1000, probe_failures=3)


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def probe_round(core: Scheduler, now: int, ok: bool = True) -> list[object]:
    """One tick at `now`, every probe it sends answered `ok`: the actions of both."""
    out = core.handle(Tick(now))
    for p in of(out, ProbePeer):
        out += core.handle(ProbeResult(p.meshlet, ok=ok))
    return out


def lease_of(i: int, renewed_at: int, valid_ms: int = V) -> Lease:
    return Lease(at_uri(mesh(i), NSID_LEASE, "self"), mesh(i), renewed_at, valid_ms)


def without_endpoint(records: list[object], nat: set[int]) -> list[object]:
    """The commune's records, every meshlet with an endpoint but those in `nat`."""
    out = []
    for r in records:
        if isinstance(r, MeshletOwner):
            i = int(r.meshlet[-3:])
            r = replace(r, endpoint="" if i in nat else f"http://10.251.0.{i + 2}:2585")
        out.append(r)
    return out


def watcher_of(target: int, n: int, nat: set[int]) -> tuple[Scheduler, object]:
    """A core (a meshlet with an endpoint) that watches mesh(target), which owns slot 0 of a
    placed workload, in an n-meshlet commune; and the workload."""
    wl = workload(replicas=2, owner_i=n - 1)
    for me in range(n):
        if me == target or me in nat:
            continue
        core = Scheduler(
            MeshletIdentity(mesh(me), owner(me), CPU, MEM, endpoint="http://x"), TIMING
        )
        core.handle(Tick(T0))
        feed(core, [*without_endpoint(cluster_records(n), nat), wl])
        feed(core, [bid(wl, target, priority=2), bid(wl, 1 if target != 1 else 2, priority=1)])
        feed(core, [lease_of(i, T0) for i in nat])
        core.handle(Tick(CLOSE - 1))
        if mesh(target) in core.liveness.watch_list():
            return core, wl
    raise AssertionError(f"nobody watches mesh({target})")


def test_a_meshlet_without_endpoint_writes_its_lease_at_once_then_every_renewal() -> None:
    me = MeshletIdentity(mesh(0), owner(0), CPU, MEM, lease=True)
    core = Scheduler(me, TIMING)
    out = core.handle(Tick(T0))
    puts = [a for a in of(out, PutRecord) if isinstance(a.record, Lease)]
    assert len(puts) == 1 and puts[0].create and puts[0].rkey == "self"
    assert (puts[0].record.renewed_at, puts[0].record.valid_ms) == (T0, V)
    assert WakeAt(T0 + R) in out or any(isinstance(a, WakeAt) and a.at <= T0 + R for a in out)
    assert not [a for a in of(core.handle(Tick(T0 + R - 1)), PutRecord)]
    again = [a for a in of(core.handle(Tick(T0 + R)), PutRecord) if isinstance(a.record, Lease)]
    assert len(again) == 1 and not again[0].create  # an update: 2 points, not 3
    assert again[0].record.renewed_at == T0 + R
    # What it writes is what its peers read.
    value = record_to_json(again[0].record)
    assert record_from_json(again[0].record.uri, "c", value) == again[0].record


def test_a_meshlet_with_an_endpoint_writes_no_lease() -> None:
    core = Scheduler(MeshletIdentity(mesh(0), owner(0), CPU, MEM, endpoint="http://x"), TIMING)
    out = core.handle(Tick(T0))
    out += core.handle(Tick(T0 + 10 * R))
    assert not [a for a in of(out, PutRecord) if isinstance(a.record, Lease)]


def test_a_peer_without_endpoint_is_not_probed_and_lives_while_its_lease_is_renewed() -> None:
    core, wl = watcher_of(0, n=4, nat={0})
    now = CLOSE
    for k in range(12):  # a minute: leases renewed every R, probes every second
        now = CLOSE + k * 1000
        if k % 5 == 0:
            feed(core, [lease_of(0, now)])
        out = core.handle(Tick(now))
        assert ProbePeer(mesh(0)) not in out, "a meshlet without endpoint cannot be probed"
        for p in of(out, ProbePeer):
            out += core.handle(ProbeResult(p.meshlet, ok=True))
        assert mesh(0) not in core.suspects
        assert not [a for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert core.placement()[wl.uri][0] == (0, mesh(0))


def test_a_peer_whose_lease_expires_is_suspected_and_its_slot_reoffered() -> None:
    core, _ = watcher_of(0, n=4, nat={0})
    feed(core, [lease_of(0, CLOSE)])  # its last renewal: then it dies
    opened: list[Bid] = []
    suspected_at = None
    for k in range(1, 30):
        now = CLOSE + k * 1000
        out = probe_round(core, now)
        mine = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
        feed(core, mine)  # its own bids come back over the firehose
        opened += mine
        if suspected_at is None and mesh(0) in core.suspects:
            suspected_at = now
    assert suspected_at is not None
    assert core.liveness.why[mesh(0)].startswith("its lease expired"), core.liveness.why
    # Fresh up to renewedAt + V; the 3rd failed check after that: V + 3 probe intervals.
    assert CLOSE + V < suspected_at <= CLOSE + V + 3 * 1000
    # Round 1 of its slot at once; if this watcher can only decline and nobody else bids,
    # the next ones as the reopen wait allows (section 8): 3 s, then 6 s later.
    assert [(b.round, b.slot) for b in opened][:1] == [(1, 0)]
    if len(opened) > 1:
        assert [(b.round, b.slot, b.slots) for b in opened][1:] == [(2, 0, 0), (3, 0, 0)]


def test_a_lease_that_looks_expired_is_read_again_from_its_pds_until_its_writer_is_suspected() -> (
    None
):
    # A late firehose (a stream that reconnected before its backlog was in, a stalled
    # sequencer) must not make a healthy writer look dead: every round that finds the lease
    # expired asks the daemon to read it again from its PDS; once suspected, no more reads.
    core, _ = watcher_of(0, n=4, nat={0})
    feed(core, [lease_of(0, CLOSE)])
    refreshes: list[int] = []
    for k in range(1, 30):
        now = CLOSE + k * 1000
        out = probe_round(core, now)
        if RefreshLease(mesh(0)) in out:
            refreshes.append(now)
        assert not [p for p in of(out, ProbePeer) if p.meshlet == mesh(0)]
    assert mesh(0) in core.suspects
    # Asked in each round from the expiry to the suspicion (3 failures), never while fresh.
    assert refreshes and refreshes[0] > CLOSE + V - 1000  # its last round fresh
    assert len(refreshes) == TIMING.probe_failures, refreshes


def test_a_renewal_read_from_the_pds_keeps_a_writer_the_firehose_is_late_for() -> None:
    core, wl = watcher_of(0, n=4, nat={0})
    feed(core, [lease_of(0, CLOSE)])
    # mesh(0) renews every R, but the firehose brings none of it; the read it asks for
    # finds the newest renewal on its PDS.
    for k in range(1, 40):
        now = CLOSE + k * 1000
        out = probe_round(core, now)
        if RefreshLease(mesh(0)) in out:
            feed(core, [lease_of(0, now - now % R)])  # what its PDS holds now
        assert mesh(0) not in core.suspects, k
        assert not [a for a in of(out, PutRecord) if isinstance(a.record, Bid)], k
    assert core.placement()[wl.uri][0] == (0, mesh(0))


def test_a_watcher_that_has_not_heard_from_the_lease_s_pds_does_not_suspect_its_writer() -> None:
    # Chaos seed 3 (docs/benchmarks.md, finding 4): bob, cut from PDS 0 only, still probed
    # alice and carol, so he took dave's lease (on PDS 0), no longer seen renewed, for
    # expired, suspected dave and took a slot from him. The daemon tells the core which
    # repos' PDS it has not heard from lately; their leases then prove nothing.
    core, _ = watcher_of(0, n=4, nat={0})
    feed(core, [lease_of(0, CLOSE)])
    core.handle(FeedsBehind(frozenset({mesh(0)})))
    for k in range(1, 30):
        probe_round(core, CLOSE + k * 1000)  # the probed peers answer
        assert mesh(0) not in core.suspects, k
    core.handle(FeedsBehind(frozenset()))  # PDS 0 heard again, still no renewal: dead
    for k in range(30, 34):
        probe_round(core, CLOSE + k * 1000)
    assert mesh(0) in core.suspects


def test_a_lease_received_late_is_no_sign_of_life() -> None:
    core, _ = watcher_of(0, n=4, nat={0})
    core.handle(Tick(CLOSE + 60_000))
    feed(core, [lease_of(0, CLOSE + 60_000 - V - 1)])  # anti-entropy brings an old one
    for k in range(1, 4):
        probe_round(core, CLOSE + 60_000 + k * 1000)
    assert mesh(0) in core.suspects


def test_a_lease_from_a_clock_running_fast_counts_from_when_it_was_seen() -> None:
    core, _ = watcher_of(0, n=4, nat={0})
    core.handle(Tick(CLOSE))
    feed(core, [lease_of(0, CLOSE + 3_600_000, valid_ms=10**9)])  # an hour ahead, huge
    alive_until = None
    for k in range(1, 700):
        now = CLOSE + k * 1000
        probe_round(core, now)
        if mesh(0) in core.suspects:
            alive_until = now
            break
    # Seen at CLOSE, validity capped: suspected LEASE_MAX_VALID_MS (+3 of its probes) later.
    assert alive_until is not None
    assert CLOSE + LEASE_MAX_VALID_MS < alive_until <= CLOSE + LEASE_MAX_VALID_MS + 3000


def test_a_peer_without_endpoint_or_lease_is_probed_as_before() -> None:
    """An older meshletd that publishes no endpoint writes no lease: nothing changes."""
    core, _ = watcher_of(0, n=4, nat=set())
    feed(core, [replace(o, endpoint="") for o in cluster_records(4)
                if isinstance(o, MeshletOwner) and o.meshlet == mesh(0)])  # fmt: skip
    out = core.handle(Tick(CLOSE + 1000))
    assert ProbePeer(mesh(0)) in out


def test_a_commune_where_nobody_has_an_endpoint_watches_by_leases_alone() -> None:
    nat = {0, 1, 2, 3}
    wl = workload(replicas=2, owner_i=3)
    cores = []
    for me in range(4):
        core = Scheduler(MeshletIdentity(mesh(me), owner(me), CPU, MEM, lease=True), TIMING)
        core.handle(Tick(T0))
        feed(core, [*without_endpoint(cluster_records(4), nat), wl])
        feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
        cores.append(core)
    for k in range(20):
        now = CLOSE + k * 1000
        leases = [lease_of(i, now) for i in range(4) if i != 0 and k % 5 == 0]
        if k == 0:
            leases.append(lease_of(0, now))  # mesh(0) renews once, then dies
        for core in cores[1:]:
            feed(core, leases)
            out = core.handle(Tick(now))
            assert of(out, ProbePeer) == [], "nobody can be probed"
    watchers = [c for c in cores[1:] if mesh(0) in c.liveness.watch_list()]
    assert watchers and all(mesh(0) in c.suspects for c in watchers)
    assert not any({mesh(1), mesh(2), mesh(3)} & c.suspects for c in cores[1:])


def test_a_cut_off_watcher_opens_nothing_though_its_leased_peers_still_look_fresh() -> None:
    """Chaos with half the hosts behind NAT: a watcher cut off from everything saw its
    probed peers fail while its leased peers' leases were still fresh, took itself for
    connected, and opened rounds against healthy hosts."""
    core, _ = watcher_of(1, n=6, nat={0, 2})
    watched = core.liveness.watch_list()
    feed(core, [lease_of(i, CLOSE) for i in (0, 2)])
    assert any(core.liveness.lease_judged(m) for m in watched)
    assert len(core.liveness._probed_peers()) >= 2
    opened = []
    for k in range(1, 10):  # cut off: no probe answers, no records
        out = probe_round(core, CLOSE + k * 1000, ok=False)
        opened += [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert core.liveness.isolated(core.now)
    assert opened == []


def test_an_expired_lease_is_no_failure_while_no_renewal_reaches_us() -> None:
    """Every meshlet behind NAT and we are cut off from the PDSes: our peers' leases expire
    one by one, but nothing shows that it is their silence and not ours."""
    wl = workload(replicas=2, owner_i=3)
    core = Scheduler(MeshletIdentity(mesh(3), owner(3), CPU, MEM, lease=True), TIMING)
    core.handle(Tick(T0))
    feed(core, [*without_endpoint(cluster_records(4), {0, 1, 2, 3}), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    feed(core, [lease_of(i, CLOSE + 1000 * i) for i in range(4)])
    opened = []
    for k in range(1, 60):  # a minute cut off: nothing reaches us, our renewals included
        out = core.handle(Tick(CLOSE + k * 1000))
        assert of(out, ProbePeer) == []
        opened += [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert core.suspects == set() and opened == []
    # The cut heals: our own renewal comes back, proving what we see is current; mesh(0)
    # really stopped renewing and is suspected, the others renewed meanwhile.
    now = CLOSE + 60_000
    feed(core, [lease_of(i, now) for i in (1, 2, 3)])
    for k in range(1, 5):
        core.handle(Tick(now + k * 1000))
    assert core.suspects == {mesh(0)}


def test_with_one_probed_peer_a_renewal_after_its_failures_starts_the_failover_at_once() -> None:
    """Our only probed peer stops answering: that may be us cut off, so no round yet; a
    lease renewal arriving afterwards shows our view is current, and the round opens then,
    not at the next periodic scan (chaos, 30 % behind NAT: +15-30 s failovers)."""
    core, _ = watcher_of(0, n=4, nat={2, 3})
    assert core.liveness._probed_peers() == [mesh(0)]
    feed(core, [lease_of(2, CLOSE), lease_of(3, CLOSE)])
    opened = []
    for k in range(1, 5):
        out = probe_round(core, CLOSE + k * 1000, ok=False)
        opened += [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert mesh(0) in core.suspects and opened == []
    out = feed(core, [lease_of(2, CLOSE + 5000)])
    bids = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.round, b.slot) for b in bids] == [(1, 0)]
