"""The simulator's rolling updates (docs/protocol.md, section 25): owners publish new spec
versions of running services (some of which never start), the runtime runs a slot's two
lanes side by side, the owner's meshlet writes the previous version back when a slot owner
reports a version failed, and the run checks that every slot converges to the version the
record asks for, that an update never leaves a slot without a running replica, and how
long the old and new replica of a slot ran side by side.

A run without updates (`Config.updates = 0`) draws nothing from here: its figures and
placements are those of a run before updates existed."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from meshletd.core import Workload, WorkloadStatus

from .model import K_FAULT, Node

if TYPE_CHECKING:
    from .world import Sim

ROLLBACK_DELAY_MS = 500  # the owner's meshlet reads the record and writes it back


class Updates:
    """What the updates of one run did, and what the checks need."""

    def __init__(self, sim: Sim) -> None:
        self.rng = random.Random(sim.cfg.seed * 1_000_003 + 29)  # its own stream
        self.bad: set[str] = set()  # versions that never start: they fail at once...
        self.hang: set[str] = set()  # ... or hang, never reporting running
        self.previous: dict[str, Workload] = {}  # uri -> the record before its last update
        self.updates = 0
        self.rollbacks = 0
        self.lanes_since: dict[tuple[int, str, int], int] = {}  # (node, uri, slot) -> 2 lanes
        self.side_by_side_max = 0
        self.violations: list[str] = []


def schedule_updates(sim: Sim) -> None:
    """`cfg.updates` updates at random times in the first 60 % of the run."""
    u = sim.upd
    for _ in range(sim.cfg.updates):
        at = u.rng.randint(int(sim.end * 0.1), max(int(sim.end * 0.6), 1))
        sim.push(at, K_FAULT, ("update", u.rng.random()))


def apply_update(sim: Sim, pick: float) -> None:
    """An owner publishes a new version of one of its running services."""
    u = sim.upd
    services = sorted(uri for uri, wl in sim.workloads.items() if wl.kind == "service")
    if not services:
        return
    uri = services[int(pick * len(services)) % len(services)]
    wl = sim.workloads[uri]
    u.updates += 1
    version = f"{wl.version or '1'}.u{u.updates}"
    if u.rng.random() < sim.cfg.bad_update_fraction:
        u.bad.add(version)
        if u.rng.random() < 0.5:
            u.hang.add(version)
    if uri not in u.previous or rolled_out(sim, wl):
        # the spec to roll back to: the last one every slot ran (as the daemon keeps it)
        u.previous[uri] = replace(wl, previous=None)
    new = replace(wl, cid=f"{wl.cid}+u{u.updates}", version=version, previous=u.previous[uri])
    _publish(sim, new)


def rolled_out(sim: Sim, wl: Workload) -> bool:
    """Whether every status of the workload says its replica runs the record's version."""
    return all(
        st.version == wl.version
        for st in sim.store.values()
        if type(st) is WorkloadStatus and st.workload_uri == wl.uri and st.state == "running"
    )


def halted(sim: Sim, wl: Workload) -> bool:
    """Whether the record asks for a version some slot's owner reported failed (and no
    previous spec is left to roll back to): the rollout stops there, every slot served."""
    return any(
        type(st) is WorkloadStatus and st.workload_uri == wl.uri and st.failed_version == wl.version
        for st in sim.store.values()
    )


def _publish(sim: Sim, wl: Workload) -> None:
    sim.workloads[wl.uri] = wl
    sim.store[wl.uri] = wl
    sim._writes += 1
    sim._broadcast(wl.uri, wl, sim.now + 20)


def status_written(sim: Sim, node: Node, st: WorkloadStatus) -> None:
    """A slot owner names a failed version of the record's current version: the owner's
    meshlet writes the previous version back (docs/protocol.md, section 25)."""
    wl = sim.workloads.get(st.workload_uri)
    if wl is None or not st.failed_version or st.failed_version != wl.version:
        return
    sim.push(sim.now + ROLLBACK_DELAY_MS, K_FAULT, ("rollback", st.workload_uri, wl.version))


