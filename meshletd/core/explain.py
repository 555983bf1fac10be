"""Why pending: a human sentence for every slot nobody serves (or whose host is being
replaced), judged from what the core knows. Pure queries: they change nothing
(docs/protocol.md, section 15)."""

from __future__ import annotations

from .bounds import MAX_ROUND
from .placement import chained_round_at, round0_owners, round0_window
from .policy import REASON_TEXT
from .records import Bid, Workload, format_datetime_ms
from .rounds import Rounds


class Explanations(Rounds):
    """The "why pending" queries of the scheduler."""

    def pending_reasons(self, workload_uri: str) -> dict[int, str]:
        """slot -> why that slot of the workload is not (or may soon not be) served, for every
        slot `pending_reason` has a reason for; {} when all are served or it is unknown. A
        workload refused at intake (section 20: beyond its owner's bound) gives the refusal
        for each of its slots."""
        e = self.workloads.get(workload_uri)
        if e is None:
            why = self.refused.get(workload_uri)
            n = self._refused_slots.get(workload_uri, 0)
            return {s: f"not scheduled: {why}" for s in range(n)} if why else {}
        out: dict[int, str] = {}
        for s in range(e.wl.replicas):
            why = self.pending_reason(workload_uri, s)
            if why is not None:
                out[s] = why
        return out

    def pending_reason(self, workload_uri: str, slot: int) -> str | None:
        """A human sentence saying why slot `slot` of the workload has no owner here (round 0
        still bidding, no eligible meshlet, the last round closed without a winner and why,
        judged from the bids and declines with their `free`), or why its owner is being
        replaced (suspected lost, draining). None when the slot is owned by a meshlet that is
        neither suspected nor draining, when it is a finished job, or when the workload is
        unknown. A pure query: reads what the core knows, changes nothing
        (docs/protocol.md, section 15)."""
        e = self.workloads.get(workload_uri)
        if e is None or not 0 <= slot < e.wl.replicas:
            return None
        if e.finished and slot in e.finished:
            return None
        wl = e.wl
        t = self.t
        now = self.now
        opens0, deadline0, close0 = round0_window(wl, t)
        nobody = self._nobody_eligible(wl)
        if e.owners is None and now < close0:
            if nobody:
                return f"{nobody}; round 0 closes at {self._when(close0)}"
            if now < opens0:
                return f"bidding: round 0 opens at {self._when(opens0)}"
            b0 = [b for b in e.bids if b.round == 0]
            offers = sum(1 for b in b0 if b.slots >= 1)
            return (
                f"bidding: round 0 closes at {self._when(close0)} "
                f"({offers} offer(s), {len(b0) - offers} decline(s) so far)"
            )
        cur = e.owners[slot] if e.owners is not None else None
        rounds = self._slot_rounds(e, slot)
        if cur is not None:
            host = cur[1]
            if host in self.liveness.suspects:
                what = f"its host {host} is suspected lost (probes fail)"
            elif self.cluster.draining_since(host) is not None:
                what = f"its host {host} is draining"
            else:
                return None
            later = [rw for rw in rounds if rw.round > cur[0]]
            if not later:
                return f"{what}; no replacement round opened yet"
            rw = later[-1]
            if now < rw.close:
                return f"{what}; replacement round {rw.round} closes at {self._when(rw.close)}"
            why = f"{what}; replacement round {rw.round} closed without a winner: "
            why += self._why_no_winner(wl, rw.bids, rw.start, rw.deadline)
            last = self._reopened.get((workload_uri, slot))
            if last is not None and last[1] == cur:
                at = last[0] + t.reopen_wait_ms(last[2])
                if now < at:
                    why += f"; reopening after {self._when(at)}"
            return why
        if nobody:
            return nobody
        chained = [rw for rw in rounds if rw.round > 0]
        if chained and now < chained[-1].close:
            rw = chained[-1]
            return f"bidding: round {rw.round} of slot {slot} closes at {self._when(rw.close)}"
        if chained:
            rw = chained[-1]
            why = f"round {rw.round} of slot {slot} closed without a winner: "
            why += self._why_no_winner(wl, rw.bids, rw.start, rw.deadline)
        else:
            b0 = [b for b in e.bids if b.round == 0]
            n = wl.replicas
            won = sum(1 for o in round0_owners(self.cluster, t, wl, e.bids) if o is not None)
            if won:
                why = f"round 0 filled {won} of {n} slot(s), not slot {slot}: "
            else:
                why = "round 0 closed without a winner: "
            why += self._why_no_winner(wl, b0, opens0, deadline0)
        next_round = chained_round_at(now, close0, t)
        if next_round is None:
            return (
                f"{why}; not offered again: its rounds would pass the lexicon's maximum "
                f"({MAX_ROUND}) (createdAt {self._when(opens0)}); publish a new version"
            )
        r, start = next_round
        if now < start:
            return f"{why}; offered again in round {r} at {self._when(start)}"
        until = self._when(start + t.replacement_window_ms)
        return f"{why}; offered again in round {r}, open until {until}"

    def _nobody_eligible(self, wl: Workload) -> str:
        """'' when some eligible meshlet is not draining; else a sentence saying why not."""
        if self.cluster.active_members(wl):
            return ""
        eligible = self.cluster.eligible_members(wl)
        refused: dict[str, int] = {}
        for m in eligible:
            why = self.cluster.policy_refusal(wl, m)
            if why is not None:
                refused[why] = refused.get(why, 0) + 1
        if refused and sum(refused.values()) == len(eligible):
            what = ", ".join(f"{n} ({REASON_TEXT.get(k, k)})" for k, n in sorted(refused.items()))
            return f"every eligible meshlet's host policy refuses it: {what}"
        if eligible:
            return f"every eligible meshlet ({len(eligible)}) is draining"
        cons = []
        if wl.arch:
            cons.append("arch=" + ",".join(wl.arch))
        if wl.labels:
            cons.append("labels=" + ",".join(wl.labels))
        if wl.avoid:
            cons.append("avoid=" + ",".join(sorted(wl.avoid)))
        if wl.ports:  # section 22: only hosts whose policy publishes ports
            cons.append(f"ports={len(wl.ports)} (a host policy publishing that many)")
        got = f" (constraints {' '.join(cons)})" if cons else ""
        return f"no eligible meshlet in cluster {wl.cluster!r} of {wl.owner}{got}"

    def _when(self, at: int) -> str:
        """A time as a datetime and relative to now ("in 1.5 s", "3 s ago")."""
        d = at - self.now
        rel = f"in {d // 1000}.{d % 1000 // 100} s" if d >= 0 else f"{-d // 1000} s ago"
        return f"{format_datetime_ms(at)} ({rel})"

    def _why_no_winner(self, wl: Workload, bids: list[Bid], start: int, deadline: int) -> str:
        """Why the bids of one round gave (this slot) no winner, in words."""
        if not bids:
            if self._small_cluster(wl):
                return "no bids"
            return "no bids (in a cluster this large, candidates without room stay silent)"
        counts: dict[str, int] = {}
        for b in bids:
            if b.slots < 1:
                kind = "declined"
            elif b.created_at < start or b.created_at > deadline:
                kind = "bid outside the window"
            elif b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib:
                kind = "offered too little"
            elif not self.cluster.eligible(wl, b.meshlet):
                kind = "not eligible"
            elif not self.cluster.policy_admits(wl, b.meshlet, deadline + self.t.settle_ms):
                kind = "refused by its host policy"
            elif not self._counts(wl, b, start, deadline):
                kind = "draining"
            else:
                kind = "valid, taken by other slots"
            counts[kind] = counts.get(kind, 0) + 1
        answers = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        short = [
            b for b in bids if b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib
        ]
        if not short:
            return f"answers: {answers}"
        best = max(bids, key=lambda b: (b.free_milli_cpu, b.free_memory_mib, b.meshlet))
        return (
            f"not enough free capacity for {wl.milli_cpu} milli-CPU / {wl.memory_mib} MiB "
            f"(largest free seen: {best.free_milli_cpu} milli-CPU / {best.free_memory_mib} MiB "
            f"on {best.meshlet}); answers: {answers}"
        )


__all__ = ["Explanations"]
