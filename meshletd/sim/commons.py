"""Free riders in the simulator (docs/protocol.md, section 23): a commune where some owners
lend their machines (contributors) and some do not (free riders: their meshlets are drained
for the whole run, so they only use others'), optionally with every contributor's host
setting the same `minContribution`. The figures say what each owner received against what
it lent, from the usage records every meshlet published.

Nothing here runs unless `Config.free_riders` is set: other runs stay what they were.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from meshletd.core.records import (
    NSID_HOST_POLICY,
    NSID_MESHLET_OWNER,
    HostPolicy,
    MeshletOwner,
    Usage,
    at_uri,
)

from .model import EPOCH

if TYPE_CHECKING:
    from .world import Sim


def parse_rule(text: str) -> tuple[str, int, int] | None:
    """`MODE:PERMILLE[:DAYS]` (e.g. `after:500:7`) -> (mode, permille, days); '' -> None."""
    if not text:
        return None
    mode, _, rest = text.partition(":")
    permille, _, days = rest.partition(":")
    if mode not in ("after", "refuse") or not permille.isdigit():
        raise ValueError(f"--min-contribution {text!r}: MODE:PERMILLE[:DAYS], MODE after|refuse")
    return mode, int(permille), int(days or 7)


def free_rider_indexes(sim: Sim) -> list[int]:
    """The meshlets (and owners) that lend nothing: a fixed, seeded choice."""
    n = len(sim.nodes)
    k = round(sim.cfg.free_riders * n)
    return sorted(random.Random(sim.cfg.seed * 104_729 + 5).sample(range(n), k))


def setup_commons(sim: Sim) -> None:
    """Before the meshlets boot: free riders' meshlets draining from the start; with a
    rule, every contributor's host policy sets it."""
    if sim.cfg.free_riders <= 0:
        return
    riders = set(free_rider_indexes(sim))
    rule = parse_rule(sim.cfg.min_contribution)
    for node in sim.nodes:
        uri = at_uri(node.did, NSID_MESHLET_OWNER, "self")
        if node.idx in riders:
            rec = sim.store[uri]
            assert isinstance(rec, MeshletOwner)
            sim.store[uri] = replace(rec, state="draining", state_since=EPOCH)
            node.draining_since = 0  # takes no work: not free capacity in the figures
        elif rule is not None:
            mode, permille, days = rule
            puri = at_uri(node.did, NSID_HOST_POLICY, "self")
            sim.store[puri] = HostPolicy(
                puri,
                node.did,
                EPOCH,
                min_ratio_permille=permille,
                min_period_days=days,
                min_mode=mode,
            )


def commons_figures(sim: Sim) -> dict[str, Any]:
    """What each owner received (CPU used on other owners' meshlets) against what it lent
    (CPU its meshlets served to others), in CPU-hours over the whole run, from the usage
    records in the store; `free_rider_share`: the free riders' part of all CPU received."""
    if sim.cfg.free_riders <= 0:
        return {}
    owner_of = {n.did: n.owner for n in sim.nodes}
    received: dict[str, int] = {n.owner: 0 for n in sim.nodes}
    lent: dict[str, int] = {n.owner: 0 for n in sim.nodes}
    for rec in sim.store.values():
        if not isinstance(rec, Usage):
            continue
        host = owner_of.get(rec.meshlet)
        for e in rec.entries:
            if host is None or e.owner == host:
                continue
            received[e.owner] = received.get(e.owner, 0) + e.milli_cpu_seconds
            lent[host] = lent.get(host, 0) + e.milli_cpu_seconds
    riders = {sim.nodes[i].owner for i in free_rider_indexes(sim)}
    total = sum(received.values())
    cpu_h = 3_600_000

    def ratio(o: str) -> float | None:
        return None if lent[o] == 0 else round(received[o] / lent[o], 3)

    per_owner = {
        o[-5:]: {
            "free_rider": o in riders,
            "received_cpu_h": round(received[o] / cpu_h, 1),
            "lent_cpu_h": round(lent[o] / cpu_h, 1),
            "share_received_vs_lent": ratio(o),
        }
        for o in sorted(received)
    }
    contributors = [o for o in received if o not in riders]
    return {
        "min_contribution": sim.cfg.min_contribution or None,
        "free_riders": len(riders),
        "received_cpu_h": round(total / cpu_h, 1),
        "free_rider_share": round(sum(received[o] for o in riders) / total, 3) if total else 0,
        "free_rider_received_cpu_h": round(sum(received[o] for o in riders) / cpu_h, 1),
        "contributor_received_cpu_h": round(sum(received[o] for o in contributors) / cpu_h, 1),
        "share_received_vs_lent": per_owner,
    }


__all__ = ["commons_figures", "free_rider_indexes", "parse_rule", "setup_commons"]
