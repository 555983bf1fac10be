"""Placement is a pure function of public records (hypothesis properties)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshletd.core import Tick

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, object, list[object]]:
    n = draw(st.integers(2, 8))
    replicas = draw(st.integers(1, 3))
    packing = draw(st.booleans())
    wl = workload(replicas=replicas, packing=packing)
    bidders = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    bids = []
    for i in bidders:
        bids.append(
            bid(
                wl,
                i,
                priority=draw(st.integers(-2, 2)),
                slots=draw(st.integers(0, 3)),
                at=T0 + draw(st.integers(-500, 3000)),  # some before/after the window
            )
        )
    # Later rounds for slot 0, as a replacement or chained round would produce.
    for r in range(1, draw(st.integers(1, 3))):
        for i in draw(st.lists(st.integers(0, n - 1), unique=True, max_size=3)):
            bids.append(
                bid(wl, i, round_=r, slot=0, at=T0 + 4000 + r * 3000 + draw(st.integers(0, 1500)))
            )
    return n, wl, bids


@SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_same_records_in_any_order_give_the_same_placement(scen, rnd) -> None:
    n, wl, bids = scen
    records = [*cluster_records(n), wl, *bids]
    shuffled = list(records)
    rnd.shuffle(shuffled)
    a, b = observer(), observer()
    feed(a, records)
    feed(b, shuffled)
    for core in (a, b):
        core.handle(Tick(T0 + 60_000))
    assert a.placement() == b.placement()


@SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_every_slot_has_one_owner_per_round_and_observers_agree(scen, rnd) -> None:
    n, wl, bids = scen
    views = []
    for k in range(3):
        records = [*cluster_records(n), wl, *bids]
        rnd.shuffle(records)
        core = observer(90 + k)
        feed(core, records)
        core.handle(Tick(T0 + 60_000))
        views.append(core.placement()[wl.uri])
    assert views[0] == views[1] == views[2]
    owners = views[0]
    assert len(owners) == wl.replicas
    if not wl.allow_packing:
        round0 = [o[1] for o in owners if o is not None and o[0] == 0]
        assert len(round0) == len(set(round0))


@SETTINGS
@given(scenarios(), st.sets(st.integers(0, 7), max_size=4))
def test_a_draining_meshlet_receives_no_new_slots(scen, draining) -> None:
    n, wl, bids = scen
    drained = {i: T0 - 1 for i in draining if i < n}  # drained before the workload appeared
    core = observer()
    feed(core, [*cluster_records(n, drained), wl, *bids])
    core.handle(Tick(T0 + 60_000))
    owners = core.placement()[wl.uri]
    for o in owners:
        assert o is None or o[1] not in {mesh(i) for i in drained}
