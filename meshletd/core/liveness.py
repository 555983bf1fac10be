"""Liveness: which peers this meshlet probes, and which it suspects lost (docs/protocol.md,
section 8). Probes travel over XRPC (no PDS writes); the core only decides whom to probe
and what the answers mean."""

from __future__ import annotations

from .actions import ProbePeer
from .cluster import ClusterView
from .hashing import watch_score
from .timing import Timing


class Liveness:
    """The watch ring and the suspicions of one meshlet.

    Every verified meshlet sits on a ring ordered by `watch_score`; a meshlet probes its
    successors until `watchers` of them are not suspected. A watched peer that fails
    `probe_failures` probes in a row is suspected until it answers again."""

    def __init__(self, me: str, cluster: ClusterView, timing: Timing) -> None:
        self.me = me
        self.cluster = cluster
        self.t = timing
        self.suspects: set[str] = set()
        self.next_probe = 0  # local time of the next probe round
        self._watched: list[str] = []
        self._probes: list[ProbePeer] = []  # ProbePeer actions for _watched (immutable)
        self._watch_key: tuple[int, int, int] = (-1, -1, -1)
        self._suspect_changes = 0
        self._answered_at: dict[str, int] = {}  # peer -> when it last answered a probe
        self._ring_after: list[str] = []
        self._ring_version = -1
        self._failures: dict[str, int] = {}  # peer -> consecutive failed probes

    def watch_list(self) -> list[str]:
        """The peers we probe: our successors on the watch ring until `watchers` of them are
        not suspected (at most 3 x watchers). Skipping suspected peers keeps every live
        meshlet watched when neighbours die, and tells a cut-off meshlet from dead peers."""
        key = (self.cluster.version, len(self.suspects), self._suspect_changes)
        if key == self._watch_key:
            return self._watched
        if self._ring_version != self.cluster.version:
            ring = sorted(self.cluster.all_verified(), key=lambda m: watch_score(m, ""))
            self._ring_after = []
            if self.me in ring and len(ring) > 1:
                i = ring.index(self.me)
                k = min(3 * self.t.watchers, len(ring) - 1)
                self._ring_after = [ring[(i + j) % len(ring)] for j in range(1, k + 1)]
            self._ring_version = self.cluster.version
        out: list[str] = []
        live = 0
        for m in self._ring_after:
            out.append(m)
            if m not in self.suspects:
                live += 1
                if live >= self.t.watchers:
                    break
        self._watched = out
        self._probes = [ProbePeer(m) for m in out]
        self._watch_key = key
        return out

    def probes(self) -> list[ProbePeer]:
        """The probe actions of the current watch list (shared, immutable values)."""
        self.watch_list()
        return self._probes

    def on_probe(self, meshlet: str, ok: bool, now: int) -> bool:
        """Record one probe's answer at local time `now`; True when it makes `meshlet` a new
        suspect (its `probe_failures`-th failure in a row)."""
        if ok:
            self._answered_at[meshlet] = now
            self._failures.pop(meshlet, None)
            if meshlet in self.suspects:
                self.suspects.discard(meshlet)
                self._suspect_changes += 1
            return False
        n = self._failures.get(meshlet, 0) + 1
        self._failures[meshlet] = n
        if n >= self.t.probe_failures and meshlet not in self.suspects:
            self.suspects.add(meshlet)
            self._suspect_changes += 1
            return True
        return False

    def isolated(self, now: int) -> bool:
        """True when no peer we watch has answered recently: the latest probe of every one
        failed, or it has not answered for `probe_failures` probe intervals (it never did, or
        it was watched long ago). Then the fault is more likely ours (cut off) than theirs,
        and we open no replacement rounds. A peer added to the watch list because another
        became suspected has not answered yet, or answered when it was last watched, possibly
        long ago; counting it as alive let a cut-off meshlet open rounds (docs/protocol.md,
        section 8)."""
        watched = self.watch_list()
        answered = self._answered_at
        failures = self._failures
        since = now - self.t.probe_failures * self.t.probe_interval_ms
        return len(watched) > 1 and not any(
            answered.get(m, since - 1) >= since and failures.get(m, 0) == 0 for m in watched
        )


__all__ = ["Liveness"]
