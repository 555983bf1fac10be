"""Spec versions: what every observer derives the same way from a workload record's value,
and the few rules of a rolling update that do not need the scheduler's state
(docs/protocol.md, section 25).

A workload's **version** is a hash of its record's value without the fields that do not
change what a replica runs (how many replicas, where, paused, its name, its history). Two
records that would run the same containers have the same version, so pausing, scaling or
re-placing never rolls anything; any change of what runs (image, command, args, env,
secrets, resources, kind, restart policy, and whatever field a newer meshletd adds to the
spec) is a new version. It is computed from the JSON value, not from a parsed model, so
meshletds of different releases (knowing different fields) still derive the same version.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

# Top-level fields of a workload record that are not part of its spec version: they say how
# many replicas run, where, whether paused, what it is called, and its update history.
NOT_SPEC = frozenset(
    {
        "$type",
        "name",
        "replicas",
        "constraints",
        "cluster",
        "bidWindowMs",
        "paused",
        "createdAt",
        "previous",
        "rollback",
    }
)

VERSION_HEX = 16


def spec_of(value: Mapping[str, Any]) -> dict[str, Any]:
    """The spec part of a workload record's value (what its version hashes)."""
    return {k: v for k, v in value.items() if k not in NOT_SPEC}


def spec_version(value: Mapping[str, Any]) -> str:
    """The version of a workload record's value: the first 8 bytes of BLAKE2b over its
    spec part as canonical JSON (keys sorted, no spaces), in hex. Bytes (a field the
    lexicon does not know may hold them) are written as atproto JSON writes them,
    `{"$bytes": base64 without padding}`, whether the record came as DAG-CBOR (firehose:
    Python bytes) or as JSON (listRecords: that object already)."""
    text = json.dumps(
        _canonical(spec_of(value)), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return blake2b(text.encode(), digest_size=VERSION_HEX // 2).hexdigest()


def _canonical(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$bytes": base64.b64encode(v).decode().rstrip("=")}
    if isinstance(v, dict):
        b = v.get("$bytes") if len(v) == 1 else None
        if isinstance(b, str):
            return {"$bytes": b.rstrip("=")}
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_canonical(x) for x in v]
    if v is None or isinstance(v, str | int | bool):
        return v
    return {"$unknown": repr(v)}  # (not in the DAG-CBOR data model: refused at intake)


def serving(state: str, health: str = "", checked: bool = False) -> bool:
    """Whether a replica serves (local, or as a status record says): the one place an
    update asks "is the new version healthy?". `health` is the replica's health verdict
    when it reports one, `checked` whether its workload declares a health check: then it
    serves only once healthy; without a check, running is serving."""
    if checked:
        return state == "running" and health == "healthy"
    return state in ("running", "healthy")


__all__ = ["NOT_SPEC", "VERSION_HEX", "serving", "spec_of", "spec_version"]
