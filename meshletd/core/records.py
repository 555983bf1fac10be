"""The record vocabulary: every record meshlet reads or writes, once, as a frozen value.

These classes are the only model of the `commune.scheduler.*` records in meshlet: the core
schedules with them, the daemon runs replicas from them, and `meshletd.atproto.records`
converts them from and to their JSON form under the lexicons (`lexicons/` is the truth; a
unit test checks every field here against its lexicon, and records meshletd writes are
validated against it). Every time is an integer count of milliseconds since the Unix epoch
(records carry atproto datetime strings; `parse_datetime_ms` / `format_datetime_ms`
convert). Every resource amount is an integer (milli-CPU, MiB). The field names in each
class's docstring are the JSON field names of the record (see docs/records.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from .nsid import (
    NSID_BID,
    NSID_HOST_POLICY,
    NSID_LEASE,
    NSID_MEMBERSHIP,
    NSID_MESHLET,
    NSID_MESHLET_OWNER,
    NSID_STATUS,
    NSID_USAGE,
    NSID_WORKLOAD,
)

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


def rkey_for_did(did: str) -> str:
    """The record key naming a DID (an owner's meshlet record): '%' is not allowed in keys."""
    return did.replace("%", "~")


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable of a workload's container. JSON: name, value."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret a workload's container needs (its value never is in a record). JSON: name,
    target (file name under /run/secrets; default: name), env (also as this variable)."""

    name: str
    target: str | None = None
    env: str | None = None


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A port a workload's container serves. JSON: name, containerPort, protocol (tcp|udp)."""

    name: str
    container_port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one declared port of a replica is published. JSON: name, address, port,
    protocol."""

    name: str
    address: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload (owner repo). JSON: name, image, command[], args[], env[{name, value}],
    resources{milliCpu, memoryMiB, storageMiB}, replicas, kind (service|job), restartPolicy
    (always|on-failure|never), constraints{arch[], labels[], preferMeshlets[],
    avoidMeshlets[], allowPacking}, secrets[{name, target, env}], cluster, bidWindowMs,
    paused, imageDigest, imagePullSecret, network (none|internet|lan), maxRuntimeS,
    ports[{name, containerPort, protocol}], healthCheck{command[], intervalS, timeoutS,
    retries, startPeriodS} (no check: `health_command` empty), createdAt. `uri`, `cid` and
    `owner` (the repo) say which version of whose record it is."""

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
    # What the runtime needs to run a replica (the scheduler does not read these).
    name: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    secrets: tuple[SecretRef, ...] = ()
    storage_mib: int = 0
    prefer: tuple[str, ...] = ()  # constraints.preferMeshlets (a hint the core ignores)
    paused: bool = False
    # The digest `image` meant when the owner published (sha256:...; "" = not resolved:
    # a local image), and the owner's secret that holds the registry credentials.
    image_digest: str = ""
    image_pull_secret: str = ""
    network: str = "internet"  # what its replicas need: none | internet | lan (section 21)
    max_runtime_s: int | None = None  # a job's longest run, seconds (section 21)
    ports: tuple[PortSpec, ...] = ()  # published only where the host policy allows (sec. 22)
    health_command: tuple[str, ...] = ()  # healthCheck.command; empty: no health check
    health_interval_s: int = 30
    health_timeout_s: int = 30
    health_retries: int = 3
    health_start_period_s: int = 0


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
    exitCode, restarts, message, unit, startedAt, finishedAt, health (starting|healthy|
    unhealthy; None: no check declared), endpoints[{name, address, port, protocol}],
    updatedAt."""

    uri: str
    meshlet: str
    workload_uri: str
    slot: int
    round: int
    state: str
    updated_at: int
    exit_code: int | None = None
    restarts: int = 0
    workload_cid: str = ""  # the version of the workload record the replica runs
    message: str | None = None
    unit: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    health: str | None = None
    endpoints: tuple[Endpoint, ...] = ()


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
    created_at: int | None = None  # None: written as periodEnd (when the period closed)


@dataclass(frozen=True, slots=True)
class Membership:
    """A cluster's member list (meshlet or owner repo; rkey = cluster). JSON: cluster,
    members[] (owner DIDs), createdAt."""

    uri: str
    repo: str
    cluster: str
    members: frozenset[str]
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class MeshletOwner:
    """The meshlet's self-description (meshlet repo, rkey self). JSON: ownerDid, endpoint,
    state (active|draining), stateSince, drains[{since, until}] (past drain intervals, oldest
    first), capacity{milliCpu, memoryMiB, storageMiB}, arch, labels[], encryptionKey,
    version, createdAt (written as stateSince).

    The fields after `drains` take no part in placement, hence none in equality: a new
    version or key published does not make observers re-judge anything. `extra` holds, as
    canonical JSON, fields of a newer meshletd this one does not know, so that a rewrite of
    the record keeps them."""

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
    storage_mib: int = field(default=0, compare=False)
    encryption_key: str = field(default="", compare=False)  # X25519, base64 (secrets)
    version: str = field(default="", compare=False)  # the meshletd release that wrote it

    def drained_at(self, t: int) -> bool:
        """Whether the meshlet was draining at time t: its current drain started at or before
        t, or t falls in one of its past drain intervals [since, until)."""
        if self.state == "draining" and self.state_since <= t:
            return True
        return any(since <= t < until for since, until in self.drains)


def with_state_history(wanted: MeshletOwner, last: MeshletOwner | None, now: int) -> MeshletOwner:
    """The meshletOwner record to publish in place of `last` (docs/protocol.md, sections 2
    and 4): `wanted`'s self-description, with `stateSince` kept while the state stays and
    `now` when it changes, and the past drains kept; leaving a drain appends the interval it
    ends (the newest MAX_DRAINS), so that the rounds that closed during the drain keep their
    judgement."""
    if last is None:
        return replace(wanted, state_since=now, drains=wanted.drains[-MAX_DRAINS:])
    since = last.state_since if last.state == wanted.state and last.state_since else now
    drains = last.drains
    if last.state == "draining" and wanted.state != "draining":
        drains = (*drains, (last.state_since, max(last.state_since, since)))
    return replace(wanted, state_since=since, drains=drains[-MAX_DRAINS:])


@dataclass(frozen=True, slots=True)
class MeshletLink:
    """The owner's claim of a machine (owner repo). JSON: meshletDid, name, createdAt."""

    uri: str
    owner: str
    meshlet: str
    name: str | None = None
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """The liveness of a meshlet that publishes no endpoint (meshlet repo, rkey self).
    JSON: renewedAt, validMs, createdAt (docs/protocol.md, section 8)."""

    uri: str
    meshlet: str
    renewed_at: int
    valid_ms: int


@dataclass(frozen=True, slots=True)
class OwnerCap:
    """A share of a meshlet's contribution one owner may hold there. JSON: did, share
    (permille, 1..1000)."""

    did: str
    share: int


@dataclass(frozen=True, slots=True)
class ScheduleWindow:
    """A lending window of a host policy, in UTC. JSON: days[] (Monday = 0; absent: every
    day), start (minute of the day, inside), end (minute of the day, first one after)."""

    start: int
    end: int
    days: frozenset[int] = frozenset(range(7))


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """What a meshlet lends and to whom (meshlet repo, rkey self; docs/protocol.md, section
    21). JSON: owners{defaultShare, caps[{did, share}]}, evicted[], images{allow[],
    digestsOnly}, network (none|internet|lan), inbound{allowed, portMin, portMax, address},
    schedule[{days[], start, end}], jobMaxRuntimeS, minContribution{ratioPermille,
    periodDays, mode}, createdAt. An absent record is `HostPolicy.default(meshlet)`.

    The rules every observer judges by are in `meshletd.core.policy`; `inbound` is for the
    services (ports) and `minContribution` for the free-rider rule, which judge them."""

    uri: str
    meshlet: str
    created_at: int
    default_share: int = 1000
    caps: tuple[OwnerCap, ...] = ()
    evicted: frozenset[str] = frozenset()
    image_allow: tuple[str, ...] | None = None  # None: any source
    digests_only: bool = False
    network: str = "internet"
    inbound_allowed: bool = False
    port_min: int | None = None
    port_max: int | None = None
    inbound_address: str | None = None
    schedule: tuple[ScheduleWindow, ...] | None = None  # None: always
    job_max_runtime_s: int | None = None
    min_ratio_permille: int | None = None  # None: no free-rider rule
    min_period_days: int | None = None
    min_mode: str = "after"

    @staticmethod
    def default(meshlet: str) -> HostPolicy:
        """The policy of a meshlet that publishes none: every default, in force always."""
        return HostPolicy(
            uri=at_uri(meshlet, NSID_HOST_POLICY, "self"), meshlet=meshlet, created_at=0
        )

    def share_of(self, owner: str) -> int:
        """The permille of the contribution `owner` may hold here (the first cap naming it,
        else defaultShare)."""
        for cap in self.caps:
            if cap.did == owner:
                return cap.share
        return self.default_share


Record = (
    Workload
    | Bid
    | WorkloadStatus
    | Usage
    | Membership
    | MeshletOwner
    | MeshletLink
    | Lease
    | HostPolicy
)

COLLECTION_OF: dict[type, str] = {
    Workload: NSID_WORKLOAD,
    Bid: NSID_BID,
    WorkloadStatus: NSID_STATUS,
    Usage: NSID_USAGE,
    Membership: NSID_MEMBERSHIP,
    MeshletOwner: NSID_MESHLET_OWNER,
    MeshletLink: NSID_MESHLET,
    Lease: NSID_LEASE,
    HostPolicy: NSID_HOST_POLICY,
}


__all__ = [
    "COLLECTION_OF",
    "MAX_DRAINS",
    "NSID_BID",
    "NSID_HOST_POLICY",
    "NSID_LEASE",
    "NSID_MEMBERSHIP",
    "NSID_MESHLET",
    "NSID_MESHLET_OWNER",
    "NSID_STATUS",
    "NSID_USAGE",
    "NSID_WORKLOAD",
    "Bid",
    "Endpoint",
    "EnvVar",
    "HostPolicy",
    "Lease",
    "Membership",
    "MeshletLink",
    "MeshletOwner",
    "OwnerCap",
    "PortSpec",
    "Record",
    "ScheduleWindow",
    "SecretRef",
    "Usage",
    "UsageEntry",
    "Workload",
    "WorkloadStatus",
    "at_uri",
    "format_datetime_ms",
    "parse_datetime_ms",
    "rkey_for_did",
    "split_at_uri",
    "with_state_history",
]
