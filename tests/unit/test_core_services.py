"""Ports, endpoints, health and hand-off in the core (docs/protocol.md, section 22)."""

from __future__ import annotations

from dataclasses import replace

from meshletd.core import (
    Bid,
    PutRecord,
    RecordDeleted,
    ReplicaStateChanged,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)
from meshletd.core.records import Endpoint, HostPolicy, PortSpec
from meshletd.core.services import (
    MAX_TRIES,
    STABLE_MS,
    Inbound,
    choose_endpoints,
    inbound_refusal,
    replica_ready,
)

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

CLOSE = T0 + 2000 + 2000
OPEN = Inbound(True, 20000, 20009, "10.0.0.1")


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def statuses(actions: list[object]) -> list[WorkloadStatus]:
    return [a.record for a in of(actions, PutRecord) if isinstance(a.record, WorkloadStatus)]


def bids(actions: list[object]) -> list[Bid]:
    return [a.record for a in of(actions, PutRecord) if isinstance(a.record, Bid)]


def web(**kw: object):
    wl = workload(owner_i=2)
    return replace(wl, ports=(PortSpec("http", 8080), PortSpec("dns", 53, "udp")), **kw)


def policy(i: int, ib: Inbound) -> HostPolicy:
    """mesh(i)'s host policy record, with this `inbound`."""
    return replace(
        HostPolicy.default(mesh(i)),
        created_at=T0 - 10,
        inbound_allowed=ib.allowed,
        port_min=ib.port_min,
        port_max=ib.port_max,
        inbound_address=ib.address,
    )


def core_with(inbound: dict[int, Inbound], me: int = 0):
    core = observer(me)
    feed(core, [*cluster_records(3), *(policy(i, ib) for i, ib in inbound.items())])
    return core


