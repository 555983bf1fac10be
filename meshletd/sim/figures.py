"""The simulator's figures: convergence, violations, over-replication, failover, write
points, decision cost, needless moves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshletd.core.records import HostPolicy, Workload

from .commons import commons_figures
from .model import Node

if TYPE_CHECKING:
    from .world import Sim


def report(sim: Sim, wall: float) -> dict[str, Any]:
    """The figures of a finished run (docs/benchmarks.md, "Simulator")."""
    live = [n for n in sim.nodes if n.alive and n.core is not None]
    views = []
    for n in live:
        assert n.core is not None
        views.append({u: o for u, o in n.core.placement().items() if u in sim.workloads})
    identical = all(v == views[0] for v in views[1:]) if views else True
    ref = views[0] if views else {}
    missing = sum(1 for u in sim.workloads if u not in ref)
    dead = {n.did for n in sim.nodes if not n.alive}
    problems: list[str] = []
    unplaced = 0
    unplaceable = 0  # slots of a dead host that no live host's policy admits
    free = free_capacity(sim, live)
    for uri, wl in sim.workloads.items():
        owners = ref.get(uri)
        if owners is None:
            continue
        done: set[int] | None = None  # finished slots, looked up only when needed
        for s, cur in enumerate(owners):
            if cur is not None and cur[1] not in dead:
                if (uri, s) in sim.by_did[cur[1]].running:
                    continue  # fine whether or not the slot is done
                held = sim.by_did[cur[1]].core
                if wl.paused and held is not None:
                    if held.replicas().get((uri, s)) in ("paused", "pausing"):
                        continue  # held, stopped, by a live owner (protocol section 10)
            if done is None:
                done = done_slots(sim, live, uri)
            if s in done:
                continue
            if cur is None:
                if any(c >= wl.milli_cpu and m >= wl.memory_mib for c, m in free):
                    unplaced += 1
                continue
            if cur[1] in dead:
                if not _someone_could_take(live, wl, owners):
                    # no live meshlet may take it: each is ineligible, refused by its host
                    # policy (e.g. the only host granting `lan` died), outside its lending
                    # window, full, or holds another slot of wl (section 21)
                    unplaceable += 1
                    continue
                problems.append(f"{uri}#{s} owned by dead meshlet {cur[1]}")
                continue
            node = sim.by_did[cur[1]]
            if (uri, s) not in node.running:
                problems.append(f"{uri}#{s} owner {cur[1]} is not running it")
    extra = 0
    for n in live:
        for key in n.running:
            owners = ref.get(key[0])
            cur = owners[key[1]] if owners and key[1] < len(owners) else None
            if cur is None or cur[1] != n.did:
                extra += 1
                problems.append(f"{key[0]}#{key[1]} runs on non-owner {n.did}")
    for since in sim.over_since.values():
        sim.over_max = max(sim.over_max, sim.now - since)
    violations = list(sim.violations)
    if not identical:
        violations.append("placements differ between live meshlets")
    violations.extend(problems[:20])
    if len(problems) > 20:
        violations.append(f"... and {len(problems) - 20} more")
    bound_ms = sim.max_cut_ms + sim.cfg.ae_interval_ms + sim.t.fence_timeout_ms + sim.t.settle_ms
    if sim.over_max > bound_ms:
        violations.append(f"over-replication {sim.over_max} ms above bound {bound_ms} ms")
    fo = sorted(sim.failovers)
    fo_nat = sorted(sim.failovers_nat)
    dec = sorted(sim.decision_ns)
    days = sim.cfg.hours / 24
    points = sum(n.points for n in sim.nodes)
    return {
        "meshlets": sim.cfg.meshlets,
        "workloads": sim.cfg.workloads,
        "workloads_at_end": len(sim.workloads),
        "seed": sim.cfg.seed,
        "faults": sim.cfg.faults,
        "hours": sim.cfg.hours,
        "converged": identical and not problems and missing == 0,
        "placements_identical": identical,
        "unplaced_with_capacity": unplaced,
        "held_by_dead_no_host_admits": unplaceable,
        "over_replication_max_s": round(sim.over_max / 1000, 3),
        "over_replication_bound_s": round(bound_ms / 1000, 3),
        "failovers": len(fo),
        "failovers_unrecovered": len(sim.lost_at),
        "failover_p50_s": pct(fo, 50) / 1000 if fo else None,
        "failover_p99_s": pct(fo, 99) / 1000 if fo else None,
        "nat_meshlets": sum(1 for n in sim.nodes if n.nat),
        "failovers_nat": len(fo_nat),
        "failover_nat_p50_s": pct(fo_nat, 50) / 1000 if fo_nat else None,
        "failover_nat_p99_s": pct(fo_nat, 99) / 1000 if fo_nat else None,
        "failover_nat_bound_s": round(nat_bound_ms(sim) / 1000, 3),
        "write_points_per_meshlet_day": round(points / len(sim.nodes) / days, 1),
        "decision_us_p50": round(pct(dec, 50) / 1000, 2) if dec else None,
        "decisions": len(dec),
        "events": sim.events,
        "wall_s": round(wall, 2),
        "host_policies": sum(1 for r in sim.store.values() if isinstance(r, HostPolicy)),
        "policy_stops": dict(sim.policy_stops),
        "needless_moves": sum(sim.needless.values()),
        "needless_moves_by_round": dict(sim.needless),
        "needless_move_examples": sim.needless_examples,
        "violations": violations,
        **commons_figures(sim),
    }


def nat_bound_ms(sim: Sim) -> int:
    """docs/protocol.md section 8: the lease expires at most V after the host died; a
    watcher that probes nobody may wait up to R more for a renewal showing its view is
    current; 3 probe intervals later it is suspected, then the replacement round and the
    start (the simulator's start takes up to 800 ms)."""
    t = sim.t
    return (
        t.lease_valid_ms
        + t.lease_renew_ms
        + t.probe_failures * t.probe_interval_ms
        + t.replacement_window_ms
        + t.settle_ms
        + 800
    )


def _someone_could_take(live: list[Node], wl: Workload, owners: Any) -> bool:
    """Whether some live meshlet could take a slot of wl: eligible, its host policy admits
    wl now (lending window included), not draining or cut off, holding no other slot of wl
    (unless packing) and with room for it."""
    if not live or live[0].core is None:
        return False
    cluster = live[0].core.cluster
    now = live[0].core.now
    holders = {c[1] for c in owners if c is not None}
    for n in live:
        core = n.core
        if core is None or n.cut or n.draining_since is not None:
            continue
        if not wl.allow_packing and n.did in holders:
            continue
        if not (cluster.eligible(wl, n.did) and cluster.policy_admits(wl, n.did, now)):
            continue
        cpu, mem = core.free_capacity()
        if cpu >= wl.milli_cpu and mem >= wl.memory_mib:
            return True
    return False


def free_capacity(sim: Sim, live: list[Node]) -> list[tuple[int, int]]:
    """Free (milli-CPU, MiB) of every live meshlet that takes work."""
    out = []
    for n in live:
        if n.draining_since is not None or n.cut:
            continue
        cpu, mem = sim.cfg.cpu_milli, sim.cfg.memory_mib
        for key in n.running:
            wl = sim.workloads.get(key[0])
            if wl is not None:
                cpu -= wl.milli_cpu
                mem -= wl.memory_mib
        out.append((cpu, mem))
    return out


def done_slots(sim: Sim, live: list[Node], uri: str) -> set[int]:
    """Slots of a workload whose job finished, as a live meshlet knows them."""
    for n in live:
        assert n.core is not None
        e = n.core.workloads.get(uri)
        if e is not None and e.finished:
            return set(e.finished)
    return set()


def pct(xs: list[Any], p: int) -> float:
    """The p-th percentile of sorted values (nearest rank)."""
    if not xs:
        return 0.0
    i = min(len(xs) - 1, max(0, (len(xs) * p + 99) // 100 - 1))
    return float(xs[i])


__all__ = ["done_slots", "free_capacity", "pct", "report"]