def apply_rollback(sim: Sim, uri: str, failed: str) -> None:
    """The owner's meshlet writes the previous spec back (if the record still wants the
    failed version; later if the owner's machine is down)."""
    u = sim.upd
    wl = sim.workloads.get(uri)
    prev = u.previous.get(uri)
    if wl is None or prev is None or wl.version != failed:
        return
    owner_node = sim.nodes[int(wl.owner[-5:])]
    if not owner_node.alive or owner_node.cut:
        sim.push(sim.now + 30_000, K_FAULT, ("rollback", uri, failed))
        return
    u.rollbacks += 1
    del u.previous[uri]  # written back, and removed from the record
    _publish(sim, replace(prev, cid=f"{wl.cid}+r", previous=None))


def lane_up(sim: Sim, node: Node, key: tuple[str, int], lane: int, version: str) -> bool:
    """A lane of a slot runs here; True when it is the slot's first (the slot is served)."""
    lanes = node.lanes.setdefault(key, {})
    first = not lanes
    lanes[lane] = version
    return first


def lane_starting(sim: Sim, node: Node, key: tuple[str, int]) -> None:
    """A lane of a slot is started while another one runs here: the two run side by side
    (in the model, from the start of the new one) until one of them stops."""
    if node.lanes.get(key):
        sim.upd.lanes_since.setdefault((node.idx, *key), sim.now)


def lane_down(sim: Sim, node: Node, key: tuple[str, int], lane: int, reason: str) -> bool:
    """A lane of a slot stops here; True when none is left (the slot is not served here).
    An update's stop of the old version must leave the new one running."""
    since = sim.upd.lanes_since.pop((node.idx, *key), None)
    if since is not None:
        sim.upd.side_by_side_max = max(sim.upd.side_by_side_max, sim.now - since)
    lanes = node.lanes.get(key)
    if lanes is None or lane not in lanes:
        return False
    del lanes[lane]
    if reason == "updated" and not lanes:
        sim.upd.violations.append(
            f"{key[0]}#{key[1]} on {node.did}: the old version stopped at {sim.now} ms"
            " with no new one running"
        )
    if not lanes:
        del node.lanes[key]
        return True
    return False


def check_versions(sim: Sim, live: list[Node]) -> dict[str, Any]:
    """At the end: every served slot of a service runs, on its owner, exactly the version
    its record asks for (one lane), and its owner's status record says so."""
    u = sim.upd
    problems = list(u.violations)
    stopped = {uri for uri, wl in sim.workloads.items() if halted(sim, wl)}
    for n in live:
        for key, lanes in n.lanes.items():
            wl = sim.workloads.get(key[0])
            if wl is None or wl.kind != "service" or key not in n.running:
                continue
            if len(lanes) != 1 or (
                key[0] not in stopped and sorted(lanes.values()) != [wl.version]
            ):
                problems.append(
                    f"{key[0]}#{key[1]} on {n.did} runs {sorted(lanes.values())},"
                    f" the record asks for {wl.version}"
                )
    for n in live:  # every meshlet knows the version the record asks for
        assert n.core is not None
        for uri, e in n.core.workloads.items():
            wl = sim.workloads.get(uri)
            if wl is not None and e.wl.version != wl.version:
                problems.append(f"{n.did} sees {uri} at {e.wl.version}, not {wl.version}")
    bound = sim.t.update_timeout_ms + 1000  # + the runtime's start and stop delays
    if u.side_by_side_max > bound:
        problems.append(f"old and new replica side by side {u.side_by_side_max} ms > {bound}")
    return {
        "updates": u.updates,
        "updates_rolled_back": u.rollbacks,
        "updates_stopped_without_previous": len(stopped),
        "update_side_by_side_max_s": round(u.side_by_side_max / 1000, 3),
        "update_side_by_side_bound_s": round(bound / 1000, 3),
        "update_violations": problems,
    }


__all__ = [
    "Updates",
    "apply_rollback",
    "apply_update",
    "check_versions",
    "lane_down",
    "lane_starting",
    "lane_up",
    "schedule_updates",
    "status_written",
]
