"""Typed record models for the commune.scheduler.* lexicons.

The lexicon files are the truth; these pydantic models are a typed view of them and a unit
test (tests/unit/test_atproto_records.py) checks field names, required fields and types
against the lexicons. `to_record()` always validates against the lexicon, so nothing we
write can disagree with it; `parse_record()` validates incoming values the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from meshletd.atproto.lexicon import default_lexicons, validate_record

NS = "commune.scheduler"
MESHLET = f"{NS}.meshlet"
MESHLET_OWNER = f"{NS}.meshletOwner"
MEMBERSHIP = f"{NS}.membership"
WORKLOAD = f"{NS}.workload"
BID = f"{NS}.bid"
WORKLOAD_STATUS = f"{NS}.workloadStatus"
USAGE = f"{NS}.usage"
LEASE = f"{NS}.lease"

MeshletState = Literal["active", "draining"] | str
ReplicaState = (
    Literal[
        "pending",
        "pulling",
        "starting",
        "running",
        "paused",
        "stopping",
        "stopped",
        "succeeded",
        "failed",
        "lost",
    ]
    | str
)


def now_datetime() -> str:
    """An atproto datetime string for now (UTC, millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rkey_for_did(did: str) -> str:
    """A record key naming a DID (e.g. an owner's meshlet record): '%' is not allowed in keys."""
    return did.replace("%", "~")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Resources(_Model):
    milli_cpu: int = Field(ge=0)
    memory_mib: int = Field(ge=0, alias="memoryMiB")
    storage_mib: int = Field(default=0, ge=0, alias="storageMiB")


class WorkloadRef(_Model):
    uri: str
    cid: str


class EnvVar(_Model):
    name: str
    value: str


class SecretRef(_Model):
    name: str
    target: str | None = None
    env: str | None = None


class Constraints(_Model):
    arch: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    prefer_meshlets: tuple[str, ...] = ()
    avoid_meshlets: tuple[str, ...] = ()
    allow_packing: bool = False


class UsageEntry(_Model):
    owner_did: str
    milli_cpu_seconds: int = Field(ge=0)
    memory_mib_seconds: int = Field(ge=0, alias="memoryMiBSeconds")


class DrainInterval(_Model):
    """One past drain of a meshlet (meshletOwner#drainInterval): [since, until)."""

    since: str
    until: str


class Record(_Model):
    """Base of the record models. `NSID` names the lexicon."""

    NSID: ClassVar[str]

    def to_record(self, *, rkey: str | None = None) -> dict[str, Any]:
        """The wire value (with `$type`), validated against the lexicon."""
        value = {"$type": self.NSID, **self.to_dict()}
        validate_record(self.NSID, value, rkey=rkey)
        return value

    @classmethod
    def parse_record(cls, value: dict[str, Any], *, rkey: str | None = None) -> Any:
        """Validate `value` against the lexicon, then build the model (raises InvalidRecord)."""
        validate_record(cls.NSID, value, rkey=rkey)
        return cls.model_validate(value)


class Meshlet(Record):
    NSID: ClassVar[str] = MESHLET
    meshlet_did: str
    name: str | None = None
    created_at: str = Field(default_factory=now_datetime)


class MeshletOwner(Record):
    NSID: ClassVar[str] = MESHLET_OWNER
    owner_did: str
    state: MeshletState = "active"
    state_since: str | None = None
    drains: tuple[DrainInterval, ...] | None = None
    capacity: Resources
    arch: str
    endpoint: str | None = None
    labels: tuple[str, ...] = ()
    encryption_key: str | None = None
    version: str | None = None
    created_at: str = Field(default_factory=now_datetime)


class Membership(Record):
    NSID: ClassVar[str] = MEMBERSHIP
    cluster: str
    members: tuple[str, ...]
    created_at: str = Field(default_factory=now_datetime)


class Workload(Record):
    NSID: ClassVar[str] = WORKLOAD
    name: str
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    resources: Resources
    replicas: int = Field(ge=1)
    kind: Literal["service", "job"] | str = "service"
    restart_policy: Literal["always", "on-failure", "never"] | str = "on-failure"
    constraints: Constraints | None = None
    secrets: tuple[SecretRef, ...] = ()
    cluster: str
    bid_window_ms: int = 5000
    paused: bool = False
    created_at: str = Field(default_factory=now_datetime)


class Bid(Record):
    NSID: ClassVar[str] = BID
    workload: WorkloadRef
    round: int = Field(ge=0)
    slot: int | None = None
    priority: int
    slots: int = Field(ge=0)
    free: Resources | None = None
    created_at: str = Field(default_factory=now_datetime)


class WorkloadStatus(Record):
    NSID: ClassVar[str] = WORKLOAD_STATUS
    workload: WorkloadRef
    round: int = Field(ge=0)
    slot: int = Field(ge=0)
    state: ReplicaState
    exit_code: int | None = None
    restarts: int | None = None
    message: str | None = None
    unit: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str = Field(default_factory=now_datetime)


class Usage(Record):
    NSID: ClassVar[str] = USAGE
    period_start: str
    period_end: str
    entries: tuple[UsageEntry, ...]
    created_at: str = Field(default_factory=now_datetime)


class Lease(Record):
    """The liveness of a meshlet without endpoint (docs/protocol.md, section 8)."""

    NSID: ClassVar[str] = LEASE
    renewed_at: str
    valid_ms: int
    created_at: str = Field(default_factory=now_datetime)


RECORD_MODELS: dict[str, type[Record]] = {
    m.NSID: m
    for m in (Meshlet, MeshletOwner, Membership, Workload, Bid, WorkloadStatus, Usage, Lease)
}

# Objects from commune.scheduler.defs, by def name, for the model-vs-lexicon test.
DEF_MODELS: dict[str, type[_Model]] = {
    "resources": Resources,
    "workloadRef": WorkloadRef,
    "envVar": EnvVar,
    "secretRef": SecretRef,
    "constraints": Constraints,
    "usageEntry": UsageEntry,
}


def parse_any_record(nsid: str, value: dict[str, Any], *, rkey: str | None = None) -> Record:
    """Validate and model a record of any of our collections (raises InvalidRecord)."""
    model = RECORD_MODELS.get(nsid)
    if model is None:
        default_lexicons().record_def(nsid)  # raises InvalidRecord for unknown NSIDs
        raise AssertionError("unreachable")
    result: Record = model.parse_record(value, rkey=rkey)
    return result
