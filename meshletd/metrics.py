"""Prometheus counters of what this meshletd did and saw (served at the web page's /metrics).

Counted at the engine and the adapters, never in the pure core: the core's actions are
counted when the engine carries them out, record events when the node takes them. One
registry per process (a process runs one meshletd; tests read differences). Gauges that
describe the view (replicas by state, members, write queue depth) are computed at scrape
time by meshletd/web/metrics.py from the node itself.

Names follow Prometheus conventions: `meshlet_` prefix, `_total` on counters, base units.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from meshletd.jsonvalue import RecordChange

# `*_created` series (a timestamp per counter) double the output and tell nobody anything.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, open fds, CPU seconds

# Write points of the PDS budget (DESIGN "Write economy"): create 3, update 2, delete 1.
POINTS = {"create": 3, "update": 2, "delete": 1}

BIDS_WRITTEN = Counter(
    "meshlet_bids_written",
    "Bids this meshlet wrote, by decision (offer: slots >= 1; decline: slots = 0).",
    ["decision"],
    registry=REGISTRY,
)
BIDS_SEEN = Counter(
    "meshlet_bids_seen",
    "Bid records of the commune this meshlet took in, by decision.",
    ["decision"],
    registry=REGISTRY,
)
ROUNDS_OPENED = Counter(
    "meshlet_rounds_opened",
    "Rounds this meshlet saw open (the first bid of a round), by kind "
    "(first: round 0 of a workload; replacement: round >= 1 of a slot).",
    ["kind"],
    registry=REGISTRY,
)
ROUNDS_WON = Counter(
    "meshlet_rounds_won",
    "Slots this meshlet won and started a replica for, by kind (first or replacement).",
    ["kind"],
    registry=REGISTRY,
)
PLACEMENTS_SEEN = Counter(
    "meshlet_placements_seen",
    "Replicas of the commune reported placed and running (a workloadStatus record reaching "
    "state running for a new slot and round).",
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "meshlet_failovers",
    "Replacement placements this meshlet saw (a replica reported running in round >= 1).",
    registry=REGISTRY,
)
REPLICA_STOPS = Counter(
    "meshlet_replica_stops",
    "Replicas this meshlet stopped because the scheduler said so.",
    registry=REGISTRY,
)
WRITES = Counter(
    "meshlet_pds_writes",
    "Records this meshlet queued for its PDS, by collection and operation.",
    ["collection", "operation"],
    registry=REGISTRY,
)
WRITE_POINTS = Counter(
    "meshlet_pds_write_points",
    "PDS write points spent (create 3, update 2, delete 1), by collection.",
    ["collection"],
    registry=REGISTRY,
)
PROBE_FAILURES = Counter(
    "meshlet_probe_failures",
    "Liveness probes of peers that failed or timed out.",
    registry=REGISTRY,
)
PROBES = Counter("meshlet_probes", "Liveness probes of peers sent.", registry=REGISTRY)
FIREHOSE_RECONNECTS = Counter(
    "meshlet_firehose_reconnects",
    "Times a firehose subscription was lost and reconnected.",
    registry=REGISTRY,
)

FAILOVER_SECONDS = Histogram(
    "meshlet_failover_seconds",
    "Failover duration as this meshlet saw it: from the first sign that a slot lost its "
    "host (this meshlet writing, or taking in, the first bid of a replacement round >= 1 "
    "for the slot) to a workloadStatus of that slot reported running in a round >= 1. "
    "Repeated rounds for the same slot count from the first.",
    buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600),
    registry=REGISTRY,
)
FIREHOSE_LAG = Gauge(
    "meshlet_firehose_lag_seconds",
    "Now (this host's wall clock) minus the `time` of the last firehose frame taken in, by "
    "PDS (frames replayed after a reconnect show as lag; negative means clock skew).",
    ["pds"],
    registry=REGISTRY,
)

# Monotonic clock of the failover histogram (tests replace it).
clock: Callable[[], float] = time.monotonic
# (workload URI, slot) -> when its replacement round was first seen; bounded.
_failing: dict[tuple[str, int], float] = {}
_FAILING_MAX = 10_000


def kind_of(round_: int) -> str:
    return "first" if round_ == 0 else "replacement"


def count_write(collection: str, operation: str) -> None:
    """One write queued (`create`, `update` or `delete`)."""
    short = collection.rpartition(".")[2] or collection
    WRITES.labels(short, operation).inc()
    WRITE_POINTS.labels(short).inc(POINTS.get(operation, 0))


def firehose_frame(pds: str, stamp: str | None) -> None:
    """A frame from `pds` carrying the PDS's `time` (RFC 3339): record the lag."""
    if not isinstance(stamp, str):
        return
    try:
        sent = datetime.fromisoformat(stamp).timestamp()
    except (ValueError, OverflowError, OSError):
        return
    FIREHOSE_LAG.labels(pds).set(time.time() - sent)


