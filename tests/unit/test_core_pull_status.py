"""A replica's status says how far its image pull is, and why a pull failed."""

from __future__ import annotations

from meshletd.core import PutRecord, ReplicaStateChanged, Tick, WorkloadStatus

from .core_helpers import T0, bid, cluster_records, feed, observer, workload

CLOSE = T0 + 2000 + 2000


def statuses(actions: list[object]) -> list[tuple[str, str | None]]:
    return [
        (a.record.state, a.record.message)
        for a in actions
        if isinstance(a, PutRecord) and isinstance(a.record, WorkloadStatus)
    ]


def starting_core():  # type: ignore[no-untyped-def]
    wl = workload(replicas=1, owner_i=2)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0, priority=2)])
    core.handle(Tick(CLOSE))
    return core, wl


def test_pull_progress_is_in_the_status_until_the_replica_runs() -> None:
    core, wl = starting_core()
    first = core.handle(ReplicaStateChanged(wl.uri, 0, "pulling", message="layer 0 of 2"))
    same = core.handle(ReplicaStateChanged(wl.uri, 0, "pulling", message="layer 0 of 2"))
    more = core.handle(ReplicaStateChanged(wl.uri, 0, "pulling", message="layer 1 of 2"))
    running = core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    assert statuses(first) == [("pulling", "layer 0 of 2")]
    assert statuses(same) == []  # written on change only
    assert statuses(more) == [("pulling", "layer 1 of 2")]
    assert statuses(running) == [("running", None)]


def test_a_failed_pull_says_why_in_the_status_while_it_waits_to_retry() -> None:
    core, wl = starting_core()
    why = "ImageUnauthorized: r/x@sha256:...: the registry refused access"
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "failed", message=why))
    # not "failed": that is terminal for every observer, and this replica will try again
    assert statuses(out) == [("pending", why)]
    long = core.handle(ReplicaStateChanged(wl.uri, 0, "failed", message="x" * 5000))
    ((state, message),) = statuses(long)
    assert state == "pending" and message is not None and len(message) == 256
