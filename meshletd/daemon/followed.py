"""The records this meshlet follows, as the read model and the owner's commands need them.

`Followed` is fed every verified record event of the watched repos (firehose, resync,
hints): workloads, bids and workloadStatus records grouped by the workload they name, and
usage records, each as its core record (`meshletd.core.records`). The owner's commands
also note the workloads they just wrote, so `meshletctl` sees a new workload before the
firehose brings it back.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from meshletd.atproto.records import record_from_json
from meshletd.core.nsid import NSID_BID, NSID_STATUS, NSID_USAGE, NSID_WORKLOAD
from meshletd.core.records import Bid, Record, Usage, Workload, WorkloadStatus
from meshletd.jsonvalue import RecordChange

log = logging.getLogger("meshletd.node")


def core_record(ev: RecordChange, reader: str) -> Record | None:
    """The core's typed record of a change that is not a delete; None (said in the log,
    naming the `reader` that skips it) when the record is malformed, or of a collection
    the core does not read."""
    try:
        return record_from_json(ev.uri, ev.cid or "", ev.record or {})
    except (KeyError, ValueError, TypeError) as e:
        log.warning("record %s ignored by the %s: %s", ev.uri, reader, e)
        return None


def owner_of(uri: str) -> str:
    """The repo (DID) in `at://<did>/<collection>/<rkey>`."""
    return uri[len("at://") :].split("/", 1)[0]


@dataclass
class Followed:
    """Workloads, bids, statuses and usage of the watched repos, as core records (the one
    vocabulary: `meshletd.core.records`). A record the conversion refuses is left out, with
    a log line."""

    workloads: dict[str, Workload] = field(default_factory=dict)  # by URI
    # workload URI -> record URI -> the bid / status naming that workload
    bids: dict[str, dict[str, Bid]] = field(default_factory=dict)
    statuses: dict[str, dict[str, WorkloadStatus]] = field(default_factory=dict)
    usages: dict[str, Usage] = field(default_factory=dict)  # by URI

    def apply(self, ev: RecordChange) -> None:
        """Take one verified record change."""
        if ev.collection == NSID_WORKLOAD:
            if ev.action == "delete":
                # A refused version counts as absent too; the firehose says why it refused.
                if self.workloads.pop(ev.uri, None) is not None:
                    log.info("workload %s is gone", ev.uri)
                return
            wl = core_record(ev, "read model")
            if isinstance(wl, Workload):
                self.workloads[ev.uri] = wl
                log.info("workload %s (%s) seen", wl.name, ev.uri)
        elif ev.collection == NSID_USAGE:
            self._apply_usage(ev)
        elif ev.collection == NSID_BID or ev.collection == NSID_STATUS:
            if ev.action == "delete":
                tables = self.bids if ev.collection == NSID_BID else self.statuses
                for per in tables.values():
                    per.pop(ev.uri, None)
                return
            rec = core_record(ev, "read model")
            if isinstance(rec, Bid):
                self.bids.setdefault(rec.workload_uri, {})[ev.uri] = rec
            elif isinstance(rec, WorkloadStatus):
                self.statuses.setdefault(rec.workload_uri, {})[ev.uri] = rec

    def _apply_usage(self, ev: RecordChange) -> None:
        if ev.action == "delete":
            self.usages.pop(ev.uri, None)
            return
        usage = core_record(ev, "fair-share ledger")
        if isinstance(usage, Usage):
            self.usages[ev.uri] = usage

    def named(self, owner: str, name: str) -> list[str]:
        """URIs of `owner`'s workloads called `name`."""
        return [u for u, w in self.workloads.items() if w.owner == owner and w.name == name]
