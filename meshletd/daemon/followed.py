"""The records this meshlet follows, as the read model and the owner's commands need them.

`Followed` is fed every verified record event of the watched repos (firehose, resync,
hints): workloads as published (JSON and CID), bids and workloadStatus records grouped by
the workload they name, and usage records. The owner's commands also note the workloads
they just wrote, so `meshletctl` sees a new workload before the firehose brings it back.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshletd.core.records import (
    NSID_BID,
    NSID_STATUS,
    NSID_USAGE,
    NSID_WORKLOAD,
    Record,
    Usage,
    record_from_json,
)

log = logging.getLogger("meshletd.node")


class RecordChange(Protocol):
    """What `Followed` reads of a verified record event (`atproto.firehose.RecordEvent`)."""

    @property
    def did(self) -> str: ...
    @property
    def collection(self) -> str: ...
    @property
    def rkey(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def cid(self) -> str | None: ...
    @property
    def record(self) -> dict[str, Any] | None: ...
    @property
    def uri(self) -> str: ...


def core_record(ev: RecordChange, reader: str) -> Record | None:
    """The core's typed record of a change that is not a delete; None (said in the log,
    naming the `reader` that skips it) when the record is malformed, or of a collection
    the core does not read."""
    try:
        return record_from_json(ev.uri, ev.cid or "", ev.record or {})
    except (KeyError, ValueError, TypeError) as e:
        log.warning("record %s ignored by the %s: %s", ev.uri, reader, e)
        return None


@dataclass(frozen=True, slots=True)
class PublishedWorkload:
    """A workload record as its owner published it."""

    cid: str | None
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.record.get("name", ""))

    @property
    def replicas(self) -> int:
        return int(self.record.get("replicas", 1))


def owner_of(uri: str) -> str:
    """The repo (DID) in `at://<did>/<collection>/<rkey>`."""
    return uri[len("at://") :].split("/", 1)[0]


@dataclass
class Followed:
    workloads: dict[str, PublishedWorkload] = field(default_factory=dict)  # by URI
    # workload URI -> "<meshlet DID>/<rkey>" -> the record, with `meshletDid` added
    bids: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    statuses: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    usages: dict[str, Usage] = field(default_factory=dict)  # by URI

    def apply(self, ev: RecordChange) -> None:
        """Take one verified record change."""
        if ev.collection == NSID_WORKLOAD:
            if ev.action == "delete":
                # A refused version counts as absent too; the firehose says why it refused.
                if self.workloads.pop(ev.uri, None) is not None:
                    log.info("workload %s is gone", ev.uri)
            else:
                self.workloads[ev.uri] = PublishedWorkload(ev.cid, dict(ev.record or {}))
                log.info("workload %s (%s) seen", (ev.record or {}).get("name"), ev.uri)
        elif ev.collection == NSID_USAGE:
            self._apply_usage(ev)
        elif ev.collection in (NSID_BID, NSID_STATUS):
            table = self.bids if ev.collection == NSID_BID else self.statuses
            record = ev.record or {}
            target = (record.get("workload") or {}).get("uri")
            key = f"{ev.did}/{ev.rkey}"
            if ev.action == "delete":
                for per in table.values():
                    per.pop(key, None)
            elif target:
                table.setdefault(target, {})[key] = {"meshletDid": ev.did, **record}

    def _apply_usage(self, ev: RecordChange) -> None:
        if ev.action == "delete":
            self.usages.pop(ev.uri, None)
            return
        usage = core_record(ev, "fair-share ledger")
        if isinstance(usage, Usage):
            self.usages[ev.uri] = usage

    def raw_workload(self, uri: str) -> dict[str, Any] | None:
        """The workload's record as published (the engine builds replica specs from it)."""
        got = self.workloads.get(uri)
        return got.record if got is not None else None

    def workload_cid(self, uri: str) -> str | None:
        got = self.workloads.get(uri)
        return got.cid if got is not None else None

    def named(self, owner: str, name: str) -> list[str]:
        """URIs of `owner`'s workloads called `name`."""
        prefix = f"at://{owner}/"
        return [u for u, w in self.workloads.items() if u.startswith(prefix) and w.name == name]
