"""A host may require that the owners it serves lend at least a ratio of what they use
(docs/protocol.md, section 23): those below come after contributors, or are not served there.
The standing is computed from public usage records with integers only, the same on every
meshlet; the host states its decision in its bids."""

from __future__ import annotations

from dataclasses import replace

from meshletd.core import Bid, PutRecord, Scheduler, Tick, Workload
from meshletd.core.commons import (
    ALLOWANCE_MILLI_CPU_SECONDS,
    DAY_MS,
    DEFERRED_PRIORITY,
    Rule,
    lent_and_used,
    rule_of,
    standing,
)
from meshletd.core.records import (
    NSID_HOST_POLICY,
    NSID_USAGE,
    HostPolicy,
    Usage,
    UsageEntry,
    at_uri,
)

from .core_helpers import T0, cluster_records, feed, mesh, observer, owner, workload

HOUR = 3_600_000
CPU_HOUR = 3_600_000  # milli-CPU-seconds


def usage(i: int, end: int, **used: int) -> Usage:
    """mesh(i)'s usage record of the hour ending at `end`: owner index -> CPU-hours."""
    entries = tuple(UsageEntry(owner(int(k[1:])), v * CPU_HOUR) for k, v in sorted(used.items()))
    return Usage(at_uri(mesh(i), NSID_USAGE, f"u{end - HOUR}"), mesh(i), end - HOUR, end, entries)


def policy(i: int, ratio: int, mode: str, days: int = 7) -> HostPolicy:
    return HostPolicy(
        at_uri(mesh(i), NSID_HOST_POLICY, "self"),
        mesh(i),
        T0 - 60_000,
        min_ratio_permille=ratio,
        min_period_days=days,
        min_mode=mode,
    )


OWNER_OF = {mesh(i): owner(i) for i in range(4)}
CAPACITY = {mesh(i): 4000 for i in range(4)}
ALL = frozenset(owner(i) for i in range(4))

# owner 2 ran 3 CPU-hours on owner 1's machine and lent nothing; owner 1 lent them
HISTORY = [usage(1, T0 - k * HOUR, o2=1) for k in range(3)]


def of_owner(i: int, name: str = "w", cpu: int = 500) -> Workload:
    return replace(
        workload(owner_i=i, cpu=cpu), uri=at_uri(owner(i), "commune.scheduler.workload", name)
    )


def bids_of(out: list[object]) -> list[Bid]:
    return [a.record for a in out if isinstance(a, PutRecord) and isinstance(a.record, Bid)]


# Names whose workloads have mesh(0) among their round-0 candidates in a 3-meshlet cluster.
def host0(*records: object) -> Scheduler:
    core = observer(0)
    feed(core, [*cluster_records(3), *HISTORY, *records])
    return core


# -- the rule, pure --------------------------------------------------------------------------
def test_lent_and_used_count_only_other_owners_in_the_period() -> None:
    own = usage(1, T0, o1=5)  # owner 1 on its own machine: neither lent nor used
    old = usage(1, T0 - 8 * DAY_MS, o2=2)  # outside a 7-day period
    later = usage(1, T0 + HOUR, o2=2)  # not ended by T
    lent, used = lent_and_used(
        [*HISTORY, own, old, later], OWNER_OF, CAPACITY, ALL, T0 - 7 * DAY_MS, T0
    )
    assert used == {owner(2): 3 * CPU_HOUR}
    assert lent == {owner(1): 3 * CPU_HOUR}


def test_usage_with_owners_the_judge_does_not_consent_to_counts_for_nobody() -> None:
    # owner 3 lists a sybil on its machine and claims it used it: no lending for owner 3
    sybil = Usage(
        at_uri(mesh(3), NSID_USAGE, "u"),
        mesh(3),
        T0 - HOUR,
        T0,
        (UsageEntry("did:plc:sybil", CPU_HOUR),),
    )
    lent, used = lent_and_used([sybil], OWNER_OF, CAPACITY, ALL, T0 - DAY_MS, T0)
    assert lent == {} and used == {}


def test_a_record_claiming_more_than_its_machine_could_serve_is_cut_to_its_capacity() -> None:
    # 4000 milli-CPU for one hour is 4 CPU-hours; a claim of 10 + 10 is cut to 2 + 2
    big = usage(3, T0, o1=10, o2=10)
    lent, used = lent_and_used([big], OWNER_OF, CAPACITY, ALL, T0 - DAY_MS, T0)
    assert used == {owner(1): 2 * CPU_HOUR, owner(2): 2 * CPU_HOUR}
    assert lent == {owner(3): 4 * CPU_HOUR}


