"""The free-rider rule (docs/protocol.md, section 23): what each owner lent and used over a
host's period, from the public usage records, and whether it stands below the host's
`minContribution`.

- **used(O)**: milli-CPU-seconds O's workloads reserved on meshlets of *other* owners;
- **lent(P)**: milli-CPU-seconds P's meshlets served to *other* owners' workloads;

both over the usage records whose `periodEnd` falls in `(T - periodDays, T]`, `T` the start of
the current usage period (a time the core already has, never a clock read), counting only
entries between two owners the judging host consents to (its membership records, plus its own
owner), and no more per record than the serving meshlet's capacity could reserve in that
period. An owner who used at most `ALLOWANCE_MILLI_CPU_SECONDS` stands well whatever it lent
(a newcomer can start before anyone has needed its machine).

Pure: integers only, no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .records import HostPolicy, Usage

DAY_MS = 86_400_000
DEFAULT_PERIOD_DAYS = 30  # the lexicon's periodDays is required; this is [policy]'s default
ALLOWANCE_MILLI_CPU_SECONDS = 3_600_000  # one CPU-hour per period: a newcomer's start
AFTER = "after"
REFUSE = "refuse"
# The bid priority a host with mode "after" states for a workload of an owner below its
# minimum: the lowest the lexicon admits, so any host that does not defer it wins.
DEFERRED_PRIORITY = -1000


@dataclass(frozen=True, slots=True)
class Standing:
    """One owner's standing under a host's rule: lent and used (milli-CPU-seconds over the
    period), lent/used in permille (None when it used nothing), and whether it is below."""

    owner: str
    lent: int
    used: int
    ratio_permille: int | None
    below: bool


@dataclass(frozen=True, slots=True)
class Rule:
    """A host's minContribution: ratio (permille of used that must be lent), period, mode."""

    ratio_permille: int
    period_days: int
    mode: str

    @property
    def period_ms(self) -> int:
        return self.period_days * DAY_MS


def rule_of(policy: HostPolicy | None) -> Rule | None:
    """The free-rider rule a host policy sets, or None (no rule, or ratio 0)."""
    if policy is None or not policy.min_ratio_permille:
        return None
    days = policy.min_period_days or DEFAULT_PERIOD_DAYS
    mode = REFUSE if policy.min_mode == REFUSE else AFTER
    return Rule(policy.min_ratio_permille, max(days, 1), mode)


def lent_and_used(
    usages: Iterable[Usage],
    owner_of: Mapping[str, str],
    capacity_of: Mapping[str, int],
    counted: frozenset[str],
    start: int,
    end: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """(lent, used) per owner DID in milli-CPU-seconds from the usage records whose periodEnd
    is in (start, end]. An entry counts when the serving meshlet's owner P and the entry's
    owner O differ and both are in `counted`; a record claiming more than its meshlet's
    capacity (milli-CPU, `capacity_of`) could reserve over its period is scaled down to that
    (each entry * bound // claimed, floor). Meshlets with no known owner are ignored."""
    lent: dict[str, int] = {}
    used: dict[str, int] = {}
    for u in usages:
        if not start < u.period_end <= end:
            continue
        host_owner = owner_of.get(u.meshlet)
        if host_owner is None or host_owner not in counted:
            continue
        entries = [
            (e.owner, e.milli_cpu_seconds)
            for e in u.entries
            if e.owner != host_owner and e.owner in counted and e.milli_cpu_seconds > 0
        ]
        if not entries:
            continue
        claimed = sum(v for _, v in entries)
        bound = capacity_of.get(u.meshlet, 0) * max(u.period_end - u.period_start, 0) // 1000
        for owner, v in entries:
            if claimed > bound:
                v = v * bound // claimed
            if v:
                used[owner] = used.get(owner, 0) + v
                lent[host_owner] = lent.get(host_owner, 0) + v
    return lent, used


def standing(
    owner: str, lent: Mapping[str, int], used: Mapping[str, int], rule: Rule | None
) -> Standing:
    """`owner`'s standing: below when it used more than the allowance and lent less than
    ratioPermille/1000 of what it used (lent * 1000 < ratio * used)."""
    lt = lent.get(owner, 0)
    us = used.get(owner, 0)
    ratio = None if us == 0 else lt * 1000 // us
    below = (
        rule is not None
        and us > ALLOWANCE_MILLI_CPU_SECONDS
        and lt * 1000 < rule.ratio_permille * us
    )
    return Standing(owner, lt, us, ratio, below)


__all__ = [
    "AFTER",
    "ALLOWANCE_MILLI_CPU_SECONDS",
    "DAY_MS",
    "DEFAULT_PERIOD_DAYS",
    "DEFERRED_PRIORITY",
    "REFUSE",
    "Rule",
    "Standing",
    "lent_and_used",
    "rule_of",
    "standing",
]
