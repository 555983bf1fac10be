"""A host's published policy decides what it lends and to whom, and every observer judges it
the same (docs/protocol.md, section 21): evicted owners, image sources, network, lending
schedule, job run time and per-owner caps, each a rule of the pure core."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.records import record_from_json
from meshletd.core import (
    Bid,
    MeshletIdentity,
    PutRecord,
    ReplicaStateChanged,
    Scheduler,
    StartReplica,
    StopReplica,
    Tick,
    Workload,
    WorkloadStatus,
)
from meshletd.core.policy import (
    admits,
    image_accepted,
    normalise_image,
    open_at,
    owner_cap,
    refusal,
    runtime_limit_s,
)
from meshletd.core.records import (
    NSID_HOST_POLICY,
    NSID_STATUS,
    HostPolicy,
    OwnerCap,
    ScheduleWindow,
    at_uri,
)
from meshletd.errors import InvalidRecord

from .core_helpers import CPU, MEM, T0, bid, cluster_records, feed, mesh, observer, owner, workload

CLOSE = T0 + 2000 + 2000  # createdAt + bidWindowMs + settle
# T0 = 2027-01-15T08:00:00Z, a Friday (weekday 4)
T0_MINUTE = (T0 % 86_400_000) // 60_000


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def my_bids(out: list[object]) -> list[Bid]:
    return [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]


def policy(i: int, created: int = T0 - 60_000, **kw: object) -> HostPolicy:
    return HostPolicy(at_uri(mesh(i), NSID_HOST_POLICY, "self"), mesh(i), created, **kw)  # type: ignore[arg-type]


def image_wl(image: str, **kw: object) -> Workload:
    return replace(workload(owner_i=2, **kw), image=image)  # type: ignore[arg-type]


# -- the rules, pure -------------------------------------------------------------------------
def test_short_image_names_are_normalised_as_the_distribution_does() -> None:
    assert normalise_image("busybox") == "docker.io/library/busybox"
    assert normalise_image("alice/app:1") == "docker.io/alice/app:1"
    assert normalise_image("localhost/busybox:latest") == "localhost/busybox:latest"
    assert normalise_image("registry.example:5000/a/b@sha256:00") == (
        "registry.example:5000/a/b@sha256:00"
    )


def test_image_patterns_match_the_whole_reference_and_star_stays_in_one_component() -> None:
    p = policy(0, image_allow=("registry.example:5000/alice/*", "docker.io/library/**"))
    assert image_accepted(p, "registry.example:5000/alice/app:1")
    assert not image_accepted(p, "registry.example:5000/alice/team/app:1")
    assert not image_accepted(p, "registry.example:5000/bob/app")
    assert not image_accepted(p, "registry.example:50000/alice/app")
    assert image_accepted(p, "busybox:1.36")
    assert not image_accepted(p, "mallory/busybox")
    assert not image_accepted(policy(0, image_allow=()), "busybox")  # empty list: none
    assert image_accepted(policy(0), "anything.example/x")  # absent: any source


def test_digests_only_refuses_tags() -> None:
    p = policy(0, digests_only=True)
    assert not image_accepted(p, "busybox:1.36")
    assert image_accepted(p, "busybox@sha256:" + "a" * 64)


def test_a_host_grants_a_network_and_whatever_is_less() -> None:
    lan, internet, none = (
        image_wl(
            "busybox",
        )
        for _ in range(3)
    )
    lan, none = replace(lan, network="lan"), replace(none, network="none")
    assert refusal(policy(0), lan) == "network"  # the default grants internet only
    assert refusal(policy(0), internet) is None
    assert refusal(policy(0, network="none"), internet) == "network"
    assert refusal(policy(0, network="none"), none) is None
    assert refusal(policy(0, network="lan"), lan) is None
    assert refusal(policy(0, network="future-thing"), none) is None  # unknown grants none
    assert refusal(policy(0, network="future-thing"), internet) == "network"


def test_schedule_windows_are_utc_weekdays_and_minutes_of_the_close_time() -> None:
    friday = frozenset({4})
    p = policy(0, schedule=(ScheduleWindow(T0_MINUTE, T0_MINUTE + 60, friday),))
    assert open_at(p, T0) and open_at(p, T0 + 59 * 60_000)
    assert not open_at(p, T0 + 60 * 60_000)  # end is outside
    assert not open_at(p, T0 - 1)
    assert not open_at(p, T0 + 7 * 86_400_000 - 86_400_000)  # Thursday next week
    assert open_at(p, T0 + 7 * 86_400_000)  # Friday next week
    assert not open_at(policy(0, schedule=()), T0)  # empty: never
    assert open_at(policy(0), T0)  # absent: always


def test_a_policy_judges_only_rounds_that_close_after_it_was_written() -> None:
    wl = replace(workload(owner_i=2), image="busybox")
    p = policy(0, created=T0 + 10_000, evicted=frozenset({owner(2)}))
    assert admits(p, wl, T0 + 9_999)
    assert not admits(p, wl, T0 + 10_000)


def test_a_job_declaring_more_run_time_than_the_host_allows_is_refused() -> None:
    job = replace(workload(kind="job"), max_runtime_s=7200)
    p = policy(0, job_max_runtime_s=3600)
    assert refusal(p, job) == "maxRuntime"
    assert refusal(p, replace(job, max_runtime_s=60)) is None
    assert refusal(p, replace(job, max_runtime_s=None)) is None  # stopped after 3600 s
    assert runtime_limit_s(p, replace(job, max_runtime_s=None)) == 3600
    assert runtime_limit_s(p, replace(job, max_runtime_s=60)) == 60
    assert runtime_limit_s(None, job) == 7200
    assert runtime_limit_s(p, workload()) is None  # services run on


def test_owner_caps_are_a_share_of_each_part_of_the_contribution() -> None:
    p = policy(0, default_share=250, caps=(OwnerCap(owner(1), 500), OwnerCap(owner(1), 10)))
    assert owner_cap(p, owner(2), 4000, 8192, 16) == (1000, 2048, 4)
    assert owner_cap(p, owner(1), 4000, 8192, None) == (2000, 4096, None)  # first cap counts
    assert owner_cap(None, owner(1), 4000, 8192, 16) == (4000, 8192, 16)


# -- observers: which bids count -----------------------------------------------------------
def test_an_evicted_owners_workload_gets_no_slot_from_the_evicting_host() -> None:
    wl = replace(workload(replicas=1, owner_i=2), image="busybox")
    core = observer()
    feed(core, [*cluster_records(3), policy(0, evicted=frozenset({owner(2)})), wl])
    feed(core, [bid(wl, 0, priority=5), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)


def test_a_policy_written_after_a_round_closed_does_not_re_judge_it() -> None:
    wl = replace(workload(replicas=1, owner_i=2), image="busybox")
    core = observer()
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=5), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(0)),)
    feed(core, [policy(0, created=CLOSE + 1, evicted=frozenset({owner(2)}))])
    core.handle(Tick(CLOSE + 10))
    assert core.placement()[wl.uri] == ((0, mesh(0)),)  # moves by a new round only


def test_a_workload_needing_the_lan_is_eligible_only_where_a_policy_grants_it() -> None:
    wl = replace(workload(replicas=2, owner_i=2), image="busybox", network="lan")
    core = observer()
    feed(core, [*cluster_records(3), policy(1, network="lan"), wl])
    feed(core, [bid(wl, 0, priority=5), bid(wl, 1), bid(wl, 2)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)), None)


def test_a_host_outside_its_schedule_gets_no_new_slot_but_keeps_what_it_runs() -> None:
    wl = replace(workload(replicas=1, owner_i=2), image="busybox")
    closed = policy(0, schedule=(ScheduleWindow(0, T0_MINUTE),))  # closes at T0's minute
    core = observer()
    feed(core, [*cluster_records(3), closed, wl, bid(wl, 0, priority=5), bid(wl, 1)])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)
    opened = policy(0, schedule=(ScheduleWindow(0, 1440),))
    core2 = observer()
    feed(core2, [*cluster_records(3), opened, wl, bid(wl, 0, priority=5), bid(wl, 1)])
    core2.handle(Tick(CLOSE))
    assert core2.placement()[wl.uri] == ((0, mesh(0)),)


# -- the host itself -------------------------------------------------------------------------
def host(i: int = 0, max_replicas: int | None = None) -> Scheduler:
    core = Scheduler(MeshletIdentity(mesh(i), owner(i), CPU, MEM, max_replicas=max_replicas))
    core.handle(Tick(T0))
    return core


def test_a_refused_image_source_is_never_bid_on() -> None:
    core = host(0)
    allow = policy(0, image_allow=("registry.example:5000/**",))
    bad = image_wl("docker.io/mallory/miner:1")
    good = replace(image_wl("registry.example:5000/alice/app:1"), uri=bad.uri + "g")
    feed(core, [*cluster_records(3), allow, bad, good])
    out = core.handle(Tick(T0 + 100))
    assert [b.workload_uri for b in my_bids(out)] == [good.uri]


def test_outside_its_lending_window_a_host_declines_and_inside_it_bids() -> None:
    wl = image_wl("busybox")
    core = host(0)
    feed(core, [*cluster_records(3), policy(0, schedule=(ScheduleWindow(0, T0_MINUTE),)), wl])
    out = core.handle(Tick(T0 + 100))
    assert [b.slots for b in my_bids(out)] == [0]  # a decline: early close still works
    core = host(0)
    feed(core, [*cluster_records(3), policy(0, schedule=(ScheduleWindow(T0_MINUTE, 1440),)), wl])
    out = core.handle(Tick(T0 + 100))
    assert [b.slots for b in my_bids(out)] == [1]


def test_a_host_bids_for_an_owner_only_up_to_its_cap() -> None:
    # a quarter of 4000 milli-CPU for anyone: two 500 milli-CPU replicas, not three
    core = host(0)
    cap = policy(0, default_share=250)
    wls = [
        replace(
            image_wl("busybox", cpu=500),
            uri=at_uri(owner(2), "commune.scheduler.workload", f"w{k}"),
        )
        for k in range(3)
    ]
    feed(core, [*cluster_records(3), cap, *wls])
    out = core.handle(Tick(T0 + 100))
    assert sorted(b.slots for b in my_bids(out)) == [0, 1, 1]
    other = replace(
        image_wl("busybox", cpu=500),
        uri=at_uri(owner(1), "commune.scheduler.workload", "x"),
        owner=owner(1),
    )
    feed(core, [other])
    out = core.handle(Tick(T0 + 200))
    assert [b.slots for b in my_bids(out)] == [1]  # another owner has its own share


def placed_on_0(wl: Workload) -> Scheduler:
    """mesh(0) has won slot 0 of wl in round 0 and runs it."""
    core = host(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=5), bid(wl, 1)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    assert core.replicas() == {(wl.uri, 0): "running"}
    return core


def test_evicting_an_owner_moves_its_replicas_make_before_break_with_the_reason() -> None:
    wl = image_wl("busybox")
    core = placed_on_0(wl)
    out = feed(core, [policy(0, created=CLOSE + 100, evicted=frozenset({owner(2)}))])
    opened = my_bids(out)
    assert [(b.round, b.slot, b.slots) for b in opened] == [(1, 0, 0)]  # re-offered
    st = [a.record for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert st and st[-1].state == "running" and "evicted" in (st[-1].message or "")
    assert of(out, StopReplica) == []
    # mesh(1) wins round 1; mesh(0) stops only once mesh(1) runs the slot
    feed(core, [bid(wl, 1, round_=1, slot=0, at=opened[0].created_at + 10)])
    out = core.handle(Tick(opened[0].created_at + 3000))
    assert core.placement()[wl.uri] == ((1, mesh(1)),)
    assert of(out, StopReplica) == []
    running = WorkloadStatus(
        at_uri(mesh(1), NSID_STATUS, "s"), mesh(1), wl.uri, 0, 1, "running", CLOSE + 9000
    )
    out = feed(core, [running])
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "policy")]


def test_lowering_an_owners_cap_re_offers_the_slots_past_it() -> None:
    wls = [
        replace(
            image_wl("busybox", cpu=1000),
            uri=at_uri(owner(2), "commune.scheduler.workload", f"w{k}"),
        )
        for k in range(2)
    ]
    core = host(0)
    feed(core, [*cluster_records(3), *wls])
    feed(core, [bid(w, 0, priority=5) for w in wls] + [bid(w, 1) for w in wls])
    core.handle(Tick(CLOSE))
    for w in wls:
        core.handle(ReplicaStateChanged(w.uri, 0, "running"))
    out = feed(core, [policy(0, created=CLOSE + 100, default_share=250)])  # 1000 milli-CPU
    assert [(b.workload_uri, b.round, b.slots) for b in my_bids(out)] == [(wls[1].uri, 1, 0)]


def test_a_host_does_not_start_a_slot_its_policy_refuses_it_learnt_late() -> None:
    wl = image_wl("busybox")
    core = host(0)
    feed(core, [*cluster_records(3), policy(0, created=CLOSE + 100, evicted=frozenset({owner(2)}))])
    feed(core, [wl, bid(wl, 0, priority=5), bid(wl, 1)])
    out = core.handle(Tick(CLOSE + 200))
    assert core.placement()[wl.uri] == ((0, mesh(0)),)  # the round closed before the policy
    assert of(out, StartReplica) == []
    assert [(b.round, b.slots) for b in my_bids(out)] == [(1, 0)]


@pytest.mark.parametrize("declared", [None, 30])
def test_a_job_is_stopped_after_its_run_time_and_reported_failed(declared: int | None) -> None:
    job = replace(image_wl("busybox", kind="job"), max_runtime_s=declared)
    core = host(0)
    feed(core, [*cluster_records(3), policy(0, job_max_runtime_s=60), job])
    feed(core, [bid(job, 0, priority=5), bid(job, 1)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(job.uri, 0, "running"))
    limit = (declared or 60) * 1000
    assert of(core.handle(Tick(CLOSE + limit - 1)), StopReplica) == []
    out = core.handle(Tick(CLOSE + limit))
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "maxRuntime")]
    st = [a.record for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert [(s.state, s.message) for s in st] == [("failed", "maxRuntime")]
    core.handle(ReplicaStateChanged(job.uri, 0, "exited", 137))
    core.handle(ReplicaStateChanged(job.uri, 0, "stopped"))
    assert of(core.handle(Tick(CLOSE + limit + 120_000)), StartReplica) == []


def test_a_job_declaring_more_time_than_a_host_allows_is_not_bid_on_there() -> None:
    job = replace(image_wl("busybox", kind="job"), max_runtime_s=7200)
    core = host(0)
    feed(core, [*cluster_records(3), policy(0, job_max_runtime_s=3600), job])
    assert my_bids(core.handle(Tick(T0 + 100))) == []


def test_why_pending_says_when_every_host_policy_refuses_a_workload() -> None:
    wl = replace(workload(replicas=1, owner_i=2), image="busybox", network="lan")
    core = observer()
    feed(core, [*cluster_records(3), wl])
    core.handle(Tick(CLOSE + 10_000))
    reasons = core.pending_reasons(wl.uri)
    assert "host policy refuses it" in reasons[0], reasons
    assert "network" in reasons[0]


def test_image_patterns_match_by_path_component_and_double_star_spans_components() -> None:
    from meshletd.core.policy import pattern_matches

    assert pattern_matches("reg.example/alice/**", "reg.example/alice/a/b/c:1")
    assert pattern_matches("reg.example/**/app:*", "reg.example/alice/team/app:2")
    assert pattern_matches("**", "docker.io/library/busybox")
    assert not pattern_matches("reg.example/**/app:*", "reg.example/alice/team/web:2")
    assert pattern_matches("reg.example/a*e/*", "reg.example/alice/x")
    assert not pattern_matches("reg.example*/alice/*", "reg.example.evil/bob/x")
    assert pattern_matches("*/alice/*@sha256:*", "reg.example/alice/app@sha256:00")


def test_a_hostile_pattern_costs_no_backtracking() -> None:
    import time

    from meshletd.core.policy import pattern_matches

    pattern = "/".join(["*a" * 100 + "*b"] + ["**"] * 20)  # exponential for a regex
    ref = "/".join(["a" * 500] + ["x"] * 10)
    t0 = time.perf_counter()
    assert not pattern_matches(pattern, ref)
    assert not pattern_matches("/".join(["**", "*a*a*a*a*a*b"] * 16), "/".join(["a" * 30] * 16))
    assert time.perf_counter() - t0 < 0.5


# -- hostile records: any policy the lexicon admits is judged without an error -----------------

_text = st.text(min_size=0, max_size=40)
_did = st.sampled_from(["did:plc:owner002", "did:plc:x", "did:web:a.example"])
_policy_values = st.fixed_dictionaries(
    {"createdAt": st.sampled_from(["2027-01-15T08:00:00.000Z", "0001-01-01T00:00:00Z"])},
    optional={
        "owners": st.fixed_dictionaries(
            {},
            optional={
                "defaultShare": st.integers(-5, 1200),
                "caps": st.lists(
                    st.fixed_dictionaries({"did": _did, "share": st.integers(0, 1001)}),
                    max_size=4,
                ),
            },
        ),
        "evicted": st.lists(_did, max_size=3),
        "images": st.fixed_dictionaries(
            {},
            optional={
                "allow": st.lists(st.one_of(_text, st.just("**"), st.just("*/*")), max_size=4),
                "digestsOnly": st.booleans(),
            },
        ),
        "network": st.one_of(st.sampled_from(["none", "internet", "lan"]), _text),
        "schedule": st.lists(
            st.fixed_dictionaries(
                {"start": st.integers(-1, 1441), "end": st.integers(-1, 1441)},
                optional={"days": st.lists(st.integers(-1, 8), max_size=8)},
            ),
            max_size=4,
        ),
        "jobMaxRuntimeS": st.integers(-1, 40_000_000),
        "extra": st.integers(),
    },
)


@settings(max_examples=300, deadline=None)
@given(_policy_values, st.integers(0, 3_000_000_000))
def test_any_policy_the_lexicon_admits_is_judged_without_an_error(value, dt) -> None:
    uri = at_uri(mesh(0), NSID_HOST_POLICY, "self")
    try:
        default_lexicons().validate_record(NSID_HOST_POLICY, value, rkey="self")
    except InvalidRecord:
        return  # refused at intake: takes no part
    pol = record_from_json(uri, "cid", value)
    assert isinstance(pol, HostPolicy)
    for wl in (
        image_wl("busybox"),
        replace(image_wl("reg.example/a/b:1", kind="job"), network="lan", max_runtime_s=5),
    ):
        refusal(pol, wl)
        admits(pol, wl, T0 + dt)
    core = observer()
    feed(core, [*cluster_records(3), pol, image_wl("busybox")])
    core.handle(Tick(CLOSE))


def test_taking_an_eviction_back_clears_the_reason_from_the_status() -> None:
    wl = image_wl("busybox")
    core = placed_on_0(wl)
    feed(core, [policy(0, created=CLOSE + 100, evicted=frozenset({owner(2)}))])
    out = feed(core, [policy(0, created=CLOSE + 200)])
    st = [a.record for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert [(s.state, s.message) for s in st] == [("running", None)]


def test_a_replica_that_exited_is_not_restarted_once_its_host_s_policy_refuses_it() -> None:
    # Simulator chaos seed 71 (on 3d5ee03): a replica crashing in a loop was restarted in
    # place after its host published a policy refusing its image; only new slots were
    # checked.
    wl = image_wl("busybox")
    core = placed_on_0(wl)
    core.handle(Tick(CLOSE + 50))
    core.handle(ReplicaStateChanged(wl.uri, 0, "exited", exit_code=1))
    out = feed(core, [policy(0, created=CLOSE + 100, evicted=frozenset({owner(2)}))])
    assert [(b.round, b.slots) for b in my_bids(out)] == [(1, 0)]  # re-offered
    starts = []
    for k in range(1, 30):  # past every restart it would have had
        starts += of(core.handle(Tick(CLOSE + 100 + k * 1000)), StartReplica)
    assert starts == []
    # The host takes the eviction back; nobody else took the slot: it runs here again.
    feed(core, [policy(0, created=CLOSE + 40_000)])
    for k in range(1, 70):
        starts += of(core.handle(Tick(CLOSE + 40_000 + k * 1000)), StartReplica)
    assert [(a.workload.uri, a.slot) for a in starts] == [(wl.uri, 0)]


def test_a_paused_replica_is_not_resumed_on_a_host_whose_policy_now_refuses_it() -> None:
    wl = image_wl("busybox")
    core = placed_on_0(wl)
    feed(core, [replace(wl, cid="c2", paused=True)])
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    assert core.replicas() == {(wl.uri, 0): "paused"}
    feed(core, [policy(0, created=CLOSE + 100, evicted=frozenset({owner(2)}))])
    out = feed(core, [replace(wl, cid="c3", paused=False)])
    for k in range(1, 10):
        out += core.handle(Tick(CLOSE + 200 + k * 1000))
    assert of(out, StartReplica) == []
