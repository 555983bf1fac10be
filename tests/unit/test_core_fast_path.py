"""The scheduler's fast path (round 0 judged inline through the host table, the non-packing
shortcut, the shared owner tuples) gives exactly the owners of the plain placement rule
(`meshletd.core.placement.reference_owners`), for any cluster and any bids."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshletd.core import (
    Bid,
    Membership,
    MeshletLink,
    MeshletOwner,
    RecordSeen,
    Tick,
    Workload,
)
from meshletd.core.placement import RoundWindow, fill_round0, reference_owners
from meshletd.core.records import (
    NSID_HOST_POLICY,
    NSID_MEMBERSHIP,
    NSID_MESHLET,
    NSID_MESHLET_OWNER,
    HostPolicy,
    ScheduleWindow,
    at_uri,
)

from .core_helpers import CPU, MEM, T0, mesh, observer, owner

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cluster(draw: st.DrawFn, n: int) -> list[object]:
    """n meshlets, each with or without linkage, consent, an arch, a drain (now or past)."""
    out: list[object] = []
    everyone = [owner(i) for i in range(n)]
    for i in range(n):
        if draw(st.integers(0, 4)) or i == 0:  # most are linked
            out.append(MeshletLink(at_uri(owner(i), NSID_MESHLET, "m"), owner(i), mesh(i)))
        drain = draw(st.sampled_from(["no", "now", "past", "no", "no"]))
        out.append(
            MeshletOwner(
                at_uri(mesh(i), NSID_MESHLET_OWNER, "self"),
                mesh(i),
                owner(i),
                CPU,
                MEM,
                state="draining" if drain == "now" else "active",
                state_since=T0 + draw(st.sampled_from([3000, -5000, 1000, 5000, 8000])),
                arch=draw(st.sampled_from(["amd64", "arm64", "amd64"])),
                drains=((T0 + 1000, T0 + 6000),) if drain == "past" else (),
            )
        )
        members = frozenset(everyone) - frozenset(
            draw(st.sets(st.sampled_from(everyone), max_size=2))
        )
        out.append(Membership(at_uri(mesh(i), NSID_MEMBERSHIP, "c"), mesh(i), "c", members))
        policy = draw(host_policy(i))
        if policy is not None:
            out.append(policy)
    # the workload owner's own consent (its cluster "c")
    consent = frozenset(everyone) - frozenset(draw(st.sets(st.sampled_from(everyone), max_size=2)))
    out.append(Membership(at_uri(owner(0), NSID_MEMBERSHIP, "c"), owner(0), "c", consent))
    return out


@st.composite
def host_policy(draw: st.DrawFn, i: int) -> HostPolicy | None:
    """No policy (most), or one that evicts the workload's owner, refuses its image, grants
    some network, or lends in a window that round 0's close may fall in or out of; written
    before or after the rounds close."""
    kind = draw(st.sampled_from(["none", "none", "evict", "image", "network", "schedule"]))
    if kind == "none":
        return None
    minute = (T0 % 86_400_000) // 60_000  # T0's minute of the day
    return HostPolicy(
        uri=at_uri(mesh(i), NSID_HOST_POLICY, "self"),
        meshlet=mesh(i),
        created_at=T0 + draw(st.sampled_from([-60_000, 3000, 5000, 20_000])),
        evicted=frozenset({owner(0)}) if kind == "evict" else frozenset(),
        image_allow=("registry.example/**",) if kind == "image" else None,
        network=draw(st.sampled_from(["none", "internet", "lan"])),
        # T0 is a minute's start: round 0 closes inside [minute, minute + 1), not the other
        schedule=(ScheduleWindow(minute + draw(st.integers(0, 1)), minute + 2),)
        if kind == "schedule"
        else None,
    )


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[object], Workload, list[Bid], list[Bid], int]:
    n = draw(st.integers(3, 9))
    records = draw(cluster(n))
    replicas = draw(st.integers(1, 4))
    wl = Workload(
        uri=at_uri(owner(0), "commune.scheduler.workload", "w"),
        cid="c1",
        owner=owner(0),
        cluster="c",
        milli_cpu=500,
        memory_mib=256,
        replicas=replicas,
        created_at=T0,
        bid_window_ms=2000,
        allow_packing=draw(st.booleans()),
        arch=draw(st.sampled_from([(), (), ("amd64",)])),
        avoid=frozenset(draw(st.sets(st.sampled_from([mesh(i) for i in range(n)]), max_size=1))),
        image="docker.io/library/busybox:1",
        network=draw(st.sampled_from(["internet", "internet", "lan", "none"])),
    )
    bids: list[Bid] = []
    for i in range(n):
        rounds = draw(st.sets(st.integers(1, 3), max_size=2))
        if draw(st.integers(0, 3)):  # most bid in round 0
            rounds.add(0)
        for r in sorted(rounds):
            slot = -1 if r == 0 else draw(st.integers(0, replicas))
            at = (
                T0
                + (0 if r == 0 else 4000 * r)
                + draw(st.sampled_from([700, 0, 2000, 1000, 300, 1500, -300, 2600]))
            )
            bids.append(
                Bid(
                    uri=at_uri(mesh(i), "commune.scheduler.bid", f"b{r}x{slot}"),
                    meshlet=mesh(i),
                    workload_uri=wl.uri,
                    workload_cid=wl.cid,
                    round=r,
                    slot=slot,
                    priority=draw(st.integers(-1, 1)),
                    slots=draw(st.sampled_from([1, 2, 1, 3, 1, 0])),
                    free_milli_cpu=draw(st.sampled_from([CPU, CPU, CPU, CPU, 100])),
                    free_memory_mib=MEM,
                    created_at=at,
                )
            )
    split = draw(st.integers(0, len(bids)))
    now = T0 + draw(st.integers(4000, 30_000))
    return records, wl, bids[:split], bids[split:], now


@SETTINGS
@given(scenario())
def test_the_fast_path_gives_the_owners_of_the_plain_rule(scen) -> None:
    records, wl, first, second, now = scen
    core = observer()  # mesh(99): not in the cluster, it only watches
    core.handle_batch([RecordSeen(r) for r in [*records, wl, *first]])  # type: ignore[arg-type]
    core.handle(Tick(now))  # round 0 closed: resolved with a cold host table
    # late bids: resolved again, through a warm host table
    core.handle_batch([RecordSeen(b) for b in second])
    got = core.placement()[wl.uri]
    e = core.workloads[wl.uri]
    early = e.early or set()

    def closed(slot: int, rw: RoundWindow, _owner: object) -> bool:
        return now >= rw.close or (slot, rw.round) in early

    assert got == reference_owners(core.cluster, core.t, wl, e.bids, closed)


@given(
    st.lists(st.integers(0, 4), max_size=8),
    st.integers(1, 6),
)
def test_without_packing_round_0_gives_one_slot_to_each_bidder_in_rank_order(
    offers: list[int], replicas: int
) -> None:
    ranked = [
        Bid(f"at://{mesh(i)}/b/0", mesh(i), "w", "", 0, -1, 0, k, CPU, MEM, T0)
        for i, k in enumerate(offers)
    ]
    # the shortcut in `Rounds._resolve` when packing is not allowed
    shortcut = [b.meshlet for b in ranked[:replicas]]
    shortcut += [None] * (replicas - len(shortcut))
    assert fill_round0(ranked, replicas, False) == shortcut
    packed = fill_round0(ranked, replicas, True)
    assert sum(1 for m in packed if m is not None) == min(
        replicas, sum(min(k, replicas) for k in offers)
    )
