"""Orphans: bids and statuses that name a workload this meshlet has not seen (yet).

A bid can arrive before its workload (another PDS, a lost firehose event healed later), so
it is kept until the workload comes; but the workload URI is whatever the writer put in its
record, so what is kept is bounded (docs/protocol.md, section 20): at most
ORPHANS_PER_MESHLET per writing meshlet between events (its oldest go first: a writer that
floods only loses its own), and none older than ORPHAN_TTL_MS. A deleted bid or status is
forgotten."""

from __future__ import annotations

from typing import TypeVar

from .bounds import ORPHAN_TTL_MS, ORPHANS_PER_MESHLET
from .records import Bid, WorkloadStatus

_R = TypeVar("_R", Bid, WorkloadStatus)


class Orphans:
    """The bounded store of orphan bids and statuses, by the workload URI they name."""

    def __init__(self) -> None:
        self.bids: dict[str, list[Bid]] = {}
        self.statuses: dict[str, list[WorkloadStatus]] = {}
        # workload URI -> local time its first orphan arrived; insertion order is time order
        self.first_seen: dict[str, int] = {}
        self._per_meshlet: dict[str, int] = {}  # writer -> orphans it has here
        self.over: set[str] = set()  # writers above ORPHANS_PER_MESHLET (trim them)

    def __len__(self) -> int:
        return sum(self._per_meshlet.values())

    def add_bid(self, b: Bid, now: int) -> None:
        """Keep a bid whose workload is unknown."""
        self.bids.setdefault(b.workload_uri, []).append(b)
        self._count(b.workload_uri, b.meshlet, now)

    def add_status(self, st: WorkloadStatus, now: int) -> None:
        """Keep a status whose workload is unknown."""
        self.statuses.setdefault(st.workload_uri, []).append(st)
        self._count(st.workload_uri, st.meshlet, now)

    def _count(self, workload_uri: str, meshlet: str, now: int) -> None:
        if workload_uri not in self.first_seen:
            self.first_seen[workload_uri] = now
        n = self._per_meshlet.get(meshlet, 0) + 1
        self._per_meshlet[meshlet] = n
        if n > ORPHANS_PER_MESHLET:
            self.over.add(meshlet)

    def _uncount(self, meshlet: str) -> None:
        n = self._per_meshlet[meshlet] - 1
        if n:
            self._per_meshlet[meshlet] = n
        else:
            del self._per_meshlet[meshlet]

    def take(self, workload_uri: str) -> tuple[list[Bid], list[WorkloadStatus]]:
        """The orphans of a workload that arrived (or was deleted), forgotten here."""
        bids = self.bids.pop(workload_uri, [])
        statuses = self.statuses.pop(workload_uri, [])
        self.first_seen.pop(workload_uri, None)
        for b in bids:
            self._uncount(b.meshlet)
        for st in statuses:
            self._uncount(st.meshlet)
        return bids, statuses

    def remove_bid(self, uri: str) -> bool:
        """Forget a deleted orphan bid; False when it is not one."""
        return self._remove(self.bids, uri)

    def remove_status(self, uri: str) -> bool:
        """Forget a deleted orphan status; False when it is not one."""
        return self._remove(self.statuses, uri)

    def _remove(self, store: dict[str, list[_R]], uri: str) -> bool:
        for workload_uri, kept in store.items():
            for i, rec in enumerate(kept):
                if rec.uri == uri:
                    del kept[i]
                    self._uncount(rec.meshlet)
                    self._forget_if_empty(workload_uri)
                    return True
        return False

    def _forget_if_empty(self, workload_uri: str) -> None:
        if not self.bids.get(workload_uri, True):
            del self.bids[workload_uri]
        if not self.statuses.get(workload_uri, True):
            del self.statuses[workload_uri]
        if workload_uri not in self.bids and workload_uri not in self.statuses:
            self.first_seen.pop(workload_uri, None)

    def expire(self, now: int) -> None:
        """Drop the orphans of workloads that have not arrived ORPHAN_TTL_MS after their
        first orphan."""
        since = self.first_seen
        while since:
            workload_uri, at = next(iter(since.items()))
            if at > now - ORPHAN_TTL_MS:
                break
            self.take(workload_uri)

    def trim(self) -> None:
        """Bring every writer back to ORPHANS_PER_MESHLET, dropping its oldest orphans."""
        for meshlet in sorted(self.over):
            excess = self._per_meshlet.get(meshlet, 0) - ORPHANS_PER_MESHLET
            for workload_uri in list(self.first_seen):
                if excess <= 0:
                    break
                excess = self._drop_from(self.bids.get(workload_uri, []), meshlet, excess)
                excess = self._drop_from(self.statuses.get(workload_uri, []), meshlet, excess)
                self._forget_if_empty(workload_uri)
        self.over.clear()

    def _drop_from(self, kept: list[_R], meshlet: str, excess: int) -> int:
        """Drop up to `excess` records of `meshlet` from `kept`, oldest first; the rest."""
        i = 0
        while i < len(kept) and excess > 0:
            if kept[i].meshlet == meshlet:
                del kept[i]
                excess -= 1
                self._uncount(meshlet)
            else:
                i += 1
        return excess


__all__ = ["Orphans"]
