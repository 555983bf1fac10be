"""Actions: everything the scheduler core asks the outside world to do."""

from __future__ import annotations

from dataclasses import dataclass

from .records import Endpoint, Record, Workload


@dataclass(frozen=True, slots=True)
class PutRecord:
    """Write one of our records (create=True: a new rkey, 3 write points; else an update,
    2 points). Batch the actions of one event into one applyWrites. `not_after` (local ms,
    bids only): a write that cannot reach the PDS by then is dropped, and the core told
    with `BidAbandoned` (docs/protocol.md, section 14)."""

    collection: str
    rkey: str
    record: Record
    create: bool
    not_after: int | None = None


@dataclass(frozen=True, slots=True)
class DeleteRecord:
    """Delete one of our records (1 write point)."""

    collection: str
    rkey: str
    uri: str


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Start (or restart) the local replica of (workload, slot), placed in `round`,
    publishing its declared ports at `endpoints` (docs/protocol.md, section 22). `lane`
    (0 or 1) tells apart the two replicas of one slot while an update runs the new version
    beside the old (section 25)."""

    workload: Workload
    slot: int
    round: int
    lane: int = 0
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Stop and remove the local replica of (workload, slot) in `lane`. reason: lost-slot,
    deleted, drained, scaled-down, paused, updated (the old version, once the new one
    serves), update-failed (the new version, which did not)."""

    workload_uri: str
    slot: int
    reason: str
    lane: int = 0


@dataclass(frozen=True, slots=True)
class ProbePeer:
    """Probe a peer meshlet over XRPC (farm.meshlet.ping); answer with ProbeResult."""

    meshlet: str


@dataclass(frozen=True, slots=True)
class RefreshLease:
    """Read a peer's lease again straight from its PDS, with its proof (as a hinted record
    is read), and hand it to the core as any record if it is newer than ours: its lease
    looks expired here, and the firehose may be the one late (docs/protocol.md, section 8,
    "An expired lease is read again"). No answer otherwise."""

    meshlet: str


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Deliver a Tick at this local time (ms): the core's next deadline. The latest WakeAt
    supersedes any earlier one (one alarm per core)."""

    at: int


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer to an operator command (request_id from the command)."""

    request_id: str
    ok: bool
    message: str = ""


Action = (
    PutRecord
    | DeleteRecord
    | StartReplica
    | StopReplica
    | ProbePeer
    | RefreshLease
    | WakeAt
    | Reply
)

__all__ = [
    "Action",
    "DeleteRecord",
    "ProbePeer",
    "PutRecord",
    "RefreshLease",
    "Reply",
    "StartReplica",
    "StopReplica",
    "WakeAt",
]
