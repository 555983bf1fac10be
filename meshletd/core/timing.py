"""Protocol constants and round arithmetic (all integers, milliseconds). See docs/protocol.md."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timing:
    """The protocol's time constants. Every meshlet of a commune must use the same values
    for the round arithmetic (skew, grace, replacement window); probe settings are local."""

    skew_ms: int = 250
    """Bound on the clock error of an honest meshlet against true time."""
    grace_ms: int = 1500
    """Propagation allowance: a record written at t is seen by peers by t + grace (usually)."""
    replacement_window_ms: int = 1000
    """Bid window of every round after round 0."""
    probe_interval_ms: int = 500
    probe_failures: int = 5
    """Consecutive failed probes before a watched peer is suspected lost. With the 1 s
    connect timeout a peer is suspected once it has been silent for about
    (probe_failures - 1) x probe_interval_ms + 1 s = 3 s; the interval only sets how late
    after its death the first failing probe starts (docs/protocol.md, section 8)."""
    watchers: int = 3
    """How many meshlets probe each meshlet (and how many each one probes)."""
    fence_timeout_ms: int = 60_000
    """A replica whose slot moved keeps running until the new owner reports running, or this
    long after the losing round closed (make-before-break with a bound)."""
    bid_batch_ms: int = 50
    usage_period_ms: int = 3_600_000
    half_life_ms: int = 7 * 86_400_000
    reopen_backoff_ms: int = 30_000
    """The longest wait before reopening a replacement round that found no winner (the
    first reopen comes at the round's close, then the wait doubles: `reopen_wait_ms`)."""
    lease_renew_ms: int = 90_000
    """A meshlet without endpoint (nobody can probe it) rewrites its lease this often."""
    lease_valid_ms: int = 150_000
    """How long after its renewal our lease counts as fresh (written into the lease)."""
    update_timeout_ms: int = 60_000
    """An update's new replica of a slot that is not serving this long after its start is
    stopped and the update of that version abandoned (docs/protocol.md, section 25). Local:
    it never enters placement."""

    @property
    def settle_ms(self) -> int:
        """From a round's deadline to its close: 2 x skew + grace."""
        return 2 * self.skew_ms + self.grace_ms

    @property
    def chained_period_ms(self) -> int:
        """Spacing of the chained rounds that re-offer a never-filled slot."""
        return self.replacement_window_ms + self.settle_ms

    def reopen_wait_ms(self, opened: int) -> int:
        """After opening `opened` rounds in a row against the same owner of a slot, how long
        from the last one before opening the next when it found no winner: one round's
        length (its close), doubling, at most `reopen_backoff_ms` (docs/protocol.md,
        section 8, "Reopening")."""
        first = self.chained_period_ms
        return min(self.reopen_backoff_ms, first << min(max(opened - 1, 0), 16))


DEFAULT_TIMING = Timing()

LEASE_MAX_VALID_MS = 600_000
"""Observers count a lease fresh for at most this long after its renewal, whatever its
`validMs` says (a bound on what a peer's record can make us believe)."""

FEED_QUIET_MS = 12_000
"""A PDS whose stream (pinged every 5 s) sent no frame and no pong this long is reported
behind (`FeedsBehind`): its repos' leases prove nothing meanwhile (docs/protocol.md, 8)."""

LEASE_SLACK_MS = FEED_QUIET_MS + 3_000
"""A lease's validity must outlast its renewal period by this much: a watcher cut from the
lease's PDS right after hearing it must take that PDS for behind (`FEED_QUIET_MS`, + one
tick and the renewal's delivery) before the last renewal it saw expires; with less, it
suspects a healthy meshlet behind NAT (docs/protocol.md, section 8)."""

__all__ = ["DEFAULT_TIMING", "LEASE_MAX_VALID_MS", "Timing"]
