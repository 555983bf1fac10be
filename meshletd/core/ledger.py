"""The usage ledger of one meshlet: what each owner's replicas used here in the current
period, the usage records of every meshlet, and the fair-share balances computed from them
(docs/protocol.md, "Fair share")."""

from __future__ import annotations

from .bounds import MAX_USAGE_ENTRIES, USAGES_PER_MESHLET
from .cluster import ClusterView
from .commons import Rule, lent_and_used, rule_of
from .fairshare import balances
from .records import NSID_USAGE, Usage, UsageEntry, at_uri
from .timing import Timing


class UsageLedger:
    """Usage measured here (per owner, this period) and usage published by every meshlet."""

    def __init__(self, me: str, timing: Timing) -> None:
        self.me = me
        self.t = timing
        self.usages: dict[str, Usage] = {}  # usage record URI -> record (every meshlet)
        self._usages_of: dict[str, set[str]] = {}  # meshlet -> URIs of its usages kept
        self.period_start: int | None = None  # None until the first tick
        self._period_use: dict[str, list[int]] = {}  # owner -> [milli-CPU s, MiB s]
        self._balance_at = -1
        self.taken: dict[str, int] = {}
        self.given: dict[str, int] = {}
        self._contribution_key: tuple[int, int, int, int] | None = None
        self._usage_version = 0
        self.lent: dict[str, int] = {}  # over this host's minContribution period (section 23)
        self.used: dict[str, int] = {}

    def put_usage(self, rec: Usage) -> None:
        """Keep a usage record: of one meshlet's, the USAGES_PER_MESHLET newest by
        (periodStart, URI) count for fair share (section 20)."""
        self.usages[rec.uri] = rec
        self._usage_version += 1
        kept = self._usages_of.setdefault(rec.meshlet, set())
        kept.add(rec.uri)
        if len(kept) > USAGES_PER_MESHLET:
            usages = self.usages
            oldest = min(kept, key=lambda u: (usages[u].period_start, u))
            kept.discard(oldest)
            del usages[oldest]

    def delete_usage(self, uri: str) -> None:
        """Forget a deleted usage record."""
        rec = self.usages.pop(uri, None)
        if rec is not None:
            self._usage_version += 1
            kept = self._usages_of.get(rec.meshlet)
            if kept is not None:
                kept.discard(uri)
                if not kept:
                    del self._usages_of[rec.meshlet]

    def add(self, owner: str, milli_cpu: int, memory_mib: int, ms: int) -> None:
        """Count `ms` milliseconds of a replica of `owner` reserving these resources."""
        use = self._period_use.setdefault(owner, [0, 0])
        use[0] += milli_cpu * ms // 1000
        use[1] += memory_mib * ms // 1000

    def period_end(self) -> int | None:
        """When the current period ends (None before the first tick)."""
        if self.period_start is None:
            return None
        return self.period_start + self.t.usage_period_ms

    def close_period(self, end: int) -> Usage | None:
        """End the current period at `end`: our usage record of it (None when nothing ran),
        kept among the usages. The caller has counted every running replica up to `end`."""
        assert self.period_start is not None
        rec = None
        used = [(o, v) for o, v in self._period_use.items() if v[0] or v[1]]
        if len(used) > MAX_USAGE_ENTRIES:
            # The lexicon admits 512 entries: the owners who used most are kept (section 20).
            used.sort(key=lambda x: (-x[1][0], -x[1][1], x[0]))
            used = used[:MAX_USAGE_ENTRIES]
        entries = tuple(UsageEntry(o, v[0], v[1]) for o, v in sorted(used))
        if entries:
            rkey = f"u{self.period_start}"
            rec = Usage(
                uri=at_uri(self.me, NSID_USAGE, rkey),
                meshlet=self.me,
                period_start=self.period_start,
                period_end=end,
                entries=entries,
            )
            self.put_usage(rec)
        self._period_use = {}
        return rec

    def start_period(self, now: int) -> int:
        """Start the period that contains `now`; returns its start."""
        self.period_start = now - now % self.t.usage_period_ms
        return self.period_start

    def refresh_balances(self, now: int, cluster: ClusterView) -> None:
        """Recompute taken/given once per usage period (a snapshot every member can redo)."""
        at = now - now % self.t.usage_period_ms
        if at != self._balance_at:
            owner_of = {m: mo.owner for m, mo in cluster.owners.items()}
            self.taken, self.given = balances(
                self.usages.values(), owner_of, at, self.t.half_life_ms
            )
            self._balance_at = at

    def contribution(
        self, now: int, cluster: ClusterView, me: str, period_days: int | None = None
    ) -> tuple[Rule | None, dict[str, int], dict[str, int]]:
        """This host's free-rider rule (from its own hostPolicy) and (lent, used) per owner
        over its period (section 23), recomputed when the usage period, the cluster or the
        usage records change.
        `period_days` overrides the policy's period (to explain standings without a rule);
        with neither, nothing is computed."""
        rule = rule_of(cluster.policies.get(me))
        days = period_days if period_days is not None else rule.period_days if rule else None
        if days is None:
            return None, {}, {}
        at = now - now % self.t.usage_period_ms
        key = (at, days, cluster.version, self._usage_version)
        if key != self._contribution_key:
            owners = cluster.owners
            counted = cluster.consent_of(me)
            mine = owners.get(me)
            if mine is not None:
                counted = counted | {mine.owner}
            self.lent, self.used = lent_and_used(
                self.usages.values(),
                {m: mo.owner for m, mo in owners.items()},
                {m: mo.milli_cpu for m, mo in owners.items()},
                counted,
                at - days * 86_400_000,
                at,
            )
            self._contribution_key = key
        return rule, self.lent, self.used


__all__ = ["UsageLedger"]
