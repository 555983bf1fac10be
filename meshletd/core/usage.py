"""Usage: what this meshlet's replicas use, counted in the ledger per period, and the usage
record written at the end of each period (docs/protocol.md, section 11)."""

from __future__ import annotations

from .bidding import Bidding
from .records import NSID_USAGE
from .state import Replica, ReplicaKey


class UsageCounting(Bidding):
    """The ledger's side of the local replicas."""

    def _account(self, key: ReplicaKey, rep: Replica) -> None:
        """Count a running replica's use up to now in the ledger."""
        if rep.state != "running":
            return
        e = self.workloads.get(key[0])
        period_start = self.ledger.period_start
        if e is None or period_start is None:
            rep.since = self.now
            return
        start = max(rep.since, period_start)
        self.ledger.add(e.wl.owner, e.wl.milli_cpu, e.wl.memory_mib, max(self.now - start, 0))
        rep.since = self.now

    def _usage_tick(self) -> None:
        """At the end of a usage period: count every replica up to it, write our usage
        record of it, start the next period."""
        ledger = self.ledger
        end = ledger.period_end()
        if end is None:
            ledger.start_period(self.now)
            return
        if self.now < end:
            return
        saved = self.now
        self.now = end
        for key, rep in self._replicas.items():
            self._account(key, rep)
        self.now = saved
        rec = ledger.close_period(end)
        if rec is not None:
            self._put(NSID_USAGE, f"u{rec.period_start}", rec)
        start = ledger.start_period(self.now)
        for rep in self._replicas.values():
            if rep.state == "running":
                rep.since = max(rep.since, start)


__all__ = ["UsageCounting"]
