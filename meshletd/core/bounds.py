"""The bounds the lexicons put on the values the core reads and writes, and the core's own
bounds on rounds and on what others' records make it remember (docs/protocol.md, section 20).

The lexicons in `lexicons/` are the truth: tests/unit/test_core_bounds.py checks every
constant below that mirrors one of them. The core applies them itself, at intake and before
every write, so that a record the lexicons refuse never enters a placement and a record the
core cannot publish is never acted on, whatever adapter feeds it (daemon or simulator).
"""

from __future__ import annotations

from .records import Bid, Workload, WorkloadStatus

# -- mirrored from lexicons/commune/scheduler/*.json ------------------------------------
MAX_ROUND = 1_000_000  # bid.round, workloadStatus.round
MAX_SLOT = 999  # bid.slot, workloadStatus.slot
MAX_REPLICAS = 1000  # workload.replicas (minimum 1)
MAX_SLOTS_OFFERED = 1000  # bid.slots (minimum 0)
MIN_BID_WINDOW_MS = 500  # workload.bidWindowMs
MAX_BID_WINDOW_MS = 600_000
MAX_PRIORITY = 1_099_511_627_776  # |bid.priority|
MAX_MILLI_CPU = 1_024_000  # defs#resources.milliCpu (minimum 0)
MAX_MEMORY_MIB = 16_777_216  # defs#resources.memoryMiB (minimum 0)
MAX_RESTARTS = 1_000_000  # workloadStatus.restarts
MAX_STATUS_MESSAGE = 256  # workloadStatus.message: 256 graphemes (<= 1024 bytes as chars)
MIN_EXIT_CODE = -255  # workloadStatus.exitCode
MAX_EXIT_CODE = 255
MAX_USAGE_ENTRIES = 512  # usage.entries
# datetime: four-digit years, 0001-01-01T00:00:00.000Z .. 9999-12-31T23:59:59.999Z
MIN_TIME_MS = -62_135_596_800_000
MAX_TIME_MS = 253_402_300_799_999

# -- the core's own bounds ----------------------------------------------------------------
CHAINED_FAST_ROUNDS = 1200
"""Chained rounds 1..1200 of a never-filled slot are spaced by P (1 h at P = 3 s)..."""
CHAINED_SLOW_PERIOD_MS = 60_000
"""...and the later ones by a minute, so that round MAX_ROUND opens ~1.9 years after C0."""
ORPHANS_PER_MESHLET = 64
"""Bids and statuses naming a workload not seen (yet), kept per writing meshlet between
events; beyond it that meshlet's oldest go first."""
ORPHAN_TTL_MS = 86_400_000
"""Orphans whose workload has not arrived a day after the first of them are dropped."""
GONE_BIDS_KEPT = 4096
"""Bid URIs of deleted workloads remembered until their own deletion arrives."""
MISSED_KEPT = 1024
"""Replacement rounds remembered as missed (seen after their window) until they close."""
REFUSALS_KEPT = 256
"""Records refused at intake remembered with their reason (the newest)."""
WORKLOADS_PER_OWNER = 512
"""Live workloads of one owner that take part: those with the smallest record keys."""
BIDS_PER_MESHLET = 1024
"""Bids of one meshlet for one live workload that count: the smallest (round, slot, rkey)."""
USAGES_PER_MESHLET = 2048
"""Usage records of one meshlet kept for fair share: the newest by (periodStart, URI)."""
MEMBERSHIPS_PER_REPO = 64
"""Membership records of one repo that count: those with the smallest cluster names."""


