"""Host policies in the simulator's chaos runs (docs/protocol.md, section 21): workloads get
image sources, a network and (jobs) a run time; meshlets publish random host policies
(evictions, image patterns, digests only, network grants, lending windows, job run times,
per-owner caps) and later take them back. Every meshlet must still compute the same
placement, and no host may start a replica its own policy refuses.

Its own random streams (seeded from the run's seed): a run without chaos stays what it was,
and the chaos schedule of crashes, cuts and drains is drawn as before.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from meshletd.core import StartReplica, Workload
from meshletd.core.policy import MINUTE_MS, refusal
from meshletd.core.records import NSID_HOST_POLICY, HostPolicy, OwnerCap, ScheduleWindow, at_uri

from .model import EPOCH, K_FAULT, Node

if TYPE_CHECKING:
    from .world import Sim

REGISTRIES = ("reg0.example", "reg1.example:5000", "docker.io")


def dress_workload(sim: Sim, wl: Workload, w: int) -> Workload:
    """In a chaos run, the image source, network and (for a job) declared run time of
    workload number w, from its own stream; otherwise wl unchanged."""
    if not sim.chaos:
        return wl
    rng = random.Random(sim.cfg.seed * 1_000_033 + w)
    reg = rng.choice(REGISTRIES)
    image = f"{reg}/team{rng.randrange(3)}/app{w % 7}:1"
    if rng.random() < 0.3:
        image += "@sha256:" + f"{w:064x}"
    network = rng.choices(("internet", "none", "lan"), weights=(8, 1, 1))[0]
    runtime = None
    if wl.kind == "job" and rng.random() < 0.5:
        runtime = rng.choice((600, 1800, 3600, 7200))
    return replace(wl, image=image, network=network, max_runtime_s=runtime)


def schedule_policies(sim: Sim) -> None:
    """Schedule the policy changes of a chaos run: about one meshlet in eight publishes a
    random policy between 20 % and 60 % of the run, and a third of them drop it later."""
    rng = random.Random(sim.cfg.seed * 7_919 + 3)
    n = len(sim.nodes)
    for _ in range(max(1, n // 8)):
        at = rng.randint(int(sim.quiet_at * 0.2), sim.quiet_at)
        idx = rng.randrange(n)
        sim.push(at, K_FAULT, ("policy", idx, rng.randrange(1 << 30)))
        if rng.random() < 0.33:
            back = at + rng.randint(60_000, 900_000)
            if back < sim.quiet_at:
                sim.push(back, K_FAULT, ("policy", idx, None))


def random_policy(sim: Sim, node: Node, seed: int | None) -> HostPolicy:
    """A random host policy for `node`, written at its clock (seed None: the defaults)."""
    now = sim.now + EPOCH + node.skew
    base = HostPolicy(at_uri(node.did, NSID_HOST_POLICY, "self"), node.did, now)
    if seed is None:
        return base
    rng = random.Random(seed)
    owners = [x.owner for x in sim.nodes]
    kw: dict[str, Any] = {}
    if rng.random() < 0.35:
        kw["evicted"] = frozenset(rng.sample(owners, min(len(owners), rng.randint(1, 3))))
    if rng.random() < 0.3:
        kw["image_allow"] = tuple(f"{r}/**" for r in rng.sample(REGISTRIES, rng.randint(1, 2)))
    if rng.random() < 0.1:
        kw["digests_only"] = True
    kw["network"] = rng.choices(("internet", "none", "lan"), weights=(4, 1, 3))[0]
    if rng.random() < 0.3:
        # closed for 5 to 60 minutes from a minute soon, every day
        minute = (now // MINUTE_MS + rng.randint(0, 30)) % 1440
        length = rng.randint(5, 60)
        end = min(minute + length, 1440)
        windows = [ScheduleWindow(0, minute)] if minute else []
        if end < 1440:
            windows.append(ScheduleWindow(end, 1440))
        kw["schedule"] = tuple(windows)
    if rng.random() < 0.25:
        kw["job_max_runtime_s"] = rng.choice((300, 1200, 3600))
    if rng.random() < 0.35:
        kw["default_share"] = rng.choice((100, 250, 500))
        kw["caps"] = tuple(OwnerCap(o, rng.choice((50, 1000))) for o in rng.sample(owners, 2))
    return replace(base, **kw)


def apply_policy(sim: Sim, idx: int, seed: int | None) -> None:
    """A meshlet publishes a new host policy (its daemon writes the record)."""
    node = sim.nodes[idx]
    if not node.alive or node.core is None:
        return
    rec = random_policy(sim, node, seed)
    node.disturbed_at = sim.now
    sim._write(node, rec.uri, rec)


def check_start(sim: Sim, node: Node, a: StartReplica) -> None:
    """A host never starts a replica its own policy, as it knows it, refuses."""
    pol = None if node.core is None else node.core.cluster.policies.get(node.did)
    if pol is None:
        return
    why = refusal(pol, a.workload)
    if why is not None:
        sim.violations.append(
            f"{node.did} started {a.workload.uri}#{a.slot} round {a.round} that its policy"
            f" refuses ({why}) at {sim.now} ms"
        )


__all__ = ["apply_policy", "check_start", "dress_workload", "random_policy", "schedule_policies"]
