"""`Scheduler.pending_reason`: why a slot has no owner, in words an operator can act on."""

from __future__ import annotations

from dataclasses import replace

from meshletd.core import Bid, ProbeResult, Tick

from .core_helpers import CPU, MEM, T0, bid, cluster_records, feed, mesh, observer, workload

CLOSE = T0 + 2000 + 2000  # createdAt + bidWindowMs + settle


def short_bid(wl, i: int, cpu: int, mem: int = MEM, **kw: object) -> Bid:
    """A decline (slots 0) stating the meshlet's free capacity."""
    return replace(bid(wl, i, slots=0, **kw), free_milli_cpu=cpu, free_memory_mib=mem)  # type: ignore[arg-type]


def test_a_workload_still_in_its_bid_window_says_when_round_0_closes() -> None:
    wl = workload(replicas=2, owner_i=1)
    core = observer(0)
    feed(core, [*cluster_records(5), wl, bid(wl, 3)])
    reasons = core.pending_reasons(wl.uri)
    assert set(reasons) == {0, 1}
    assert reasons[0].startswith("bidding: round 0 closes at 2027-01-15T08:00:04.000Z")
    assert "1 offer(s), 0 decline(s)" in reasons[0]


def test_a_workload_larger_than_any_free_capacity_names_the_largest_free_seen() -> None:
    wl = workload(owner_i=0, cpu=CPU + 1000)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    feed(core, [short_bid(wl, 1, 1000, 480), short_bid(wl, 2, 700)])
    core.handle(Tick(CLOSE + 10))
    assert core.placement()[wl.uri] == (None,)
    why = core.pending_reason(wl.uri, 0)
    assert why is not None
    assert why.startswith("round 0 closed without a winner: not enough free capacity")
    assert f"{CPU + 1000} milli-CPU / 256 MiB" in why
    assert f"largest free seen: 1000 milli-CPU / 480 MiB on {mesh(1)}" in why
    assert "2 declined" in why
    assert "offered again in round 1" in why


def test_a_slot_round_0_could_not_fill_says_how_many_it_filled() -> None:
    wl = workload(replicas=3, owner_i=0)
    core = observer()  # not a member: it does not bid in the chained round itself
    feed(core, [*cluster_records(3), wl, bid(wl, 1), bid(wl, 2)])
    core.handle(Tick(CLOSE + 10))
    assert core.pending_reason(wl.uri, 0) is None
    why = core.pending_reason(wl.uri, 2)
    assert why is not None and why.startswith("round 0 filled 2 of 3 slot(s), not slot 2")


def test_no_eligible_meshlet_is_named_with_the_constraints() -> None:
    wl = replace(workload(owner_i=0), arch=("riscv64",))
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    why = core.pending_reason(wl.uri, 0)
    assert why is not None and why.startswith("no eligible meshlet")
    assert "arch=riscv64" in why
    core.handle(Tick(CLOSE + 10))
    assert core.pending_reason(wl.uri, 0) == why.split(";")[0]


def test_every_eligible_meshlet_draining_is_said() -> None:
    wl = workload(owner_i=0, created=T0 + 10)
    core = observer(0)
    feed(core, [*cluster_records(2, draining={0: T0, 1: T0}), wl])
    assert core.pending_reason(wl.uri, 0) == (
        "every eligible meshlet (2) is draining; round 0 closes at "
        "2027-01-15T08:00:04.010Z (in 4.0 s)"
    )


def test_a_late_chained_round_that_found_nobody_says_so() -> None:
    wl = workload(owner_i=0, cpu=CPU + 1)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    chained = replace(
        bid(wl, 2, round_=1, slot=0, at=CLOSE + 100), free_milli_cpu=CPU - 10, slots=1
    )
    feed(core, [chained])
    core.handle(Tick(CLOSE + 500))
    assert core.pending_reason(wl.uri, 0) == (
        "bidding: round 1 of slot 0 closes at 2027-01-15T08:00:07.000Z (in 2.5 s)"
    )
    core.handle(Tick(CLOSE + 3100))
    why = core.pending_reason(wl.uri, 0)
    assert why is not None and why.startswith(
        "round 1 of slot 0 closed without a winner: not enough free capacity"
    )
    assert "1 offered too little" in why


def test_an_owned_slot_has_no_reason_until_its_host_is_suspected() -> None:
    wl = workload(owner_i=2)
    core = observer(1)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=5), bid(wl, 1)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(0)),)
    assert core.pending_reason(wl.uri, 0) is None
    for _ in range(core.t.probe_failures):
        core.handle(ProbeResult(mesh(0), ok=False))
    why = core.pending_reason(wl.uri, 0)
    assert why is not None and why.startswith(f"its host {mesh(0)} is suspected lost")


def test_the_query_changes_nothing() -> None:
    wl = workload(owner_i=0, cpu=CPU + 1000)
    core = observer(0)
    feed(core, [*cluster_records(3), wl, short_bid(wl, 1, 1000)])
    before = (core.placement(), core.decisions, core.free_capacity())
    for _ in range(2):
        core.pending_reasons(wl.uri)
    assert (core.placement(), core.decisions, core.free_capacity()) == before
    assert core.pending_reasons("at://nobody/x/y") == {}