def workload_refusal(wl: Workload) -> str:
    """Why the lexicon refuses the fields of `wl` the core uses ('' when it admits them)."""
    if not 1 <= wl.replicas <= MAX_REPLICAS:
        return f"replicas {wl.replicas} outside 1..{MAX_REPLICAS}"
    if not MIN_BID_WINDOW_MS <= wl.bid_window_ms <= MAX_BID_WINDOW_MS:
        return f"bidWindowMs {wl.bid_window_ms} outside {MIN_BID_WINDOW_MS}..{MAX_BID_WINDOW_MS}"
    if not 0 <= wl.milli_cpu <= MAX_MILLI_CPU or not 0 <= wl.memory_mib <= MAX_MEMORY_MIB:
        return "resources outside the lexicon's range"
    if not MIN_TIME_MS <= wl.created_at <= MAX_TIME_MS:
        return "createdAt outside the datetime range"
    return ""


def bid_refusal(b: Bid) -> str:
    """Why the lexicon refuses the fields of bid `b` the core uses ('' when it admits them).
    A bid of round >= 1 needs a slot (docs/protocol.md, section 2)."""
    if not 0 <= b.round <= MAX_ROUND:
        return f"round {b.round} outside 0..{MAX_ROUND}"
    if b.slot > MAX_SLOT or b.slot < (0 if b.round > 0 else -1):
        return f"slot {b.slot} outside 0..{MAX_SLOT}"
    if not 0 <= b.slots <= MAX_SLOTS_OFFERED:
        return f"slots {b.slots} outside 0..{MAX_SLOTS_OFFERED}"
    if not -MAX_PRIORITY <= b.priority <= MAX_PRIORITY:
        return "priority outside the lexicon's range"
    if not 0 <= b.free_milli_cpu <= MAX_MILLI_CPU or not 0 <= b.free_memory_mib <= MAX_MEMORY_MIB:
        return "free outside the lexicon's range"
    if not MIN_TIME_MS <= b.created_at <= MAX_TIME_MS:
        return "createdAt outside the datetime range"
    return ""


def status_refusal(st: WorkloadStatus) -> str:
    """Why the lexicon refuses the fields of status `st` the core uses ('' when it admits
    them)."""
    if not 0 <= st.round <= MAX_ROUND:
        return f"round {st.round} outside 0..{MAX_ROUND}"
    if not 0 <= st.slot <= MAX_SLOT:
        return f"slot {st.slot} outside 0..{MAX_SLOT}"
    if not 0 <= st.restarts <= MAX_RESTARTS:
        return f"restarts {st.restarts} outside 0..{MAX_RESTARTS}"
    if st.exit_code is not None and not MIN_EXIT_CODE <= st.exit_code <= MAX_EXIT_CODE:
        return f"exitCode {st.exit_code} outside {MIN_EXIT_CODE}..{MAX_EXIT_CODE}"
    if not MIN_TIME_MS <= st.updated_at <= MAX_TIME_MS:
        return "updatedAt outside the datetime range"
    return ""


def clamp(value: int, low: int, high: int) -> int:
    """value, brought into [low, high]."""
    return low if value < low else high if value > high else value


__all__ = [
    "BIDS_PER_MESHLET",
    "CHAINED_FAST_ROUNDS",
    "CHAINED_SLOW_PERIOD_MS",
    "GONE_BIDS_KEPT",
    "MAX_BID_WINDOW_MS",
    "MAX_EXIT_CODE",
    "MAX_MEMORY_MIB",
    "MAX_MILLI_CPU",
    "MAX_PRIORITY",
    "MAX_REPLICAS",
    "MAX_RESTARTS",
    "MAX_ROUND",
    "MAX_SLOT",
    "MAX_SLOTS_OFFERED",
    "MAX_STATUS_MESSAGE",
    "MAX_TIME_MS",
    "MAX_USAGE_ENTRIES",
    "MEMBERSHIPS_PER_REPO",
    "MIN_BID_WINDOW_MS",
    "MIN_EXIT_CODE",
    "MIN_TIME_MS",
    "ORPHANS_PER_MESHLET",
    "ORPHAN_TTL_MS",
    "REFUSALS_KEPT",
    "USAGES_PER_MESHLET",
    "WORKLOADS_PER_OWNER",
    "bid_refusal",
    "clamp",
    "status_refusal",
    "workload_refusal",
]
