"""Typed, immutable views of the public records the scheduler reads and writes.

Every time is an integer count of milliseconds since the Unix epoch (records carry atproto
datetime strings; `parse_datetime_ms` / `format_datetime_ms` convert). Every resource amount
is an integer (milli-CPU, MiB). The field names in each class's docstring are the JSON field
names of the record (see docs/protocol.md, "Records").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

NSID_WORKLOAD = "commune.scheduler.workload"
NSID_BID = "commune.scheduler.bid"
NSID_STATUS = "commune.scheduler.workloadStatus"
NSID_USAGE = "commune.scheduler.usage"
NSID_MEMBERSHIP = "commune.scheduler.membership"
NSID_MESHLET_OWNER = "commune.scheduler.meshletOwner"
NSID_MESHLET = "commune.scheduler.meshlet"
NSID_LEASE = "commune.scheduler.lease"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MAX_DRAINS = 16  # past drain intervals a meshletOwner record keeps (docs/protocol.md, section 4)


def parse_datetime_ms(text: str) -> int:
    """Parse an atproto datetime string into integer milliseconds since the epoch (UTC)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def format_datetime_ms(ms: int) -> str:
    """Format integer epoch milliseconds as an atproto datetime string (ms precision, Z)."""
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def at_uri(repo: str, collection: str, rkey: str) -> str:
    """The at:// URI of a record."""
    return f"at://{repo}/{collection}/{rkey}"


def split_at_uri(uri: str) -> tuple[str, str, str]:
    """(repo, collection, rkey) of an at:// URI."""
    repo, collection, rkey = uri[len("at://") :].split("/", 2)
    return repo, collection, rkey


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload (owner repo). JSON: resources{milliCpu,memoryMiB}, replicas, kind
    (service|job), restartPolicy (always|on-failure|never), constraints{arch[], labels[],
    avoidMeshlets[], allowPacking}, cluster, bidWindowMs, createdAt (+ image, command...)."""

    uri: str
    cid: str
    owner: str
    cluster: str
    milli_cpu: int
    memory_mib: int
    replicas: int
    created_at: int
    kind: str = "service"
    restart_policy: str = "on-failure"
    bid_window_ms: int = 5000
    allow_packing: bool = False
    arch: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    avoid: frozenset[str] = frozenset()
    image: str = ""


@dataclass(frozen=True, slots=True)
class Bid:
    """A bid (meshlet repo). JSON: workload{uri,cid}, round, slot (absent in round 0),
    priority, slots (replicas offered; 0 = declines), free{milliCpu,memoryMiB}, createdAt."""

    uri: str
    meshlet: str
    workload_uri: str
    workload_cid: str
    round: int
    slot: int  # -1 in round 0 (the bid is for the workload as a whole)
    priority: int
    slots: int
    free_milli_cpu: int
    free_memory_mib: int
    created_at: int


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A replica's status (meshlet repo). JSON: workload{uri,cid}, slot, round, state,
    exitCode, restarts, updatedAt."""

    uri: str
    meshlet: str
    workload_uri: str
    slot: int
    round: int
    state: str
    updated_at: int
    exit_code: int | None = None
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """Resources one owner's workloads consumed on a meshlet during a period."""

    owner: str
    milli_cpu_seconds: int
    memory_mib_seconds: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Usage of one period (meshlet repo). JSON: periodStart, periodEnd, entries[{ownerDid,
    milliCpuSeconds, memoryMiBSeconds}], createdAt."""

    uri: str
    meshlet: str
    period_start: int
    period_end: int
    entries: tuple[UsageEntry, ...]


@dataclass(frozen=True, slots=True)
class Membership:
    """A cluster's member list (meshlet or owner repo; rkey = cluster). JSON: cluster,
    members[] (owner DIDs), createdAt."""

    uri: str
    repo: str
    cluster: str
    members: frozenset[str]


@dataclass(frozen=True, slots=True)
class MeshletOwner:
    """The meshlet's self-description (meshlet repo, rkey self). JSON: ownerDid, endpoint,
    state (active|draining), stateSince, drains[{since, until}] (past drain intervals, oldest
    first), capacity{milliCpu,memoryMiB}, arch, labels[].

    `extra` holds the fields the core does not model (encryptionKey, version,
    capacity.storageMiB, ...) as canonical JSON, so that the core's own rewrite of the record
    (drain, undrain) keeps them; it takes no part in equality."""

    uri: str
    meshlet: str
    owner: str
    milli_cpu: int
    memory_mib: int
    state: str = "active"
    state_since: int = 0
    arch: str = "amd64"
    labels: frozenset[str] = frozenset()
    endpoint: str = ""
    drains: tuple[tuple[int, int], ...] = ()  # (since, until): draining in [since, until)
    extra: str = field(default="", compare=False)

    def drained_at(self, t: int) -> bool:
        """Whether the meshlet was draining at time t: its current drain started at or before
        t, or t falls in one of its past drain intervals [since, until)."""
        if self.state == "draining" and self.state_since <= t:
            return True
        return any(since <= t < until for since, until in self.drains)


@dataclass(frozen=True, slots=True)
class MeshletLink:
    """The owner's claim of a machine (owner repo). JSON: meshletDid, createdAt."""

    uri: str
    owner: str
    meshlet: str