def test_a_host_that_does_not_publish_ports_is_not_eligible_for_a_workload_with_ports() -> None:
    wl = web()
    core = core_with({1: OPEN})  # mesh(0) has no policy: inbound not allowed
    feed(core, [wl, bid(wl, 0, priority=9), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)
    # the same bids for a workload without ports: the higher priority wins
    plain = replace(web(), uri=wl.uri + "x", ports=())
    feed(core, [plain, bid(plain, 0, priority=9), bid(plain, 1, priority=1)])
    core.handle(Tick(CLOSE + 1))
    assert core.placement()[plain.uri] == ((0, mesh(0)),)


def test_a_host_policy_that_stops_publishing_makes_its_host_ineligible() -> None:
    wl = web()
    core = core_with({0: OPEN, 1: OPEN})
    assert core.cluster.eligible(wl, mesh(0))
    feed(core, [policy(0, Inbound())])
    assert not core.cluster.eligible(wl, mesh(0)) and core.cluster.eligible(wl, mesh(1))
    core.handle(RecordDeleted(policy(1, OPEN).uri))
    assert not core.cluster.eligible(wl, mesh(1))


def test_a_range_smaller_than_the_declared_ports_makes_a_host_ineligible() -> None:
    wl = web()
    assert inbound_refusal(Inbound(True, 20000, 20000, "10.0.0.1"), wl) == "ports"
    assert inbound_refusal(Inbound(True, 20000, 20001, "10.0.0.1"), wl) is None
    assert inbound_refusal(Inbound(False, 20000, 20009, "10.0.0.1"), wl) == "ports"
    assert inbound_refusal(Inbound(True, 20000, 20009, None), wl) == "ports"
    assert inbound_refusal(Inbound(), replace(wl, ports=())) is None


def test_endpoints_take_the_lowest_free_ports_of_the_range_in_declaration_order() -> None:
    wl = web()
    got = choose_endpoints(wl, OPEN, [20000, 20002])
    assert got == (
        Endpoint("http", "10.0.0.1", 20001, "tcp"),
        Endpoint("dns", "10.0.0.1", 20003, "udp"),
    )
    assert choose_endpoints(wl, Inbound(True, 20000, 20002, "10.0.0.1"), [20001, 20002]) is None


def running_web(**kw: object):
    wl = web(**kw)
    core = core_with({0: OPEN, 1: OPEN})
    out = feed(core, [wl, bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    out += core.handle(Tick(CLOSE))
    return core, wl, out


def test_the_winner_publishes_each_port_from_its_range_and_its_status_says_where() -> None:
    core, wl, out = running_web()
    [start] = of(out, StartReplica)
    assert start.endpoints == (
        Endpoint("http", "10.0.0.1", 20000, "tcp"),
        Endpoint("dns", "10.0.0.1", 20001, "udp"),
    )
    [st] = statuses(core.handle(ReplicaStateChanged(wl.uri, 0, "running")))
    assert st.state == "running" and st.endpoints == start.endpoints
    assert st.health is None  # no check declared
    assert replica_ready(st, wl)


def test_a_replica_with_a_health_check_reports_starting_then_healthy() -> None:
    core, wl, _ = running_web(health_command=("true",))
    [st] = statuses(core.handle(ReplicaStateChanged(wl.uri, 0, "running")))
    assert (st.state, st.health) == ("running", "starting")
    assert not replica_ready(st, wl)
    [st] = statuses(core.handle(ReplicaStateChanged(wl.uri, 0, "running", health="healthy")))
    assert (st.state, st.health) == ("running", "healthy")
    assert replica_ready(st, wl)
    # the same news again writes nothing
    assert statuses(core.handle(ReplicaStateChanged(wl.uri, 0, "running", health="healthy"))) == []


def test_an_adopted_replica_keeps_its_endpoints_and_health_in_one_write() -> None:
    core, wl, _ = running_web(health_command=("true",))
    there = (Endpoint("http", "10.0.0.1", 20007), Endpoint("dns", "10.0.0.1", 20008, "udp"))
    ev = ReplicaStateChanged(wl.uri, 0, "running", health="healthy", endpoints=there)
    [st] = statuses(core.handle(ev))
    assert (st.endpoints, st.health) == (there, "healthy")


def fail(core, wl, t: int, **kw: object) -> list[object]:
    out = core.handle(Tick(t))
    out += core.handle(ReplicaStateChanged(wl.uri, 0, "exited", **kw))
    return out


def test_an_unhealthy_replica_is_restarted_then_handed_off_after_its_tries() -> None:
    core, wl, _ = running_web(health_command=("true",))
    t = CLOSE
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    for n in range(1, MAX_TRIES + 1):
        out = fail(core, wl, t, exit_code=137, health="unhealthy")
        t += 61_000
        if n < MAX_TRIES:
            assert [(s.state, s.health) for s in statuses(out)] == [("running", "unhealthy")]
            assert bids(out) == []
            out = core.handle(Tick(t))
            [start] = of(out, StartReplica)  # restarted in place, same endpoints
            assert start.endpoints[0].port == 20000
            core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    [st] = statuses(out)
    assert st.state == "failing"
    assert st.message == f"unhealthy (exit 137); handed off after {MAX_TRIES} tries"
    # the slot is offered to the others: a decline opens the next round
    [b] = bids(out)
    assert (b.round, b.slot, b.slots) == (1, 0, 0)


def test_a_replica_that_cannot_start_is_handed_off_not_restarted_for_ever() -> None:
    core, wl, _ = running_web()
    t = CLOSE
    for _ in range(MAX_TRIES):
        out = core.handle(Tick(t))
        out += core.handle(ReplicaStateChanged(wl.uri, 0, "failed", message="ImageNotFound: x"))
        t += 61_000
    [st] = statuses(out)
    assert (st.state, st.message) == (
        "failing",
        f"cannot start: ImageNotFound: x; handed off after {MAX_TRIES} tries",
    )
    assert [(b.round, b.slots) for b in bids(out)] == [(1, 0)]
    # it is still retried here until another meshlet runs it (make-before-break)...
    assert of(core.handle(Tick(t + 61_000)), StartReplica)
    # ...without a second status or a second round of its own
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "failed", message="ImageNotFound: x"))
    assert statuses(out) == [] and bids(out) == []


def test_a_replica_that_ran_long_enough_starts_its_tries_afresh() -> None:
    core, wl, _ = running_web()
    t = CLOSE
    for _ in range(MAX_TRIES * 2):
        core.handle(Tick(t))
        core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
        t += STABLE_MS
        out = fail(core, wl, t, exit_code=1)
        assert all(s.state != "failing" for s in statuses(out))
        t += 61_000


def test_a_host_whose_range_is_taken_declines_a_workload_with_ports() -> None:
    wl = web()
    core = core_with({0: Inbound(True, 20000, 20002, "10.0.0.1"), 1: OPEN})
    feed(core, [wl, bid(wl, 1, priority=1)])
    out = core.handle(Tick(T0 + 200))
    [mine] = [b for b in bids(out) if b.meshlet == mesh(0)]
    assert mine.slots == 1  # three ports free, two needed
    second = replace(web(), uri=wl.uri + "2")
    feed(core, [second])
    out = core.handle(Tick(T0 + 400))
    [mine] = [b for b in bids(out) if b.meshlet == mesh(0)]
    assert mine.slots == 0  # one left: it declines


def test_a_workload_no_host_may_publish_says_so_while_pending() -> None:
    wl = web()
    core = core_with({})
    feed(core, [wl])
    core.handle(Tick(CLOSE + 1))
    [why] = core.pending_reasons(wl.uri).values()
    assert "no eligible meshlet" in why and "ports=2" in why


def handed_off_core():
    """mesh(0) ran the slot, could not start it three times and handed it off (round 1)."""
    core, wl, _ = running_web()
    t = CLOSE
    out: list[object] = []
    for _ in range(MAX_TRIES):
        out = core.handle(Tick(t))
        out += core.handle(ReplicaStateChanged(wl.uri, 0, "failed", message="x"))
        t += 61_000
    [decline] = bids(out)
    return core, wl, decline, t


def test_a_meshlet_that_handed_a_version_off_does_not_take_it_back() -> None:
    core, wl, decline, t = handed_off_core()
    # mesh(1) wins round 1; mesh(0)'s copy, not running (waiting for its next try), stops
    won = bid(wl, 1, round_=1, slot=0, at=decline.created_at + 10)
    out = feed(core, [won])
    out += core.handle(Tick(decline.created_at + 5000))
    assert core.placement()[wl.uri] == ((1, mesh(1)),)
    assert [s.reason for s in of(out, StopReplica)] == ["lost-slot"]
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    # later mesh(1) hands it off too: mesh(0), a candidate again, declines to bid
    opener = replace(bid(wl, 1, round_=2, slot=0, at=t + 100_000), slots=0)
    out = feed(core, [opener])
    out += core.handle(Tick(t + 100_500))
    assert [b for b in bids(out) if b.meshlet == mesh(0)] == []
    # a new version of the workload is a fresh start: it bids again
    newer = replace(wl, cid="c2")
    feed(core, [newer])
    out = core.handle(Tick(t + 100_600))
    out += feed(core, [replace(bid(newer, 1, round_=3, slot=0, at=t + 100_550), slots=0)])
    out += core.handle(Tick(t + 100_700))
    assert [b.slots for b in bids(out) if b.meshlet == mesh(0)] == [1]


def test_a_replica_without_a_free_port_left_is_handed_off_at_once() -> None:
    one = replace(web(), ports=(PortSpec("http", 8080),))
    other = replace(one, uri=one.uri + "b")
    core = core_with({0: Inbound(True, 20000, 20000, "10.0.0.1"), 1: OPEN})
    out = feed(core, [one, bid(one, 0, priority=2), bid(one, 1, priority=1)])
    out += core.handle(Tick(CLOSE))
    [start] = of(out, StartReplica)
    assert start.endpoints[0].port == 20000  # the range's one port
    # a bid of ours for another workload (made before a restart, say) wins too: no port left
    out = feed(core, [other, bid(other, 0, priority=2), bid(other, 1, priority=1)])
    out += core.handle(Tick(CLOSE + 10))
    assert of(out, StartReplica) == []
    [st] = statuses(out)
    assert st.state == "failing" and "no free port" in (st.message or "")
    assert [(b.round, b.slots) for b in bids(out)] == [(1, 0)]
