"""Round 0 counts only bids from meshlets that may host the workload, in a large cluster
too: a meshlet without consent, with a one-way link, or excluded by avoidMeshlets never
wins, whichever path (plain or constrained workload) the core takes to judge it."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from meshletd.core import Membership, MeshletLink, Tick
from meshletd.core.cluster import ClusterView
from meshletd.core.hashing import own_score, rendezvous_score
from meshletd.core.records import NSID_MEMBERSHIP, NSID_MESHLET, at_uri

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, owner, workload

N = 70  # above the small-cluster limit: no early close, each meshlet samples itself


def _records(no_consent: set[int], one_way: set[int]) -> list[object]:
    members = frozenset(owner(i) for i in range(N))
    out: list[object] = []
    for r in cluster_records(N):
        if isinstance(r, MeshletLink) and int(r.meshlet[-3:]) in one_way:
            continue  # the owner's repo does not name this meshlet
        if isinstance(r, Membership) and int(r.repo[-3:]) in no_consent:
            r = Membership(at_uri(r.repo, NSID_MEMBERSHIP, "c"), r.repo, "c", members - {owner(0)})
        out.append(r)
    # the observer's own records (mesh(99) is outside the commune otherwise)
    out.append(MeshletLink(at_uri(owner(99), NSID_MESHLET, "m"), owner(99), mesh(99)))
    return out


@settings(max_examples=40, deadline=None)
@given(
    bidders=st.sets(st.integers(1, N - 1), min_size=1, max_size=12),
    no_consent=st.sets(st.integers(1, N - 1), max_size=6),
    one_way=st.sets(st.integers(1, N - 1), max_size=6),
    avoid=st.sets(st.integers(1, N - 1), max_size=3),
    replicas=st.integers(1, 3),
)
def test_round_zero_goes_to_the_best_eligible_bidders(
    bidders: set[int], no_consent: set[int], one_way: set[int], avoid: set[int], replicas: int
) -> None:
    records = _records(no_consent, one_way)
    wl = workload("wq", replicas)
    if avoid:
        wl = dataclasses.replace(wl, avoid=frozenset(mesh(i) for i in avoid))
    view = ClusterView()
    for r in records:
        if isinstance(r, MeshletLink):
            view.put_link(r)
        elif isinstance(r, Membership):
            view.put_membership(r)
        else:
            view.put_owner(r)  # type: ignore[arg-type]
    ok = [i for i in sorted(bidders) if view.eligible(wl, mesh(i))]
    ok.sort(key=lambda i: rendezvous_score(wl.uri, 0, -1, mesh(i)))
    want = [mesh(i) for i in ok[:replicas]]

    core = observer()
    # a first workload, resolved before, fills the core's table of verified hosts
    warm = workload("warm", 1, created=T0 - 60_000)
    feed(core, [*records, warm, *(bid(warm, i) for i in range(1, N))])
    core.handle(Tick(T0))
    feed(core, [wl, *(bid(wl, i) for i in sorted(bidders))])
    core.handle(Tick(T0 + 60_000))
    owners = core.placement()[wl.uri]
    assert [o[1] for o in owners if o is not None] == want


def test_a_meshlets_own_score_is_the_rendezvous_score() -> None:
    for i in range(20):
        args = (f"at://did:plc:o/commune.scheduler.workload/w{i}", 0, -1, mesh(i))
        assert own_score(*args) == rendezvous_score(*args)
