"""What `meshletctl balance` and `meshletctl usage` show: each owner's standing under this
host's free-rider rule (docs/protocol.md, section 23) beside the fair-share ledger (section
11), and what ran on this machine per owner and per UTC day, from the usage records.

Pure: every function takes the records and the time it needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshletd.core.commons import (
    ALLOWANCE_MILLI_CPU_SECONDS,
    DAY_MS,
    REFUSE,
    Rule,
    lent_and_used,
    standing,
)
from meshletd.core.records import MeshletOwner, Usage, format_datetime_ms

MAX_USAGE_DAYS = 366


def contribution_from_records(
    usages: Iterable[Usage],
    owners: Mapping[str, MeshletOwner],
    counted: frozenset[str],
    at: int,
    days: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """(lent, used) per owner over `days` before `at`, as the core computes them, for a
    meshlet whose engine does not run (the read model's own records)."""
    return lent_and_used(
        usages,
        {m: mo.owner for m, mo in owners.items()},
        {m: mo.milli_cpu for m, mo in owners.items()},
        counted,
        at - days * DAY_MS,
        at,
    )


def standing_fields(
    owner: str,
    host_owner: str,
    rule: Rule | None,
    lent: Mapping[str, int],
    used: Mapping[str, int],
) -> dict[str, Any]:
    """The standing part of a `farm.meshlet.ctl.defs#ownerBalance`: lent, used, ratio, the
    standing word and how this host serves the owner's new slots."""
    st = standing(owner, lent, used, rule)
    if owner == host_owner:
        word = "host"
    elif st.below:
        word = "below"
    elif st.used <= ALLOWANCE_MILLI_CPU_SECONDS and st.lent == 0:
        word = "newcomer"
    else:
        word = "contributor"
    served = "first"
    if word == "below" and rule is not None:
        served = "refused" if rule.mode == REFUSE else "after"
    out: dict[str, Any] = {
        "lentMilliCpuSeconds": st.lent,
        "usedMilliCpuSeconds": st.used,
        "standing": word,
        "served": served,
    }
    if st.ratio_permille is not None:
        out["ratioPermille"] = min(st.ratio_permille, 1_000_000_000)
    return out


def rule_view(rule: Rule | None, days: int) -> dict[str, Any]:
    """The top-level rule fields of getBalance."""
    out: dict[str, Any] = {"periodDays": days}
    if rule is not None:
        out["minContribution"] = {
            "ratioPermille": rule.ratio_permille,
            "periodDays": rule.period_days,
            "mode": rule.mode,
        }
    return out


def usage_view(usages: Iterable[Usage], me: str, now_ms: int, days: int) -> dict[str, Any]:
    """`farm.meshlet.ctl.getUsage`: this meshlet's usage records of the last `days` UTC days
    (today included), summed per day and owner, newest day first. A period is counted on the
    day it started (periods of one hour never straddle midnight)."""
    days = max(1, min(days, MAX_USAGE_DAYS))
    first = now_ms - now_ms % DAY_MS - (days - 1) * DAY_MS
    sums: dict[tuple[int, str], list[int]] = {}
    for u in usages:
        if u.meshlet != me or u.period_start < first:
            continue
        day = u.period_start - u.period_start % DAY_MS
        for e in u.entries:
            row = sums.setdefault((day, e.owner), [0, 0, 0])
            row[0] += e.milli_cpu_seconds
            row[1] += e.memory_mib_seconds
            row[2] += 1
    rows = [
        {
            "day": format_datetime_ms(day)[:10],
            "ownerDid": owner,
            "milliCpuSeconds": v[0],
            "memoryMiBSeconds": v[1],
            "periods": v[2],
        }
        for (day, owner), v in sorted(sums.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    ]
    return {"meshletDid": me, "days": days, "rows": rows}


__all__ = [
    "MAX_USAGE_DAYS",
    "contribution_from_records",
    "rule_view",
    "standing_fields",
    "usage_view",
]