@dataclass(frozen=True, slots=True)
class Lease:
    """The liveness of a meshlet that publishes no endpoint (meshlet repo, rkey self).
    JSON: renewedAt, validMs, createdAt (docs/protocol.md, section 8)."""

    uri: str
    meshlet: str
    renewed_at: int
    valid_ms: int


Record = Workload | Bid | WorkloadStatus | Usage | Membership | MeshletOwner | MeshletLink | Lease

COLLECTION_OF: dict[type, str] = {
    Workload: NSID_WORKLOAD,
    Bid: NSID_BID,
    WorkloadStatus: NSID_STATUS,
    Usage: NSID_USAGE,
    Membership: NSID_MEMBERSHIP,
    MeshletOwner: NSID_MESHLET_OWNER,
    MeshletLink: NSID_MESHLET,
    Lease: NSID_LEASE,
}


_OWNER_FIELDS = frozenset(
    {"$type", "ownerDid", "endpoint", "state", "stateSince", "drains", "capacity", "arch"}
    | {"labels", "createdAt"}
)


def _owner_extra(value: dict[str, Any]) -> str:
    """Canonical JSON of the meshletOwner fields the core does not model ('' if none)."""
    extra = {k: v for k, v in value.items() if k not in _OWNER_FIELDS}
    cap = value.get("capacity")
    if isinstance(cap, dict):
        more = {k: v for k, v in cap.items() if k not in ("milliCpu", "memoryMiB")}
        if more:
            extra["capacity"] = more
    return json.dumps(extra, sort_keys=True, separators=(",", ":")) if extra else ""


