"""The one boundary between the record vocabulary (`meshletd.core.records`) and its JSON form.

`record_from_json` turns a record value as it comes off the network into its core class;
`record_to_json` turns a core record into the value meshletd writes. The lexicons under
`lexicons/` are the truth:

- Validation is the lexicon's: the firehose validates every record it delivers and the PDS
  client every record it writes (`meshletd.atproto.lexicon`), so nothing here re-checks
  shapes; `record_from_json(..., validate=True)` is for values from anywhere else.
- Defaults are the lexicon's: an optional field the record leaves out takes the `default`
  its lexicon declares (`Lexicons.defaults`), read here, not retyped.
- `FIELDS` (meshletd/atproto/fields.py) maps every lexicon property to the core field that
  carries it; a unit test checks it against the lexicons and the dataclasses in both
  directions, and round-trips a record of every class with every field set.

`fill_workload` applies the defaults of a workload published with `meshletctl run`, once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from meshletd.atproto.fields import ADDRESS_FIELDS, DEF_FIELDS, FIELDS
from meshletd.atproto.hostpolicy import host_policy_from_json, host_policy_to_json
from meshletd.atproto.lexicon import Lexicons, default_lexicons
from meshletd.atproto.services import (
    endpoints_from_json,
    health_from_json,
    ports_from_json,
    status_services_json,
    workload_services_json,
)
from meshletd.core.nsid import (
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
from meshletd.core.records import (
    MAX_DRAINS,
    Bid,
    EnvVar,
    HostPolicy,
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
    split_at_uri,
)

JsonObject = dict[str, Any]

_OWNER_KNOWN = frozenset(k.split(".")[0] for k in FIELDS[MeshletOwner]) | {"$type"}
_CAPACITY_KNOWN = frozenset({"milliCpu", "memoryMiB", "storageMiB"})


def now_datetime() -> str:
    """An atproto datetime string for now (UTC, millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Defaults:
    """The lexicon defaults of one record type, by dotted property path."""

    __slots__ = ("_d",)

    def __init__(self, lex: Lexicons, nsid: str) -> None:
        self._d = lex.defaults(nsid)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every default of the record type, by dotted path."""
        return self._d

    def get(self, obj: Mapping[str, Any], key: str, path: str) -> Any:
        got = obj.get(key)
        return self._d.get(path) if got is None else got


_DEFAULTS: dict[str, _Defaults] = {}


def _defaults(nsid: str) -> _Defaults:
    got = _DEFAULTS.get(nsid)
    if got is None:
        got = _DEFAULTS[nsid] = _Defaults(default_lexicons(), nsid)
    return got


def _obj(value: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    got = value.get(key)
    return got if isinstance(got, Mapping) else {}


def _ms(text: Any) -> int | None:
    return None if text is None else parse_datetime_ms(str(text))


def _owner_extra(value: Mapping[str, Any]) -> str:
    """Canonical JSON of the meshletOwner fields this meshletd does not know ('' if none)."""
    extra = {k: v for k, v in value.items() if k not in _OWNER_KNOWN}
    cap = _obj(value, "capacity")
    more = {k: v for k, v in cap.items() if k not in _CAPACITY_KNOWN}
    if more:
        extra["capacity"] = more
    return json.dumps(extra, sort_keys=True, separators=(",", ":")) if extra else ""


def _drains(value: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """Past drain intervals of a meshletOwner record, sorted, the newest MAX_DRAINS; an
    interval that ends before it starts is ignored."""
    got = []
    for d in value.get("drains") or ():
        since, until = parse_datetime_ms(d["since"]), parse_datetime_ms(d["until"])
        if since <= until:
            got.append((since, until))
    got.sort()
    return tuple(got[-MAX_DRAINS:])


def record_from_json(
    uri: str, cid: str, value: Mapping[str, Any], *, validate: bool = False
) -> Record | None:
    """The core record of a JSON record value; None for collections meshlet does not model.

    `value` is expected valid under its lexicon (the firehose and anti-entropy deliver only
    validated records); with `validate=True` it is checked first (raises InvalidRecord).
    Raises KeyError/ValueError/TypeError on a value the lexicon would refuse."""
    repo, collection, rkey = split_at_uri(uri)
    if validate:
        lex = default_lexicons()
        if collection in lex.docs:
            lex.validate_record(collection, value, rkey=rkey)
    if collection == NSID_BID:
        free = _obj(value, "free")
        ref = value["workload"]
        return Bid(
            uri=uri,
            meshlet=repo,
            workload_uri=ref["uri"],
            workload_cid=ref.get("cid", ""),
            round=int(value["round"]),
            slot=int(value.get("slot", -1)),
            priority=int(value["priority"]),
            slots=int(value["slots"]),
            free_milli_cpu=int(free.get("milliCpu", 0)),
            free_memory_mib=int(free.get("memoryMiB", 0)),
            created_at=parse_datetime_ms(value["createdAt"]),
        )
    if collection == NSID_STATUS:
        ec = value.get("exitCode")
        ref = value["workload"]
        return WorkloadStatus(
            uri=uri,
            meshlet=repo,
            workload_uri=ref["uri"],
            slot=int(value["slot"]),
            round=int(value["round"]),
            state=str(value["state"]),
            updated_at=parse_datetime_ms(value["updatedAt"]),
            exit_code=None if ec is None else int(ec),
            restarts=int(value.get("restarts", 0)),
            workload_cid=str(ref.get("cid", "")),
            message=value.get("message"),
            unit=value.get("unit"),
            started_at=_ms(value.get("startedAt")),
            finished_at=_ms(value.get("finishedAt")),
            health=value.get("health"),
            endpoints=endpoints_from_json(value),
        )
    if collection == NSID_WORKLOAD:
        d = _defaults(NSID_WORKLOAD)
        res = _obj(value, "resources")
        c = _obj(value, "constraints")
        return Workload(
            uri=uri,
            cid=cid,
            owner=repo,
            cluster=str(value.get("cluster", "")),
            milli_cpu=int(res.get("milliCpu", 0)),
            memory_mib=int(res.get("memoryMiB", 0)),
            replicas=int(value["replicas"]),
            created_at=parse_datetime_ms(value["createdAt"]),
            kind=str(value.get("kind", "service")),
            restart_policy=str(d.get(value, "restartPolicy", "restartPolicy")),
            bid_window_ms=int(d.get(value, "bidWindowMs", "bidWindowMs")),
            allow_packing=bool(d.get(c, "allowPacking", "constraints.allowPacking")),
            arch=tuple(c.get("arch", ())),
            labels=tuple(c.get("labels", ())),
            avoid=frozenset(c.get("avoidMeshlets", ())),
            image=str(value.get("image", "")),
            name=str(value.get("name", "")),
            command=tuple(value.get("command", ())),
            args=tuple(value.get("args", ())),
            env=tuple(EnvVar(str(e["name"]), str(e["value"])) for e in value.get("env", ())),
            secrets=tuple(
                SecretRef(str(s["name"]), s.get("target"), s.get("env"))
                for s in value.get("secrets", ())
            ),
            storage_mib=int(d.get(res, "storageMiB", "resources.storageMiB")),
            prefer=tuple(c.get("preferMeshlets", ())),
            paused=bool(d.get(value, "paused", "paused")),
            image_digest=str(value.get("imageDigest", "")),
            image_pull_secret=str(value.get("imagePullSecret", "")),
            ports=ports_from_json(value),
            **health_from_json(value, d.defaults),
            network=str(d.get(value, "network", "network")),
            max_runtime_s=None if value.get("maxRuntimeS") is None else int(value["maxRuntimeS"]),
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
            created_at=_ms(value.get("createdAt")),
        )
    if collection == NSID_MEMBERSHIP:
        return Membership(
            uri=uri,
            repo=repo,
            cluster=str(value.get("cluster", rkey)),
            members=frozenset(value["members"]),
            created_at=_ms(value.get("createdAt")) or 0,
        )
    if collection == NSID_MESHLET_OWNER:
        d = _defaults(NSID_MESHLET_OWNER)
        cap = _obj(value, "capacity")
        since = value.get("stateSince") or value.get("createdAt")
        return MeshletOwner(
            uri=uri,
            meshlet=repo,
            owner=value["ownerDid"],
            milli_cpu=int(cap.get("milliCpu", 0)),
            memory_mib=int(cap.get("memoryMiB", 0)),
            state=str(value.get("state", "active")),
            state_since=parse_datetime_ms(since) if since else 0,
            arch=str(value.get("arch", "amd64")),
            labels=frozenset(value.get("labels", ())),
            endpoint=str(value.get("endpoint", "")),
            drains=_drains(value),
            extra=_owner_extra(value),
            storage_mib=int(d.get(cap, "storageMiB", "capacity.storageMiB")),
            encryption_key=str(value.get("encryptionKey", "")),
            version=str(value.get("version", "")),
        )
    if collection == NSID_MESHLET:
        return MeshletLink(
            uri=uri,
            owner=repo,
            meshlet=value["meshletDid"],
            name=value.get("name"),
            created_at=_ms(value.get("createdAt")) or 0,
        )
    if collection == NSID_LEASE:
        return Lease(
            uri=uri,
            meshlet=repo,
            renewed_at=parse_datetime_ms(value["renewedAt"]),
            valid_ms=int(value["validMs"]),
        )
    if collection == NSID_HOST_POLICY:
        return host_policy_from_json(uri, value)
    return None


def _resources(milli_cpu: int, memory_mib: int, storage_mib: int) -> JsonObject:
    """A commune.scheduler.defs#resources value (storageMiB only when not its default 0)."""
    out: JsonObject = {"milliCpu": milli_cpu, "memoryMiB": memory_mib}
    if storage_mib:
        out["storageMiB"] = storage_mib
    return out


def _put(out: JsonObject, key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def record_to_json(record: Record) -> JsonObject:
    """The JSON value (with $type) of a core record. Optional fields left at their empty
    value are left out; what goes to a PDS is validated there (`PdsClient`)."""
    if isinstance(record, Bid):
        out: JsonObject = {
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
            "workload": {"uri": record.workload_uri, "cid": record.workload_cid},
            "round": record.round,
            "slot": record.slot,
            "state": record.state,
            "restarts": record.restarts,
            "updatedAt": format_datetime_ms(record.updated_at),
        }
        _put(out, "exitCode", record.exit_code)
        _put(out, "message", record.message)
        _put(out, "unit", record.unit)
        if record.started_at is not None:
            out["startedAt"] = format_datetime_ms(record.started_at)
        if record.finished_at is not None:
            out["finishedAt"] = format_datetime_ms(record.finished_at)
        out.update(status_services_json(record))
        return out
    if isinstance(record, Workload):
        res = _resources(record.milli_cpu, record.memory_mib, record.storage_mib)
        out = {
            "$type": NSID_WORKLOAD,
            "name": record.name,
            "image": record.image,
            "resources": res,
            "replicas": record.replicas,
            "kind": record.kind,
            "restartPolicy": record.restart_policy,
            "cluster": record.cluster,
            "bidWindowMs": record.bid_window_ms,
            "createdAt": format_datetime_ms(record.created_at),
        }
        if record.command:
            out["command"] = list(record.command)
        if record.args:
            out["args"] = list(record.args)
        if record.env:
            out["env"] = [{"name": e.name, "value": e.value} for e in record.env]
        if record.secrets:
            out["secrets"] = [
                {
                    "name": s.name,
                    **({"target": s.target} if s.target is not None else {}),
                    **({"env": s.env} if s.env is not None else {}),
                }
                for s in record.secrets
            ]
        c: JsonObject = {}
        for key, items in (
            ("arch", record.arch),
            ("labels", record.labels),
            ("preferMeshlets", record.prefer),
            ("avoidMeshlets", sorted(record.avoid)),
        ):
            if items:
                c[key] = list(items)
        if record.allow_packing:
            c["allowPacking"] = True
        if c:
            out["constraints"] = c
        if record.paused:
            out["paused"] = True
        if record.image_digest:
            out["imageDigest"] = record.image_digest
        if record.image_pull_secret:
            out["imagePullSecret"] = record.image_pull_secret
        out.update(workload_services_json(record))
        if record.network != "internet":
            out["network"] = record.network
        _put(out, "maxRuntimeS", record.max_runtime_s)
        return out
    if isinstance(record, Usage):
        created = record.period_end if record.created_at is None else record.created_at
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
            "createdAt": format_datetime_ms(created),
        }
    if isinstance(record, MeshletOwner):
        extra: JsonObject = json.loads(record.extra) if record.extra else {}
        more = extra.pop("capacity", None)
        cap: JsonObject = {
            **(more if isinstance(more, dict) else {}),
            **_resources(record.milli_cpu, record.memory_mib, record.storage_mib),
        }
        out = {
            **extra,
            "$type": NSID_MESHLET_OWNER,
            "ownerDid": record.owner,
            "state": record.state,
            "stateSince": format_datetime_ms(record.state_since),
            "capacity": cap,
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
        if record.encryption_key:
            out["encryptionKey"] = record.encryption_key
        if record.version:
            out["version"] = record.version
        return out
    if isinstance(record, Membership):
        return {
            "$type": NSID_MEMBERSHIP,
            "cluster": record.cluster,
            "members": sorted(record.members),
            "createdAt": format_datetime_ms(record.created_at),
        }
    if isinstance(record, MeshletLink):
        out = {
            "$type": NSID_MESHLET,
            "meshletDid": record.meshlet,
            "createdAt": format_datetime_ms(record.created_at),
        }
        _put(out, "name", record.name)
        return out
    if isinstance(record, HostPolicy):
        return host_policy_to_json(record)
    if isinstance(record, Lease):
        return {
            "$type": NSID_LEASE,
            "renewedAt": format_datetime_ms(record.renewed_at),
            "validMs": record.valid_ms,
            "createdAt": format_datetime_ms(record.renewed_at),
        }
    raise TypeError(f"not a record: {type(record).__name__}")


def fill_workload(
    record: Mapping[str, Any], *, cluster: str, bid_window_ms: int, now: str | None = None
) -> JsonObject:
    """A workload record as published by `meshletctl run` (farm.meshlet.ctl.createWorkload),
    with what it may leave out filled in, in this one place: `$type`, `cluster` (the
    meshlet's first), `kind` (service), `replicas` (1), `createdAt` (now) as that method's
    lexicon says, and `bidWindowMs` (the publisher's [scheduling] bid_window_ms: the record
    carries it, so every meshlet uses the same window for this workload). The result is
    validated once, by the PDS client that writes it."""
    return {
        "$type": NSID_WORKLOAD,
        "cluster": cluster,
        "kind": "service",
        "replicas": 1,
        "createdAt": now or now_datetime(),
        "bidWindowMs": bid_window_ms,
        **record,
    }


__all__ = [
    "ADDRESS_FIELDS",
    "DEF_FIELDS",
    "FIELDS",
    "fill_workload",
    "now_datetime",
    "record_from_json",
    "record_to_json",
]
