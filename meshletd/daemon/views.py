"""How records look in the read API: rows of `farm.meshlet.defs` views built from a
host's status record or a refused workload record (pure, no state)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshletd.atproto.frames import Refusal
from meshletd.atproto.services import status_services_json
from meshletd.core.nsid import NSID_WORKLOAD
from meshletd.core.records import WorkloadStatus
from meshletd.daemon.followed import owner_of

LIVE_STATES = ("pulling", "starting", "running")
REASON_MAX = 256  # graphemes: the lexicon's bound on replicaView.reason
PROBLEM_MAX = 1000  # characters: the lexicon's bound on recordProblem.reason


def status_row(s: WorkloadStatus) -> dict[str, Any]:
    """A replicaView row from a host's status record."""
    row: dict[str, Any] = {
        "workload": s.workload_uri,
        "meshletDid": s.meshlet,
        "slot": s.slot,
        "round": s.round,
        "state": s.state,
        "restarts": s.restarts,
    }
    if s.exit_code is not None:
        row["exitCode"] = s.exit_code
    if s.unit is not None:
        row["unit"] = s.unit
    serving(row, s)
    return row


def serving(row: dict[str, Any], s: WorkloadStatus) -> None:
    """What a host's status says of how its replica serves: health, endpoints, message."""
    row.update(status_services_json(s))
    if s.message:
        row["message"] = s.message
    if s.version:  # the version it runs; an update that failed on it (section 25)
        row["version"] = s.version
    if s.failed_version:
        row["failedVersion"] = s.failed_version


def clip(text: str, limit: int = REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def invalid_workload_views(
    refused: Iterable[Refusal], owner: str | None = None
) -> list[dict[str, Any]]:
    """The workload records among `refused` (of `owner`, or of anyone) as
    `farm.meshlet.defs#invalidWorkloadView`s, newest first (by rkey)."""
    prefix = f"at://{owner}/" if owner else "at://"
    out = []
    for r in refused:
        if not r.uri.startswith(prefix) or r.uri.split("/")[3:4] != [NSID_WORKLOAD]:
            continue
        row: dict[str, Any] = {
            "uri": r.uri,
            "ownerDid": owner_of(r.uri),
            "problem": {"field": r.field or "", "reason": clip(r.reason, PROBLEM_MAX)},
        }
        if r.cid:
            row["cid"] = r.cid
        if r.name is not None:
            row["name"] = r.name
        out.append(row)
    return sorted(out, key=lambda row: row["uri"].rsplit("/", 1)[1], reverse=True)
