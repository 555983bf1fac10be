"""Events: everything the scheduler core learns arrives as one of these frozen values."""

from __future__ import annotations

from dataclasses import dataclass

from .records import Endpoint, Record


@dataclass(frozen=True, slots=True)
class RecordSeen:
    """A record was created or updated (firehose, anti-entropy listRecords, or our own write)."""

    record: Record


@dataclass(frozen=True, slots=True)
class RecordDeleted:
    """A record was deleted (firehose or anti-entropy)."""

    uri: str


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The answer (ok) or failure/timeout (not ok) of one XRPC probe of a peer meshlet."""

    meshlet: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Tick:
    """The current local wall-clock time in ms since the epoch. The only source of time."""

    now: int


@dataclass(frozen=True, slots=True)
class ReplicaStateChanged:
    """The runtime reports a local replica's state: pulling (its image; `message` says how
    far), running, exited (with exit_code), stopped (after StopReplica) or failed (could not
    start; `message` says why, e.g. why its image could not be pulled). `health`: its
    health check's verdict (starting|healthy|unhealthy; None: no news or no check) — a
    running replica reports each change, an exit says "unhealthy" when the check's failure
    ended it. `endpoints`: where an adopted running replica publishes its ports. `lane`:
    which of the slot's two replicas (an update runs the new version beside the old);
    `version`: the spec version it runs, when the runtime knows it (adopted replicas: the
    one stored with the unit; docs/protocol.md, section 25)."""

    workload_uri: str
    slot: int
    state: str
    exit_code: int | None = None
    lane: int = 0
    version: str = ""
    health: str | None = None
    message: str = ""
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class SetDraining:
    """Operator command: drain (True) or undrain (False) this meshlet."""

    draining: bool
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class BidAbandoned:
    """Our own bid (its at-URI) will never be published: the daemon dropped it from its
    write queue because the PDS was unreachable until past the round's deadline
    (`PutRecord.not_after`). The core forgets it, as if it had never bid
    (docs/protocol.md, section 14)."""

    uri: str


@dataclass(frozen=True, slots=True)
class FeedsBehind:
    """The repos whose PDS this meshlet has not heard from lately (the daemon's view of its
    own link to each PDS: its firehose silent past a bound, or down). The new set replaces
    the old one. A lease in one of these repos that looks expired proves nothing: the
    renewal may be there, unseen (docs/protocol.md, section 8)."""

    repos: frozenset[str]


Event = (
    RecordSeen
    | RecordDeleted
    | ProbeResult
    | Tick
    | ReplicaStateChanged
    | SetDraining
    | BidAbandoned
    | FeedsBehind
)

__all__ = [
    "BidAbandoned",
    "Event",
    "FeedsBehind",
    "ProbeResult",
    "RecordDeleted",
    "RecordSeen",
    "ReplicaStateChanged",
    "SetDraining",
    "Tick",
]