def failover_started(uri: str, slot: int, round_: int) -> None:
    """A replacement round of (uri, slot) is open: the failover clock starts (once)."""
    if round_ < 1 or slot < 0:
        return
    if (uri, slot) not in _failing and len(_failing) >= _FAILING_MAX:
        del _failing[next(iter(_failing))]  # the oldest: never finished
    _failing.setdefault((uri, slot), clock())


def bid_written(value: Mapping[str, Any]) -> None:
    """This meshlet wrote a bid (`value`, the record's JSON): counted, and a bid of a
    replacement round starts that slot's failover clock."""
    BIDS_WRITTEN.labels("offer" if _int(value.get("slots"), 0) >= 1 else "decline").inc()
    ref = value.get("workload")
    uri = ref.get("uri") if isinstance(ref, dict) else None
    if isinstance(uri, str):
        failover_started(uri, _int(value.get("slot"), -1), _int(value.get("round"), 0))


def _failover_done(uri: str, slot: int) -> None:
    start = _failing.pop((uri, slot), None)
    if start is not None:
        FAILOVER_SECONDS.observe(max(0.0, clock() - start))


class _Seen(Protocol):
    """The node's `Followed`: workload URI -> record URI -> the core's Bid/WorkloadStatus."""

    @property
    def bids(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def statuses(self) -> Mapping[str, Mapping[str, Any]]: ...


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def count_record(ev: RecordChange, seen: _Seen) -> None:
    """Count a verified record change before `seen` (the node's `Followed`) takes it: bids
    and the rounds they open, replicas reported running (placements, failovers). A record
    seen again (resync, a hint and then the firehose) is not counted twice."""
    rec = ev.record
    if ev.action == "delete" or not isinstance(rec, dict):
        return
    ref = rec.get("workload")
    uri = ref.get("uri") if isinstance(ref, dict) else None
    if not isinstance(uri, str):
        return
    key = f"at://{ev.did}/{ev.collection}/{ev.rkey}"
    rnd = _int(rec.get("round"), 0)
    slot = _int(rec.get("slot"), -1) if rnd else -1
    if ev.collection.endswith(".bid"):
        known = seen.bids.get(uri, {})
        if key in known:
            return
        offer = _int(rec.get("slots"), 0) >= 1
        BIDS_SEEN.labels("offer" if offer else "decline").inc()
        opened = any(
            getattr(b, "round", None) == rnd and (not rnd or getattr(b, "slot", None) == slot)
            for b in known.values()
        )
        if not opened:
            ROUNDS_OPENED.labels(kind_of(rnd)).inc()
        failover_started(uri, slot, rnd)
    elif ev.collection.endswith(".workloadStatus"):
        if rec.get("state") != "running":
            return
        old = seen.statuses.get(uri, {}).get(key)
        if (
            old is not None
            and getattr(old, "state", None) == "running"
            and getattr(old, "round", None) == rnd
            and getattr(old, "slot", None) == _int(rec.get("slot"), 0)
        ):
            return
        PLACEMENTS_SEEN.inc()
        if rnd > 0:
            FAILOVERS.inc()
            _failover_done(uri, _int(rec.get("slot"), 0))
