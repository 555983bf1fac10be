"""The simulator's faults: which crashes, cut-offs and drains a chaos run schedules, and
what each does to the simulated meshlets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshletd.core import SetDraining

from .model import K_FAULT
from .policies import apply_policy, schedule_policies

if TYPE_CHECKING:
    from .world import Sim


def schedule_chaos(sim: Sim) -> None:
    """Schedule the crashes, cut-offs and drains of a chaos run (between 30 % and 60 % of
    the run)."""
    rng, n = sim.rng, len(sim.nodes)
    horizon = sim.quiet_at
    k = max(1, n // 10)
    for _ in range(k):  # crashes; a quarter never come back
        at = rng.randint(int(horizon * 0.3), horizon)
        down = rng.randint(20_000, 300_000)
        restart = rng.random() >= 0.25
        sim.push(at, K_FAULT, ("crash", rng.randrange(n), down if restart else None))
    for _ in range(k):  # partitions of one to three meshlets
        at = rng.randint(int(horizon * 0.3), horizon)
        dur = rng.randint(5_000, 60_000)
        group = rng.sample(range(n), rng.randint(1, min(3, n)))
        sim.push(at, K_FAULT, ("cut", group, dur))
    for _ in range(max(1, n // 25)):  # drains, some undrained later
        at = rng.randint(int(horizon * 0.3), horizon)
        sim.push(at, K_FAULT, ("drain", rng.randrange(n), rng.random() < 0.5))
    schedule_policies(sim)  # host policies published and taken back (own random stream)


def apply_fault(sim: Sim, f: tuple[Any, ...]) -> None:
    """Apply one fault event: crash, restart, cut, heal, drain, undrain, policy."""
    kind = f[0]
    if kind == "policy":
        apply_policy(sim, f[1], f[2])
        return
    if kind == "crash":
        node = sim.nodes[f[1]]
        if not node.alive:
            return
        node.alive = False
        node.core = None
        node.disturbed_at = sim.now
        for key in list(node.running):
            wl = sim.workloads.get(key[0])
            sim._not_running(node, key)
            if wl is not None and not sim.runners.get(key):
                if key not in sim.lost_at and node.nat:
                    sim.lost_nat.add(key)
                sim.lost_at.setdefault(key, sim.now)
        if f[2] is not None and sim.now + f[2] < sim.quiet_at:
            sim.push(sim.now + f[2], K_FAULT, ("restart", f[1]))
    elif kind == "restart":
        node = sim.nodes[f[1]]
        if not node.alive:
            node.disturbed_at = sim.now
            sim._boot(node)
    elif kind == "cut":
        dur = min(f[2], max(sim.quiet_at - sim.now, 0))
        for i in f[1]:
            sim.nodes[i].cut = True
            sim.nodes[i].disturbed_at = sim.now
        sim.max_cut_ms = max(sim.max_cut_ms, dur)
        sim.push(sim.now + dur, K_FAULT, ("heal", f[1]))
    elif kind == "heal":
        for i in f[1]:
            node = sim.nodes[i]
            if not node.cut:
                continue
            node.cut = False
            node.disturbed_at = sim.now
            for uri, rec in node.pending_writes:
                sim._write(node, uri, rec)
            node.pending_writes = []
            sim._anti_entropy(node)
    elif kind == "drain":
        node = sim.nodes[f[1]]
        if node.alive and node.draining_since is None:
            node.draining_since = sim.now
            node.disturbed_at = sim.now
            sim._feed(node, SetDraining(True))
            if f[2]:
                sim.push(sim.now + sim.rng.randint(60_000, 600_000), K_FAULT, ("undrain", f[1]))
    elif kind == "undrain":
        node = sim.nodes[f[1]]
        if node.alive and node.draining_since is not None and sim.now < sim.quiet_at:
            node.draining_since = None
            node.disturbed_at = sim.now
            sim._feed(node, SetDraining(False))


__all__ = ["apply_fault", "schedule_chaos"]
