"""What one member's records make a meshlet remember is bounded per writer (docs/protocol.md,
section 20; issue #15, point 10): live workloads per owner, bids per meshlet and workload,
usage records per meshlet, membership records per repo, one status URI per (meshlet, slot).
Each bound keeps a choice every observer makes alike from the records (smallest keys, newest
periods), whatever order they arrived in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshletd.core import (
    Membership,
    RecordDeleted,
    RecordSeen,
    StopReplica,
    Tick,
    Usage,
    UsageEntry,
    WorkloadStatus,
    bounds,
)
from meshletd.core.cluster import ClusterView
from meshletd.core.ledger import UsageLedger
from meshletd.core.records import NSID_BID, NSID_MEMBERSHIP, NSID_STATUS, NSID_USAGE, at_uri
from meshletd.core.timing import DEFAULT_TIMING

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, owner, workload

CLOSE = T0 + 2000 + 2000


def test_an_owner_s_workloads_beyond_the_bound_take_no_part_and_observers_agree() -> None:
    n = bounds.WORKLOADS_PER_OWNER + 8
    wls = [workload(f"w{i:04d}", owner_i=2) for i in range(n)]
    cores = [observer(5), observer(6)]
    for core, order in zip(cores, (wls, wls[::-1]), strict=True):
        core.handle_batch([RecordSeen(r) for r in [*cluster_records(3), *order]])
    kept = [sorted(core.workloads) for core in cores]
    assert kept[0] == kept[1] == sorted(w.uri for w in wls[: bounds.WORKLOADS_PER_OWNER])
    assert (
        wls[-1].uri in cores[0].refused and "smaller record keys" in cores[0].refused[wls[-1].uri]
    )
    # another owner is not affected by the flood
    other = workload("w9999", owner_i=1)
    feed(cores[0], [other])
    assert other.uri in cores[0].workloads


def test_a_workload_set_aside_by_a_smaller_key_stops_here_and_takes_part_when_seen_with_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("meshletd.core.scheduler.WORKLOADS_PER_OWNER", 2)
    core = observer(0)
    a, c = workload("a", owner_i=2), workload("c", owner_i=2)
    feed(core, [*cluster_records(3), a, c, bid(c, 0, priority=2)])
    core.handle(Tick(CLOSE))
    assert core.placement()[c.uri] == ((0, mesh(0)),)
    out = core.handle(RecordSeen(workload("b", owner_i=2)))  # a smaller key than c's
    assert [s.workload_uri for s in out if isinstance(s, StopReplica)] == [c.uri]
    assert c.uri not in core.workloads and c.uri in core.refused
    assert "smaller record keys" in core.pending_reasons(c.uri)[0]  # what its owner is shown
    core.handle(Tick(CLOSE + 1))
    assert core.replicas().get((c.uri, 0)) in (None, "stopping")
    # room again (b deleted), and c seen again (a new version, a start-up read): it takes part
    core.handle(RecordDeleted(workload("b", owner_i=2).uri))
    core.handle(RecordSeen(c))
    assert c.uri in core.workloads and c.uri not in core.refused
    core.handle(RecordDeleted(c.uri))
    assert core.pending_reasons(c.uri) == {}


def test_a_meshlet_s_bids_for_one_workload_beyond_the_bound_count_nowhere() -> None:
    wl = workload(owner_i=2)
    flood = [
        replace(bid(wl, 1, round_=r, slot=0), uri=at_uri(mesh(1), NSID_BID, f"f{r:05d}"))
        for r in range(1, bounds.BIDS_PER_MESHLET + 100)
    ]
    honest = bid(wl, 2)
    cores = [observer(5), observer(6)]
    for core, order in zip(cores, (flood, flood[::-1]), strict=True):
        feed(core, [*cluster_records(3), wl, honest])
        core.handle_batch([RecordSeen(b) for b in order])
    kept = [sorted(b.uri for b in core.workloads[wl.uri].bids) for core in cores]
    assert kept[0] == kept[1]
    assert len(kept[0]) == bounds.BIDS_PER_MESHLET + 1  # the flooder's smallest, the honest
    assert honest.uri in kept[0] and flood[-1].uri not in kept[0]
    assert flood[0].uri in kept[0]


def test_usage_records_kept_per_meshlet_are_its_newest() -> None:
    ledger = UsageLedger(mesh(0), DEFAULT_TIMING)
    hour = 3_600_000

    def usage(m: int, i: int) -> Usage:
        return Usage(
            at_uri(mesh(m), NSID_USAGE, f"u{i:05d}"),
            mesh(m),
            T0 + i * hour,
            T0 + (i + 1) * hour,
            (UsageEntry(owner(1), 1000),),
        )

    ledger.put_usage(usage(2, 0))
    for i in range(bounds.USAGES_PER_MESHLET + 50):
        ledger.put_usage(usage(1, bounds.USAGES_PER_MESHLET + 50 - i))
    mine = [u for u in ledger.usages.values() if u.meshlet == mesh(1)]
    assert len(mine) == bounds.USAGES_PER_MESHLET
    assert min(u.period_start for u in mine) == T0 + 51 * hour
    assert usage(2, 0).uri in ledger.usages  # another meshlet's are not affected


def test_a_repo_s_memberships_beyond_the_bound_count_nowhere() -> None:
    view = ClusterView()
    n = bounds.MEMBERSHIPS_PER_REPO + 6
    for i in reversed(range(n)):
        name = f"c{i:03d}"
        view.put_membership(
            Membership(at_uri(mesh(1), NSID_MEMBERSHIP, name), mesh(1), name, frozenset([owner(i)]))
        )
    assert view.consent_of(mesh(1)) == frozenset(
        owner(i) for i in range(bounds.MEMBERSHIPS_PER_REPO)
    )
    assert view.membership(mesh(1), f"c{n - 1:03d}") is None


def test_status_records_of_one_slot_under_many_keys_are_remembered_once() -> None:
    wl = workload(owner_i=2)
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=2)])
    core.handle(Tick(CLOSE))
    for i in range(200):
        st = WorkloadStatus(
            at_uri(mesh(1), NSID_STATUS, f"s{i}"), mesh(1), wl.uri, 0, 0, "running", CLOSE + i
        )
        core.handle(RecordSeen(st))
    assert len(core._status_keys) <= 2  # mesh(1)'s newest (and our own)