def _drains(value: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """Past drain intervals of a meshletOwner record, sorted, the newest MAX_DRAINS; an
    interval that ends before it starts is ignored."""
    got = []
    for d in value.get("drains") or ():
        since, until = parse_datetime_ms(d["since"]), parse_datetime_ms(d["until"])
        if since <= until:
            got.append((since, until))
    got.sort()
    return tuple(got[-MAX_DRAINS:])


def _res(value: dict[str, Any], key: str) -> tuple[int, int]:
    res = value.get(key) or {}
    return int(res.get("milliCpu", 0)), int(res.get("memoryMiB", 0))


def record_from_json(uri: str, cid: str, value: dict[str, Any]) -> Record | None:
    """Build the typed view of a record from its JSON value; None for collections the
    scheduler does not read. Raises KeyError/ValueError on a malformed record."""
    repo, collection, rkey = split_at_uri(uri)
    if collection == NSID_WORKLOAD:
        cpu, mem = _res(value, "resources")
        c = value.get("constraints") or {}
        return Workload(
            uri=uri,
            cid=cid,
            owner=repo,
            cluster=str(value.get("cluster", "")),
            milli_cpu=cpu,
            memory_mib=mem,
            replicas=int(value["replicas"]),
            created_at=parse_datetime_ms(value["createdAt"]),
            kind=str(value.get("kind", "service")),
            restart_policy=str(value.get("restartPolicy", "on-failure")),
            bid_window_ms=int(value.get("bidWindowMs", 5000)),
            allow_packing=bool(c.get("allowPacking", False)),
            arch=tuple(c.get("arch", ())),
            labels=tuple(c.get("labels", ())),
            avoid=frozenset(c.get("avoidMeshlets", ())),
            image=str(value.get("image", "")),
        )
    if collection == NSID_BID:
        cpu, mem = _res(value, "free")
        return Bid(
            uri=uri,
            meshlet=repo,
            workload_uri=value["workload"]["uri"],
            workload_cid=value["workload"].get("cid", ""),
            round=int(value["round"]),
            slot=int(value.get("slot", -1)),
            priority=int(value["priority"]),
            slots=int(value["slots"]),
            free_milli_cpu=cpu,
            free_memory_mib=mem,
            created_at=parse_datetime_ms(value["createdAt"]),
        )
    if collection == NSID_STATUS:
        ec = value.get("exitCode")
        return WorkloadStatus(
            uri=uri,
            meshlet=repo,
            workload_uri=value["workload"]["uri"],
            slot=int(value["slot"]),
            round=int(value["round"]),
            state=str(value["state"]),
            updated_at=parse_datetime_ms(value["updatedAt"]),
            exit_code=None if ec is None else int(ec),
            restarts=int(value.get("restarts", 0)),
        )
    if collection == NSID_USAGE:
        return Usage(
            uri=uri,
            meshlet=repo,
            period_start=parse_datetime_ms(value["periodStart"]),
            period_end=parse_datetime_ms(value["periodEnd"]),
            entries=tuple(
                UsageEntry(e["ownerDid"], int(e["milliCpuSeconds"]), int(e["memoryMiBSeconds"]))
                for e in value["entries"]
            ),
        )
    if collection == NSID_MEMBERSHIP:
        return Membership(
            uri=uri,
            repo=repo,
            cluster=str(value.get("cluster", rkey)),
            members=frozenset(value["members"]),
        )
    if collection == NSID_MESHLET_OWNER:
        cpu, mem = _res(value, "capacity")
        since = value.get("stateSince") or value.get("createdAt")
        return MeshletOwner(
            uri=uri,
            meshlet=repo,
            owner=value["ownerDid"],
            milli_cpu=cpu,
            memory_mib=mem,
            state=str(value.get("state", "active")),
            state_since=parse_datetime_ms(since) if since else 0,
            arch=str(value.get("arch", "amd64")),
            labels=frozenset(value.get("labels", ())),
            endpoint=str(value.get("endpoint", "")),
            drains=_drains(value),
            extra=_owner_extra(value),
        )
    if collection == NSID_MESHLET:
        return MeshletLink(uri=uri, owner=repo, meshlet=value["meshletDid"])
    if collection == NSID_LEASE:
        valid = int(value["validMs"])
        if valid < 1:
            raise ValueError("validMs must be positive")
        return Lease(
            uri=uri,
            meshlet=repo,
            renewed_at=parse_datetime_ms(value["renewedAt"]),
            valid_ms=valid,
        )
    return None


def record_to_json(record: Record) -> dict[str, Any]:
    """The JSON value (with $type) of a record the meshlet writes: bid, status, usage,
    meshletOwner, membership, lease."""
    if isinstance(record, Bid):
        out: dict[str, Any] = {
            "$type": NSID_BID,
            "workload": {"uri": record.workload_uri, "cid": record.workload_cid},
            "round": record.round,
            "priority": record.priority,
            "slots": record.slots,
            "free": {"milliCpu": record.free_milli_cpu, "memoryMiB": record.free_memory_mib},
            "createdAt": format_datetime_ms(record.created_at),
        }
        if record.slot >= 0:
            out["slot"] = record.slot
        return out
    if isinstance(record, WorkloadStatus):
        out = {
            "$type": NSID_STATUS,
            "workload": {"uri": record.workload_uri, "cid": ""},
            "round": record.round,
            "slot": record.slot,
            "state": record.state,
            "restarts": record.restarts,
            "updatedAt": format_datetime_ms(record.updated_at),
        }
        if record.exit_code is not None:
            out["exitCode"] = record.exit_code
        return out
    if isinstance(record, Usage):
        return {
            "$type": NSID_USAGE,
            "periodStart": format_datetime_ms(record.period_start),
            "periodEnd": format_datetime_ms(record.period_end),
            "entries": [
                {
                    "ownerDid": e.owner,
                    "milliCpuSeconds": e.milli_cpu_seconds,
                    "memoryMiBSeconds": e.memory_mib_seconds,
                }
                for e in record.entries
            ],
            "createdAt": format_datetime_ms(record.period_end),
        }
    if isinstance(record, MeshletOwner):
        extra: dict[str, Any] = json.loads(record.extra) if record.extra else {}
        cap = extra.pop("capacity", None)
        out = {
            **extra,
            "$type": NSID_MESHLET_OWNER,
            "ownerDid": record.owner,
            "state": record.state,
            "stateSince": format_datetime_ms(record.state_since),
            "capacity": {
                **(cap if isinstance(cap, dict) else {}),
                "milliCpu": record.milli_cpu,
                "memoryMiB": record.memory_mib,
            },
            "arch": record.arch,
            "labels": sorted(record.labels),
            "createdAt": format_datetime_ms(record.state_since),
        }
        if record.endpoint:  # the lexicon wants a URI or nothing
            out["endpoint"] = record.endpoint
        if record.drains:
            out["drains"] = [
                {"since": format_datetime_ms(a), "until": format_datetime_ms(b)}
                for a, b in record.drains
            ]
        return out
    if isinstance(record, Membership):
        return {
            "$type": NSID_MEMBERSHIP,
            "cluster": record.cluster,
            "members": sorted(record.members),
            "createdAt": format_datetime_ms(0),
        }
    if isinstance(record, Lease):
        return {
            "$type": NSID_LEASE,
            "renewedAt": format_datetime_ms(record.renewed_at),
            "validMs": record.valid_ms,
            "createdAt": format_datetime_ms(record.renewed_at),
        }
    raise TypeError(f"meshletd does not write {type(record).__name__} records")


__all__ = [
    "COLLECTION_OF",
    "MAX_DRAINS",
    "Bid",
    "Lease",
    "Membership",
    "MeshletLink",
    "MeshletOwner",
    "Record",
    "Usage",
    "UsageEntry",
    "Workload",
    "WorkloadStatus",
    "at_uri",
    "format_datetime_ms",
    "parse_datetime_ms",
    "record_from_json",
    "record_to_json",
    "split_at_uri",
]
