"""dev/chaos's fault schedule (dev/lib/chaos_plan.py): reproducible from the seed, every
kind drawn, and spaced so each fault can be held to its own recovery bound."""

from __future__ import annotations

import itertools

from chaos_plan import KINDS, Bounds, Fault, plan, recovery_bound, settled_at

PEOPLE = ["alice", "bob", "carol", "dave"]
NAT = ["dave"]


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    a = plan(7, 30, PEOPLE, NAT)
    assert a == plan(7, 30, PEOPLE, NAT)
    assert a != plan(8, 30, PEOPLE, NAT)


def test_a_long_run_draws_every_kind_of_fault() -> None:
    kinds = {f.kind for seed in range(1, 6) for f in plan(seed, 30, PEOPLE, NAT)}
    assert kinds == set(KINDS)


def test_faults_follow_each_other_after_the_previous_one_settled() -> None:
    b = Bounds(lease_valid_s=12)
    for seed in range(1, 20):
        faults = plan(seed, 30, PEOPLE, NAT, bounds=b)
        assert len(faults) >= 10
        for prev, nxt in itertools.pairwise(faults):
            assert nxt.at >= settled_at(prev, NAT, b)
            assert nxt.at >= prev.heals_at


def test_no_fault_lasts_into_the_quiet_tail() -> None:
    for seed in range(1, 20):
        faults = plan(seed, 5, PEOPLE, NAT, tail_s=60)
        assert all(settled_at(f, NAT, Bounds()) <= 5 * 60 - 60 for f in faults)


def test_cuts_name_two_different_hosts_and_instant_faults_last_nothing() -> None:
    for seed in range(1, 20):
        for f in plan(seed, 30, PEOPLE, NAT):
            if f.kind in ("cut", "cut-both"):
                assert f.peer in PEOPLE and f.peer != f.target
            if f.kind in ("kill-firehose", "kill-daemon"):
                assert f.duration == 0
            if f.kind != "kill-firehose":
                assert f.target in PEOPLE


def test_a_host_behind_nat_gets_the_lease_bound_a_reachable_one_the_probe_bound() -> None:
    b = Bounds(reachable_s=10, lease_valid_s=12, start_s=5)
    assert recovery_bound(Fault(0, "power-off", "dave", duration=30), NAT, b) == 12 + 5.5 + 5
    assert recovery_bound(Fault(0, "power-off", "alice", duration=30), NAT, b) == 10
    # a power-off is held from its start; a cut from its healing
    assert settled_at(Fault(100, "power-off", "alice", duration=30), NAT, b) == 110
    assert settled_at(Fault(100, "cut", "alice", "bob", duration=30), NAT, b) == 145
