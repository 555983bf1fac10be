"""This meshlet's own host policy, as the bidder and the host (docs/protocol.md, section 21):
what it may still offer an owner under its per-owner cap, whether its bid can count in a
round, and which of the slots it holds its policy no longer admits (they are re-offered,
make-before-break, with the reason in their status).

Observers judge the rest of the policy from the record (`ClusterView.policy_admits`); the
per-owner cap is judged here only, like free capacity: what an owner holds on this meshlet
depends on the placement of all its workloads, which each observer resolves on its own.
"""

from __future__ import annotations

from .placement import Owner, WorkloadEntry
from .policy import OWNER_CAP, owner_cap, refusal
from .records import Workload
from .rounds import Rounds


class Hosting(Rounds):
    """Per-owner caps and the misfits of this meshlet's own host policy."""

    def _owner_held(self, owner: str) -> tuple[int, int, int]:
        """(milli-CPU, MiB, replicas) this meshlet holds for `owner`: slots it owns or runs
        and what its open bids reserve."""
        cpu = mem = n = 0
        wls = self.workloads
        for key, (c, m) in self._owned_capacity.items():
            e = wls.get(key[0])
            if e is not None and e.wl.owner == owner:
                cpu, mem, n = cpu + c, mem + m, n + 1
        for key3, (c, m, _until, slots) in self._reserved.items():
            e = wls.get(key3[0])
            if e is not None and e.wl.owner == owner:
                cpu, mem, n = cpu + c, mem + m, n + slots
        return cpu, mem, n

    def _owner_share_room(self, owner: str) -> tuple[int, int, int | None] | None:
        """(milli-CPU, MiB, replicas or None) this meshlet may still offer `owner` under its
        per-owner cap; None when the owner may hold the whole contribution."""
        pol = self.cluster.policies.get(self.me.did)
        if pol is None or pol.share_of(owner) >= 1000:
            return None
        me = self.me
        cap_cpu, cap_mem, cap_n = owner_cap(
            pol, owner, me.milli_cpu, me.memory_mib, me.max_replicas
        )
        cpu, mem, n = self._owner_held(owner)
        return cap_cpu - cpu, cap_mem - mem, None if cap_n is None else max(cap_n - n, 0)

    def _policy_slots(self, wl: Workload, close: int, slots: int) -> int:
        """How many of `slots` this meshlet may offer for wl in a round closing at `close`
        under its own host policy: 0 when the policy refuses wl then (the round closes
        outside the lending schedule, or a refusal), else at most what the owner's cap
        leaves."""
        me = self.me.did
        if slots <= 0 or not self.cluster.policy_admits(wl, me, close):
            return 0
        room = self._owner_share_room(wl.owner)
        if room is None:
            return slots
        cpu, mem, n = room
        fit = min(cpu // max(wl.milli_cpu, 1), mem // max(wl.memory_mib, 1))
        if n is not None:
            fit = min(fit, n)
        return max(min(slots, fit), 0)

    def _policy_misfits(self) -> list[tuple[WorkloadEntry, int, Owner, str]]:
        """The slots this meshlet owns that its host policy no longer admits, in a fixed
        order, with the reason: refused workloads (evicted owner, image, network, run time),
        then, per owner over its cap, the slots past the cap (the last by URI and slot
        first). Finished job slots are not moved."""
        me = self.me.did
        pol = self.cluster.policies.get(me)
        if pol is None:
            return []
        out: list[tuple[WorkloadEntry, int, Owner, str]] = []
        kept: dict[str, list[tuple[WorkloadEntry, int, Owner]]] = {}
        for uri in sorted(self._involved):
            e = self.workloads.get(uri)
            if e is None or e.owners is None:
                continue
            why = refusal(pol, e.wl)
            for s, cur in enumerate(e.owners):
                if cur is None or cur[1] != me or (e.finished and s in e.finished):
                    continue
                if why is not None:
                    out.append((e, s, cur, why))
                else:
                    kept.setdefault(e.wl.owner, []).append((e, s, cur))
        ident = self.me
        for owner in sorted(kept):
            if pol.share_of(owner) >= 1000:
                continue
            cap_cpu, cap_mem, cap_n = owner_cap(
                pol, owner, ident.milli_cpu, ident.memory_mib, ident.max_replicas
            )
            slots = kept[owner]
            cpu = sum(e.wl.milli_cpu for e, _s, _c in slots)
            mem = sum(e.wl.memory_mib for e, _s, _c in slots)
            n = len(slots)
            for e, s, cur in reversed(slots):
                if cpu <= cap_cpu and mem <= cap_mem and (cap_n is None or n <= cap_n):
                    break
                out.append((e, s, cur, OWNER_CAP))
                cpu, mem, n = cpu - e.wl.milli_cpu, mem - e.wl.memory_mib, n - 1
        return out


__all__ = ["Hosting"]
