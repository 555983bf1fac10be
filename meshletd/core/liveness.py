"""Liveness: which peers this meshlet probes, and which it suspects lost (docs/protocol.md,
section 8). Probes travel over XRPC (no PDS writes); the core only decides whom to probe
and what the answers mean. A peer that publishes no endpoint (behind NAT) cannot be
probed: it writes a lease record, and its lease answers for it."""

from __future__ import annotations

from collections.abc import Sequence

from .actions import ProbePeer, RefreshLease
from .cluster import ClusterView
from .hashing import watch_score
from .records import Lease
from .timing import LEASE_MAX_VALID_MS, Timing


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
        self.why: dict[str, str] = {}  # suspect -> why (for the operator's log)
        self.next_probe = 0  # local time of the next probe round
        self._watched: list[str] = []
        self._probes: list[ProbePeer] = []  # ProbePeer actions for _watched (immutable)
        self._watch_key: tuple[int, int, int] = (-1, -1, -1)
        self._suspect_changes = 0  # bumped whenever `suspects` changes
        self._answered_at: dict[str, int] = {}  # peer -> when it last answered a probe
        self._ring_after: list[str] = []
        self._ring_version = -1
        self._failures: dict[str, int] = {}  # peer -> consecutive failed probes
        self._fail_since: dict[str, int] = {}  # peer -> first failure of its current streak
        self._leases: dict[str, tuple[int, int]] = {}  # peer -> (renewedAt, fresh until)
        self._lease_news = 0  # when a lease renewal last reached us (anyone's, ours too)
        # Repos whose PDS we have not heard from lately (FeedsBehind, from the daemon).
        self.feeds_behind: frozenset[str] = frozenset()

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

    def probe_round(
        self, now: int
    ) -> tuple[Sequence[ProbePeer | RefreshLease], list[tuple[str, bool]]]:
        """One probe round: the probes to send, and the answers the leases of the watched
        peers that cannot be probed give at once (meshlet, ok).

        An expired lease counts as a failure only when we know our own view is current: a
        peer we probe answered recently, or a lease renewal (anyone's, our own included)
        reached us after that lease expired, and the daemon has heard from the peer's PDS
        lately (not in `feeds_behind`). Otherwise its silence may be ours (we are cut off
        from the PDSes, or from that one), and it counts as nothing.

        Either way, while the peer is not suspected, an expired lease is also read again
        from its PDS (`RefreshLease`): the firehose may be late while its PDS is not (a
        stream reconnected before its backlog is in, a sequencer that stalled). A newer
        renewal read there comes back as a record and answers the next round; suspicion
        takes `probe_failures` rounds, each read takes one PDS round trip."""
        self.watch_list()
        if not self._leases:
            return self._probes, []
        probes: list[ProbePeer | RefreshLease] = []
        answers: list[tuple[str, bool]] = []
        connected: bool | None = None
        for probe in self._probes:
            m = probe.meshlet
            if not self.lease_judged(m):
                probes.append(probe)
                continue
            until = self._leases[m][1]
            if now <= until:
                answers.append((m, True))
                continue
            if m not in self.suspects:
                probes.append(RefreshLease(m))
            if m in self.feeds_behind:
                continue  # the renewal may be on its PDS, unseen: no answer either way
            if connected is None:
                connected = any(self._answered(p, now) for p in self._probed_peers())
            if connected or self._lease_news > until:
                answers.append((m, False))
        return probes, answers

    def on_lease(self, rec: Lease, now: int) -> None:
        """A lease: fresh until min(renewedAt, when we first saw it) + validMs (capped).
        `seen` bounds a lease stamped by a clock running fast, `renewedAt` one we receive
        late (anti-entropy, our own start): neither is a sign of life now. A new renewal,
        ours included, also shows that what others write reaches us."""
        old = self._leases.get(rec.meshlet)
        if old is not None and old[0] >= rec.renewed_at:
            return  # the same renewal again, or an older one
        seen = now if now > 0 else rec.renewed_at
        until = min(rec.renewed_at, seen) + min(rec.valid_ms, LEASE_MAX_VALID_MS)
        self._leases[rec.meshlet] = (rec.renewed_at, until)
        self._lease_news = now

    def lease_judged(self, meshlet: str) -> bool:
        """A peer that publishes no endpoint and has a lease: judged by it, never probed.
        One with neither (an older meshletd) is probed, and fails, as before."""
        if meshlet not in self._leases:
            return False
        o = self.cluster.owners.get(meshlet)
        return o is not None and not o.endpoint

    def _probed_peers(self) -> list[str]:
        return [m for m in self.watch_list() if not self.lease_judged(m)]

    def _answered(self, meshlet: str, now: int) -> bool:
        """The peer answered its latest probe, within `probe_failures` probe intervals."""
        since = now - self.t.probe_failures * self.t.probe_interval_ms
        return self._answered_at.get(meshlet, since - 1) >= since and not self._failures.get(
            meshlet
        )

    def on_probe(self, meshlet: str, ok: bool, now: int) -> bool:
        """Record one probe's answer at local time `now`; True when it makes `meshlet` a new
        suspect (its `probe_failures`-th failure in a row)."""
        if ok:
            self._answered_at[meshlet] = now
            self._failures.pop(meshlet, None)
            if meshlet in self.suspects:
                self.suspects.discard(meshlet)
                self.why.pop(meshlet, None)
                self._suspect_changes += 1
            return False
        n = self._failures.get(meshlet, 0) + 1
        self._failures[meshlet] = n
        if n == 1:
            self._fail_since[meshlet] = now
        if n >= self.t.probe_failures and meshlet not in self.suspects:
            self.suspects.add(meshlet)
            self.why[meshlet] = self._why(meshlet, n, now)
            self._suspect_changes += 1
            return True
        return False

    @property
    def suspect_changes(self) -> int:
        """A counter that moves whenever `suspects` changes (cheap to watch)."""
        return self._suspect_changes

    def _why(self, meshlet: str, failures: int, now: int) -> str:
        lease = self._leases.get(meshlet)
        if lease is not None and self.lease_judged(meshlet):
            renewed, until = lease
            return (
                f"its lease expired {(now - until) / 1000:.1f} s ago (renewal stamped "
                f"{(now - renewed) / 1000:.1f} s ago; the last renewal of anyone's reached "
                f"us {(now - self._lease_news) / 1000:.1f} s ago)"
            )
        since = self._fail_since.get(meshlet, now)
        return f"{failures} probes failed in a row over {(now - since) / 1000:.1f} s"

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
        if not self._leases:
            return len(watched) > 1 and not any(
                answered.get(m, since - 1) >= since and failures.get(m, 0) == 0 for m in watched
            )
        # A fresh lease shows its writer was alive up to validMs ago, not that we are
        # connected now: only probes answer that (chaos with half the hosts behind NAT: a
        # cut-off watcher whose leased peers still looked fresh suspected its probed peers
        # and opened rounds while cut off). With one probed peer only, its failures are its
        # fault, not ours, once a lease renewal reached us after they began; with none,
        # `probe_round` counts an expired lease only when our view is current.
        probed = self._probed_peers()
        if len(probed) >= 2:
            return not any(self._answered(m, now) for m in probed)
        if len(watched) < 2 or not probed or self._answered(probed[0], now):
            return False
        return self._lease_news <= self._fail_since.get(probed[0], now)


__all__ = ["Liveness"]
