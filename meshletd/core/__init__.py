"""meshletd.core: the pure scheduler core (no I/O, no await, no clock reads, no randomness).

Feed `Event`s to `Scheduler.handle` and perform the `Action`s it returns. The protocol it
implements is normative in docs/protocol.md.
"""

from .actions import (
    Action,
    DeleteRecord,
    ProbePeer,
    PutRecord,
    RefreshLease,
    Reply,
    StartReplica,
    StopReplica,
    WakeAt,
)
from .events import (
    BidAbandoned,
    Event,
    FeedsBehind,
    ProbeResult,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    SetDraining,
    Tick,
)
from .fairshare import balances, decay, meshlet_priority
from .hashing import is_candidate, rendezvous_score
from .records import (
    Bid,
    EnvVar,
    Lease,
    Membership,
    MeshletLink,
    MeshletOwner,
    Record,
    SecretRef,
    Usage,
    UsageEntry,
    Workload,
    WorkloadStatus,
    format_datetime_ms,
    parse_datetime_ms,
)
from .scheduler import MeshletIdentity, Scheduler, bid_rkey, status_rkey
from .timing import DEFAULT_TIMING, Timing

__all__ = [
    "DEFAULT_TIMING",
    "Action",
    "Bid",
    "BidAbandoned",
    "DeleteRecord",
    "EnvVar",
    "Event",
    "FeedsBehind",
    "Lease",
    "Membership",
    "MeshletIdentity",
    "MeshletLink",
    "MeshletOwner",
    "ProbePeer",
    "ProbeResult",
    "PutRecord",
    "Record",
    "RecordDeleted",
    "RecordSeen",
    "RefreshLease",
    "ReplicaStateChanged",
    "Reply",
    "Scheduler",
    "SecretRef",
    "SetDraining",
    "StartReplica",
    "StopReplica",
    "Tick",
    "Timing",
    "Usage",
    "UsageEntry",
    "WakeAt",
    "Workload",
    "WorkloadStatus",
    "balances",
    "bid_rkey",
    "decay",
    "format_datetime_ms",
    "is_candidate",
    "meshlet_priority",
    "parse_datetime_ms",
    "rendezvous_score",
    "status_rkey",
]
