"""Fair share: a half-life-decayed, public usage ledger and the integer priority formula.

Everything is integer arithmetic so that every member computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .records import Usage

# round(65536 * 2 ** (-i / 16)) for i in 0..15: 2^-x in Q16 fixed point, by sixteenths.
DECAY_Q16 = (
    65536, 62757, 60097, 57549, 55109, 52773, 50535, 48393,
    46341, 44376, 42495, 40693, 38968, 37316, 35734, 34219,
)  # fmt: skip

PRIORITY_SCALE = 1000
DAMPING_MILLI_CPU_SECONDS = 3_600_000  # one CPU-hour: small histories give small priorities


def decay(value: int, age_ms: int, half_life_ms: int) -> int:
    """value * 2^(-age/half_life), in integers: halve once per whole half-life, then multiply
    by DECAY_Q16[sixteenths of the remainder] and shift right 16 (floor)."""
    if age_ms <= 0:
        return value
    halvings, rem = divmod(age_ms, half_life_ms)
    if halvings >= 63:
        return 0
    return ((value >> halvings) * DECAY_Q16[rem * 16 // half_life_ms]) >> 16


def balances(
    usages: Iterable[Usage], owner_of: Mapping[str, str], at_ms: int, half_life_ms: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(taken, given) per owner DID in decayed milli-CPU-seconds at time at_ms, from usage
    records whose period ended by at_ms. Use on another owner's meshlet counts as taken by
    the workload owner and given by the meshlet's owner; use on one's own machine counts as
    neither. Meshlets with no known owner are ignored."""
    taken: dict[str, int] = {}
    given: dict[str, int] = {}
    for u in usages:
        host_owner = owner_of.get(u.meshlet)
        if host_owner is None or u.period_end > at_ms:
            continue
        age = at_ms - u.period_end
        for e in u.entries:
            if e.owner == host_owner:
                continue
            v = decay(e.milli_cpu_seconds, age, half_life_ms)
            taken[e.owner] = taken.get(e.owner, 0) + v
            given[host_owner] = given.get(host_owner, 0) + v
    return taken, given


def meshlet_priority(owner: str, taken: Mapping[str, int], given: Mapping[str, int]) -> int:
    """Bid priority of a meshlet whose owner is `owner`, in [-1000, 1000]:
    floor(1000 * (taken - given) / (taken + given + 3_600_000)). Owners who took more than
    they gave bid higher (they pay back by hosting)."""
    t = taken.get(owner, 0)
    g = given.get(owner, 0)
    return (PRIORITY_SCALE * (t - g)) // (t + g + DAMPING_MILLI_CPU_SECONDS)


def owner_order_key(owner: str, taken: Mapping[str, int]) -> int:
    """When capacity is short a meshlet bids first on workloads of owners who used least."""
    return taken.get(owner, 0)


__all__ = ["DECAY_Q16", "balances", "decay", "meshlet_priority", "owner_order_key"]