def test_an_owner_below_the_ratio_stands_below_and_a_newcomer_stands_well() -> None:
    rule = Rule(500, 7, "refuse")
    lent = {owner(1): 3 * CPU_HOUR, owner(3): CPU_HOUR}
    used = {owner(2): 3 * CPU_HOUR, owner(3): 2 * CPU_HOUR + 1}
    rider = standing(owner(2), lent, used, rule)
    assert (rider.lent, rider.used, rider.ratio_permille, rider.below) == (0, 3 * CPU_HOUR, 0, True)
    assert not standing(owner(1), lent, used, rule).below  # lent, used nothing
    assert standing(owner(1), lent, used, rule).ratio_permille is None
    assert standing(owner(3), lent, used, rule).ratio_permille == 499
    assert standing(owner(3), lent, used, rule).below  # 499 < 500
    newcomer = standing("did:plc:new", lent, {"did:plc:new": ALLOWANCE_MILLI_CPU_SECONDS}, rule)
    assert not newcomer.below  # within the allowance, whatever it lent
    assert not standing(owner(2), lent, used, None).below  # no rule: nobody is below


def test_a_policy_without_a_ratio_sets_no_rule() -> None:
    assert rule_of(None) is None
    assert rule_of(policy(0, 0, "refuse")) is None
    assert rule_of(policy(0, 250, "bogus")) == Rule(250, 7, "after")


# -- the host --------------------------------------------------------------------------------
def test_a_refusing_host_never_offers_a_free_rider_a_slot_but_bids_for_a_contributor() -> None:
    core = host0(policy(0, 500, "refuse"), of_owner(2, "rider1"), of_owner(1, "lender0"))
    out = core.handle(Tick(T0 + 100))
    slots = {b.workload_uri.rsplit("/", 1)[1]: b.slots for b in bids_of(out)}
    assert slots == {"rider1": 0, "lender0": 1}


def test_a_host_in_mode_after_serves_contributors_first_and_defers_free_riders() -> None:
    # owner 1 used more (5 CPU-hours on mesh(0)) than the rider (3), so fair share alone
    # serves the rider first; owner 1 lent 3 of its 5 (600 permille >= 500): it contributes.
    # Room for one 3000 milli-CPU replica.
    lender_use = [usage(0, T0 - k * HOUR, o1=1) for k in range(5)]
    rider = of_owner(2, "rider1", cpu=3000)
    lender = of_owner(1, "lender0", cpu=3000)
    for rule, first in ((policy(0, 0, "after"), "rider1"), (policy(0, 500, "after"), "lender0")):
        core = host0(*lender_use, rule, rider, lender)
        out = core.handle(Tick(T0 + 100))
        got = {b.workload_uri.rsplit("/", 1)[1]: b.slots for b in bids_of(out)}
        assert got[first] == 1 and sum(got.values()) == 1


def test_a_host_in_mode_after_bids_for_a_free_rider_at_the_lowest_priority() -> None:
    core = host0(policy(0, 500, "after"), of_owner(2, "rider1"))
    out = core.handle(Tick(T0 + 100))
    assert [(b.slots, b.priority) for b in bids_of(out)] == [(1, DEFERRED_PRIORITY)]


def test_without_the_rule_the_same_history_changes_no_bid() -> None:
    wls = [of_owner(2, "rider1"), of_owner(1, "lender0")]
    plain = observer(0)
    feed(plain, [*cluster_records(3), *HISTORY, *wls])
    ruled = host0(policy(0, 0, "refuse"), *wls)
    a = sorted((b.workload_uri, b.slots, b.priority) for b in bids_of(plain.handle(Tick(T0 + 100))))
    b = sorted((b.workload_uri, b.slots, b.priority) for b in bids_of(ruled.handle(Tick(T0 + 100))))
    assert a == b and len(a) == 2


def test_a_hosts_own_owner_is_never_below_its_rule() -> None:
    # owner 0 used owner 1's machine and lent nothing, but mesh(0) is its own machine
    core = observer(0)
    feed(core, [*cluster_records(3), *[usage(1, T0 - k * HOUR, o0=1) for k in range(3)]])
    feed(core, [policy(0, 500, "refuse"), of_owner(0, "mine0")])
    out = core.handle(Tick(T0 + 100))
    assert [b.slots for b in bids_of(out)] == [1]


def test_in_mode_after_a_host_keeps_its_room_for_a_contributors_waiting_slot() -> None:
    # lender0's round 0 closed without a bid: its slot waits for a chained round; the
    # rider's round 0 opens now, between two of lender0's chained rounds. Room for one
    # 3000 milli-CPU replica.
    waiting = replace(of_owner(1, "lender0", cpu=3000), created_at=T0 - 11_500)
    rider = of_owner(2, "rider1", cpu=3000)
    core = host0(policy(0, 500, "after"), waiting, rider)
    out = core.handle(Tick(T0 + 100))
    assert [(b.workload_uri, b.slots) for b in bids_of(out)] == [(rider.uri, 0)]
    core = host0(policy(0, 500, "after"), rider)  # nobody waits: the rider is served
    out = core.handle(Tick(T0 + 100))
    assert [(b.workload_uri, b.slots) for b in bids_of(out)] == [(rider.uri, 1)]
