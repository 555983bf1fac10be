"""A workload's update history at the JSON boundary (docs/protocol.md, section 25): its
spec version, derived from the value; its previous spec (`previous`), as a workload of the
same name and placement; the last rollback (`rollback`). Kept apart from `records.py`,
which calls these with its own converters (passed in: no import cycle)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from meshletd.core.records import Record, Workload
from meshletd.core.versions import NOT_SPEC, spec_of, spec_version
from meshletd.errors import InvalidRecord

FromJson = Callable[..., Record | None]


def history_fields(
    uri: str, cid: str, value: Mapping[str, Any], from_json: FromJson
) -> dict[str, Any]:
    """The `Workload` fields a record's history gives: version, previous, rollback."""
    rollback = value.get("rollback")
    rollback = rollback if isinstance(rollback, Mapping) else {}
    return {
        "version": spec_version(value),
        "rollback_version": str(rollback.get("version", "")),
        "rollback_reason": str(rollback.get("reason", "")),
        "previous": _previous(uri, cid, value, from_json),
    }


def _previous(uri: str, cid: str, value: Mapping[str, Any], from_json: FromJson) -> Workload | None:
    """The previous spec as a workload of the same name, placement and history fields;
    None when absent, or when it would not be a valid workload (it is an `unknown` in the
    lexicon: judged here by the same rule as any workload, section 19.1)."""
    prev = value.get("previous")
    if not isinstance(prev, Mapping) or not prev:
        return None
    kept = {k: v for k, v in value.items() if k in NOT_SPEC and k not in ("previous", "rollback")}
    merged = {**kept, **{k: v for k, v in prev.items() if k not in NOT_SPEC}}
    try:
        got = from_json(uri, cid, merged, validate=True)
    except (InvalidRecord, KeyError, ValueError, TypeError):
        return None
    return got if isinstance(got, Workload) else None


def history_json(record: Workload, to_json: Callable[[Record], dict[str, Any]]) -> dict[str, Any]:
    """The `previous` and `rollback` a workload's JSON form carries (none when empty)."""
    out: dict[str, Any] = {}
    if record.previous is not None:
        prev = spec_of(to_json(record.previous))
        out["previous"] = {k: v for k, v in prev.items() if k != "$type"}
    if record.rollback_version:
        out["rollback"] = {"version": record.rollback_version, "reason": record.rollback_reason}
    return out


__all__ = ["history_fields", "history_json"]
