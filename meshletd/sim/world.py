"""A deterministic discrete-event simulation of N meshlet cores on a virtual clock.

The network model: every record write goes to the writer's PDS and reaches every meshlet
through one ordered firehose stream per recipient (FIFO), after a per-link delay; deliveries
can be lost (healed by periodic anti-entropy, which replays what was missed, in order);
meshlets can be cut off (partition), crash and restart (state rebuilt from records), have a
skewed clock, drain and undrain, sit behind NAT (`meshletd.sim.model`); workloads arrive
and are deleted. One seed fixes everything."""

from __future__ import annotations

import gc
import heapq
import random
import time
from typing import Any

from meshletd.core import (
    DeleteRecord,
    Event,
    Membership,
    MeshletIdentity,
    MeshletLink,
    MeshletOwner,
    ProbePeer,
    ProbeResult,
    PutRecord,
    RecordDeleted,
    RecordSeen,
    RefreshLease,
    ReplicaStateChanged,
    Scheduler,
    StartReplica,
    StopReplica,
    Tick,
    WakeAt,
    Workload,
    WorkloadStatus,
)
from meshletd.core.records import (
    NSID_LEASE,
    NSID_MEMBERSHIP,
    NSID_MESHLET,
    NSID_MESHLET_OWNER,
    NSID_WORKLOAD,
    at_uri,
)

from .chaos import apply_fault, schedule_chaos
from .commons import setup_commons
from .figures import count_needless, report
from .model import (
    BUCKET_MS,
    CLUSTER,
    CREATE,
    DELETE,
    EPOCH,
    K_AE,
    K_ARRIVE,
    K_DELIVER,
    K_FAULT,
    K_PROBE,
    K_REMOVE,
    K_RUNTIME,
    K_TICK,
    UPDATE,
    Config,
    Node,
    _fields,
    _sync_rank,
)
from .policies import check_start, dress_workload
from .updates import Updates, lane_down, lane_starting, lane_up, schedule_updates, status_written


class Sim:
    """Run with `Sim(Config(...)).run()`; returns the figures as a dict."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.t = cfg.timing
        self.now = 0
        self.end = int(cfg.hours * 3_600_000)
        self.quiet_at = int(self.end * 0.6)  # faults stop here
        self.q: list[tuple[int, int, int, Any]] = []
        self.seq = 0
        self.store: dict[str, Any] = {}  # uri -> current record (all PDSes)
        self.workloads: dict[str, Workload] = {}
        self.chaos = cfg.faults == "chaos"
        self.nodes: list[Node] = []
        self.by_did: dict[str, Node] = {}
        # metrics
        self.runners: dict[tuple[str, int], set[int]] = {}
        self.over_since: dict[tuple[str, int], int] = {}
        self.over_max = 0
        self.lost_at: dict[tuple[str, int], int] = {}
        self.failovers: list[int] = []
        self.failovers_nat: list[int] = []  # of slots whose host was behind NAT
        self.lost_nat: set[tuple[str, int]] = set()
        self.decision_ns: list[float] = []
        self.violations: list[str] = []
        # slot moves without a cause (docs/protocol.md section 14): a host stops a replica
        # it ran, having lost the slot, though nothing happened to it since it started it
        self.run_since: dict[tuple[tuple[str, int], int], int] = {}
        self.needless = {"older": 0, "same": 0, "newer": 0}
        self.start_round: dict[tuple[tuple[str, int], int], int] = {}
        self.needless_examples: list[str] = []
        self.max_cut_ms = 0
        self.policy_stops = {"policy": 0, "maxRuntime": 0}
        self.started_before_drain: dict[int, set[tuple[str, int, int]]] = {}
        self.events = 0
        self.inbox: dict[int, dict[tuple[int, ...], list[tuple[str, Any]]]] = {}
        self.groups: list[tuple[int, tuple[int, ...]]] = []
        self._writes = 0  # store changes, for the boot snapshot cache
        self._snapshot: list[RecordSeen] = []
        self._snapshot_of: object = None
        self._probe_events: dict[tuple[str, bool], ProbeResult] = {}
        self.group_last: list[int] = []
        self.upd = Updates(self)
        self._build()

    # ------------------------------------------------------------------ setup
    def push(self, at: int, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.q, (at, self.seq, kind, payload))

    def _build(self) -> None:
        cfg, rng, t = self.cfg, self.rng, self.t
        owners = [f"did:plc:owner{i:05d}" for i in range(cfg.meshlets)]
        members = frozenset(owners)
        for i in range(cfg.meshlets):
            did = f"did:plc:mesh{i:05d}"
            node = Node(i, did, owners[i], None)
            node.latency = rng.randint(10, 120)
            if self.chaos:
                node.skew = rng.randint(-t.skew_ms, t.skew_ms)
            self.nodes.append(node)
            self.by_did[did] = node
            self.store[at_uri(owners[i], NSID_MESHLET, "m0")] = MeshletLink(
                at_uri(owners[i], NSID_MESHLET, "m0"), owners[i], did
            )
            self.store[at_uri(did, NSID_MESHLET_OWNER, "self")] = MeshletOwner(
                at_uri(did, NSID_MESHLET_OWNER, "self"),
                did,
                owners[i],
                cfg.cpu_milli,
                cfg.memory_mib,
                state_since=EPOCH,
            )
            self.store[at_uri(did, NSID_MEMBERSHIP, CLUSTER)] = Membership(
                at_uri(did, NSID_MEMBERSHIP, CLUSTER), did, CLUSTER, members
            )
        setup_commons(self)
        if cfg.nat > 0:
            # Its own stream, so that a run without NAT hosts stays what it was.
            pick = random.Random(cfg.seed * 1_000_003 + 17)
            k = round(cfg.nat * cfg.meshlets)
            for i in pick.sample(range(cfg.meshlets), k):
                self.nodes[i].nat = True
        by_lat: dict[int, list[int]] = {}
        for node in self.nodes:
            by_lat.setdefault(node.latency - node.latency % BUCKET_MS, []).append(node.idx)
        self.groups = [(lat, tuple(ix)) for lat, ix in sorted(by_lat.items())]
        self.group_last = [0] * len(self.groups)
        for node in self.nodes:
            self._boot(node)
        # workloads
        spread = max(int(self.end * 0.4), 1)
        for w in range(cfg.workloads):
            first = rng.randint(0, spread)
            self.push(first, K_ARRIVE, self._make_workload(w, first))
        if cfg.arrivals_per_day > 0:
            mean_gap = 86_400_000 / cfg.arrivals_per_day
            at = 0.0
            w = cfg.workloads
            while True:
                at += rng.expovariate(1.0 / mean_gap)
                if at >= self.end:
                    break
                wl = self._make_workload(w, int(at))
                w += 1
                self.push(int(at), K_ARRIVE, wl)
                life = int(rng.expovariate(1.0 / (cfg.lifetime_hours * 3_600_000)))
                if at + life < self.quiet_at:
                    self.push(int(at) + life, K_REMOVE, wl.uri)
        if self.chaos:
            self._schedule_chaos()
        if cfg.updates:
            schedule_updates(self)
        for node in self.nodes:
            self.push(rng.randint(0, cfg.ae_interval_ms), K_AE, node.idx)

    def _make_workload(self, w: int, at: int) -> Workload:
        rng = self.rng
        owner = self.nodes[rng.randrange(len(self.nodes))].owner
        kind = "job" if rng.random() < 0.2 else "service"
        wl = Workload(
            uri=at_uri(owner, NSID_WORKLOAD, f"w{w:06d}"),
            cid=f"cid{w}",
            owner=owner,
            cluster=CLUSTER,
            milli_cpu=rng.choice((100, 250, 500, 1000)),
            memory_mib=rng.choice((128, 256, 512, 1024)),
            replicas=rng.choice((1, 1, 1, 2, 2, 3)),
            created_at=0,  # set at publication (owner's clock)
            kind=kind,
            restart_policy="on-failure",
            bid_window_ms=2000,
            allow_packing=rng.random() < 0.1,
            version="1",  # the spec version (updates publish others: sim/updates.py)
        )
        if w < self.cfg.workloads and rng.random() < self.cfg.delete_fraction:
            self.push(at + rng.randint(60_000, max(self.quiet_at - at, 60_001)), K_REMOVE, wl.uri)
        return dress_workload(self, wl, w)

    def _schedule_chaos(self) -> None:
        schedule_chaos(self)

    def _boot(self, node: Node) -> None:
        me = MeshletIdentity(
            node.did,
            node.owner,
            self.cfg.cpu_milli,
            self.cfg.memory_mib,
            lease=node.nat,
            max_replicas=self.cfg.max_replicas,
            replica_overhead_mib=self.cfg.replica_overhead_mib,
        )
        core = Scheduler(me, self.t)
        node.core = core
        node.alive = True
        node.missed = []
        node.last_delivery = self.now
        node.wake_at = None
        # Start-up: listRecords of every repo (cluster records first), then the clock.
        # The start-up snapshot is handed over in one batch, so that no decision is taken
        # on a half-read state (docs/protocol.md, "Start-up").
        # Events are immutable: meshlets booting from the same store share one snapshot.
        if self._snapshot_of != self._store_version():
            order = sorted(self.store.values(), key=lambda r: _sync_rank(r))
            self._snapshot = [RecordSeen(r) for r in order]
            self._snapshot_of = self._store_version()
        self._feed_many(node, [Tick(self.now + EPOCH + node.skew), *self._snapshot])

    def _store_version(self) -> object:
        return self._writes

    # ------------------------------------------------------------------ core I/O
    def _local(self, node: Node) -> int:
        return self.now + EPOCH + node.skew

    def _feed(self, node: Node, event: Any) -> None:
        self._feed_many(node, [event])

    def _feed_many(self, node: Node, events: list[Any]) -> None:
        """Hand a meshlet's core some events at once; time its decisions, perform its actions."""
        core = node.core
        if core is None:
            return
        d0 = core.decisions
        t0 = time.perf_counter_ns()
        actions = core.handle_batch(events)
        dt = time.perf_counter_ns() - t0
        dd = core.decisions - d0
        if dd:
            self.decision_ns.append(dt / dd)
        self.events += len(events)
        if actions:
            self._perform(node, actions)

    def _perform(self, node: Node, actions: list[Any]) -> None:
        probes: list[str] = []
        for a in actions:
            kind = type(a)
            if kind is WakeAt:
                at = a.at - EPOCH - node.skew
                if at < self.now:
                    at = self.now
                if node.wake_at != at:  # the latest WakeAt supersedes earlier ones
                    node.wake_at = at
                    self.push(at, K_TICK, (node.idx, node.core, at))
            elif kind is ProbePeer:
                probes.append(a.meshlet)
            elif kind is RefreshLease:
                self._refresh_lease(node, a.meshlet)
            elif isinstance(a, PutRecord):
                node.points += CREATE if a.create else UPDATE
                self._write(node, a.record.uri, a.record)
                if type(a.record) is WorkloadStatus and a.record.failed_version:
                    status_written(self, node, a.record)
            elif isinstance(a, DeleteRecord):
                node.points += DELETE
                self._write(node, a.uri, None)
            elif isinstance(a, StartReplica):
                self._start(node, a)
            elif isinstance(a, StopReplica):
                self._check_stop(node, a)
                if a.reason in self.policy_stops:  # moved or ended by a host policy
                    self.policy_stops[a.reason] += 1
                # The runtime does what it is told in order: a start still under way when
                # the stop comes never reports running.
                key = (a.workload_uri, a.slot)
                lkey: Any = (*key, a.lane) if a.lane else key
                node.stopped_start[lkey] = node.starts.get(lkey, 0)
                self.push(
                    self.now + 200,
                    K_RUNTIME,
                    ("stopped", node.idx, node.core, a.workload_uri, a.slot, a.lane),
                )
                if lane_down(self, node, key, a.lane, a.reason) or not node.lanes.get(key):
                    self._not_running(node, key)
        if probes:
            self._probe(node, probes)

    def _write(self, node: Node, uri: str, rec: Any) -> None:
        if node.cut:
            node.pending_writes.append((uri, rec))  # the daemon retries until it gets through
            return
        self._writes += 1
        if rec is None:
            self.store.pop(uri, None)
        else:
            self.store[uri] = rec
        self._broadcast(uri, rec, self.now + 20)

    def _broadcast(self, uri: str, rec: Any, at: int) -> None:
        if not self.chaos:
            self._broadcast_groups(uri, rec, at)
            return
        rng = self.rng
        buckets: dict[int, list[int]] = {}
        for n in self.nodes:
            if not n.alive:
                continue
            d = at + n.latency + int(rng.expovariate(1 / 15))
            if rng.random() < 0.005:
                d += rng.randint(1000, 4000)  # a slow relay moment
            d += -d % BUCKET_MS  # deliveries are batched like firehose frames
            if d < n.last_delivery:
                d = n.last_delivery  # one ordered stream per recipient
            n.last_delivery = d
            if rng.random() < 0.01:
                n.missed.append((uri, rec))
                continue
            buckets.setdefault(d, []).append(n.idx)
        for d, idxs in buckets.items():
            self._enqueue(d, tuple(idxs), uri, rec)

    def _broadcast_groups(self, uri: str, rec: Any, at: int) -> None:
        """Fault-free delivery, O(latency groups) per write: meshlets with the same link
        latency (20 ms classes) share one jitter draw, and each group's stream is FIFO."""
        rng = self.rng
        for g, (lat, idxs) in enumerate(self.groups):
            d = at + lat + int(rng.expovariate(1 / 15))
            d += -d % BUCKET_MS
            if d < self.group_last[g]:
                d = self.group_last[g]
            self.group_last[g] = d
            self._enqueue(d, idxs, uri, rec)

    def _enqueue(self, d: int, idxs: tuple[int, ...], uri: str, rec: Any) -> None:
        box = self.inbox.get(d)
        if box is None:
            box = self.inbox[d] = {}
            self.push(d, K_DELIVER, d)
        got = box.get(idxs)
        if got is None:
            box[idxs] = [(uri, rec)]
        else:
            got.append((uri, rec))

    def _refresh_lease(self, node: Node, meshlet: str) -> None:
        """The daemon reads the lease straight from its PDS: the current version reaches
        this node alone after a round trip, ahead of a firehose that may lag."""
        if node.cut:
            return
        uri = at_uri(meshlet, NSID_LEASE, "self")
        rec = self.store.get(uri)
        if rec is not None:
            self._enqueue(self.now + 2 * node.latency + 10, (node.idx,), uri, rec)

    def _probe(self, node: Node, targets: list[str]) -> None:
        results = []
        delay = 0
        for target in targets:
            peer = self.by_did.get(target)
            ok = (
                peer is not None
                and peer.alive
                and not peer.nat  # nobody connects to it
                and not peer.cut
                and not node.cut
                and not (self.chaos and self.rng.random() < 0.01)
            )
            ev = self._probe_events.get((target, ok))
            if ev is None:
                ev = self._probe_events[(target, ok)] = ProbeResult(target, ok)
            results.append(ev)
            d = (node.latency + peer.latency) if ok and peer else 500
            delay = max(delay, d)
        self.push(self.now + delay, K_PROBE, (node.idx, node.core, results))

    def _start(self, node: Node, a: StartReplica) -> None:
        key = (a.workload.uri, a.slot)
        check_start(self, node, a)
        delay = self.rng.randint(300, 800)
        end = 0
        if a.workload.kind == "job":
            end = self.now + delay + self.rng.randint(600_000, 3_600_000)
        lkey: Any = (*key, a.lane) if a.lane else key
        gen = node.starts[lkey] = node.starts.get(lkey, 0) + 1
        lane_starting(self, node, key)
        version = a.workload.version
        up = "failed" if version in self.upd.bad else "running"
        if version in self.upd.hang:
            up, delay = "failed", 90_000  # comes up never; the runtime's own bound ends it
        self.push(
            self.now + delay, K_RUNTIME, (up, node.idx, node.core, key, end, gen, a.lane, version)
        )
        self.start_round[(key, node.idx)] = a.round
        if node.draining_since is not None:
            known = self.started_before_drain.get(node.idx, set())
            if (a.workload.uri, a.slot, a.round) not in known:
                self.violations.append(
                    f"draining meshlet {node.did} started new slot {a.workload.uri}#{a.slot}"
                    f" round {a.round} at {self.now} ms"
                )
        else:
            self.started_before_drain.setdefault(node.idx, set()).add(
                (a.workload.uri, a.slot, a.round)
            )

    def _check_stop(self, node: Node, a: StopReplica) -> None:
        count_needless(self, node, a)

    def _running(self, node: Node, key: tuple[str, int]) -> None:
        rs = self.runners.setdefault(key, set())
        rs.add(node.idx)
        self.run_since[(key, node.idx)] = self.now
        if key in self.lost_at:
            took = self.now - self.lost_at.pop(key)
            if key in self.lost_nat:
                self.lost_nat.discard(key)
                self.failovers_nat.append(took)
            else:
                self.failovers.append(took)
        if len(rs) >= 2 and key not in self.over_since:
            self.over_since[key] = self.now

    def _not_running(self, node: Node, key: tuple[str, int]) -> None:
        node.running.pop(key, None)
        rs = self.runners.get(key)
        if rs is None:
            return
        rs.discard(node.idx)
        self.run_since.pop((key, node.idx), None)
        if len(rs) < 2 and key in self.over_since:
            self.over_max = max(self.over_max, self.now - self.over_since.pop(key))

    # ------------------------------------------------------------------ faults
    def _fault(self, f: tuple[Any, ...]) -> None:
        apply_fault(self, f)

    def _anti_entropy(self, node: Node) -> None:
        if not node.alive or node.cut or not node.missed:
            return
        missed, node.missed = node.missed, []
        # listRecords returns the current version of what was missed, not the old events:
        # replaying a lost old version over a newer one would be stale.
        uris = list(dict.fromkeys(u for u, _ in missed))
        current = [(u, self.store.get(u)) for u in uris]
        self._feed_many(
            node, [RecordDeleted(u) if r is None else RecordSeen(r) for u, r in current]
        )

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        # A large run holds millions of long-lived objects and makes no reference cycles of
        # note: the cyclic collector's full passes over them were ~15 % of the CPU time at 400
        # meshlets, and grow with the heap. Reference counting still frees everything.
        was = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if was:
                gc.enable()

    def _run(self) -> dict[str, Any]:
        wall0 = time.perf_counter()
        q = self.q
        nodes = self.nodes
        perf = time.perf_counter_ns
        decision_ns = self.decision_ns
        perform = self._perform
        while q:
            at, _, kind, p = heapq.heappop(q)
            if at > self.end:
                break
            self.now = at
            if kind == K_DELIVER:
                box = self.inbox.pop(p)
                for idxs, items in box.items():
                    evs: list[Event] = [
                        RecordDeleted(u) if r is None else RecordSeen(r) for u, r in items
                    ]
                    fed = 0
                    for i in idxs:
                        n = nodes[i]
                        core = n.core
                        if core is None or not n.alive:
                            continue
                        if n.cut:
                            n.missed.extend(items)
                            continue
                        # _feed_many, inlined: this loop runs once per record per meshlet.
                        d0 = core.decisions
                        t0 = perf()
                        actions = core.handle_batch(evs)
                        t1 = perf()
                        if core.decisions != d0:
                            decision_ns.append((t1 - t0) / (core.decisions - d0))
                        fed += 1
                        if actions:
                            perform(n, actions)
                    self.events += len(evs) * fed
            elif kind == K_TICK:
                n = nodes[p[0]]
                if n.core is p[1] and n.alive and n.wake_at == p[2]:
                    n.wake_at = None
                    self._feed(n, Tick(self._local(n)))
            elif kind == K_PROBE:
                n = nodes[p[0]]
                if n.core is p[1] and n.alive:
                    self._feed_many(n, p[2])
            elif kind == K_RUNTIME:
                self._runtime(p)
            elif kind == K_ARRIVE:
                self._arrive(p)
            elif kind == K_REMOVE:
                wl = self.workloads.pop(p, None)
                if wl is not None:
                    self.store.pop(wl.uri, None)
                    self._writes += 1
                    self._broadcast(wl.uri, None, self.now + 20)
            elif kind == K_FAULT:
                self._fault(p)
            elif kind == K_AE:
                n = nodes[p]
                self._anti_entropy(n)
                self.push(at + self.cfg.ae_interval_ms, K_AE, p)
        self.now = self.end
        for n in nodes:  # final anti-entropy pass, then one tick each
            self._anti_entropy(n)
        return self._report(time.perf_counter() - wall0)

    def _arrive(self, wl: Workload) -> None:
        owner_node = self.nodes[int(wl.owner[-5:])]
        created = self._local(owner_node)
        wl = Workload(**{**_fields(wl), "created_at": created})
        self.workloads[wl.uri] = wl
        self.store[wl.uri] = wl
        self._writes += 1
        self._broadcast(wl.uri, wl, self.now + 20)

    def _runtime(self, p: tuple[Any, ...]) -> None:
        kind, idx, core = p[0], p[1], p[2]
        node = self.nodes[idx]
        if node.core is not core or not node.alive:
            return
        if kind in ("running", "failed"):
            key, end, lane = p[3], p[4], p[6]
            if node.stopped_start.get((*key, lane) if lane else key, 0) >= p[5]:
                return  # stopped before it came up
            if kind == "failed":  # a version that cannot start
                self._feed(node, ReplicaStateChanged(key[0], key[1], "failed", lane=lane))
                return
            if key[0] not in self.workloads:
                self._feed(node, ReplicaStateChanged(key[0], key[1], "exited", 137, lane=lane))
                return
            node.running[key] = end
            if lane_up(self, node, key, lane, p[7]):
                self._running(node, key)
            self._feed(node, ReplicaStateChanged(key[0], key[1], "running", lane=lane))
            if end:
                self.push(end, K_RUNTIME, ("exit", idx, core, key, lane))
        elif kind == "exit":
            key, lane = p[3], p[4]
            if key in node.running:
                lane_down(self, node, key, lane, "exited")
                self._not_running(node, key)
                code = 0 if self.rng.random() < 0.9 else 1
                self._feed(node, ReplicaStateChanged(key[0], key[1], "exited", code, lane=lane))
        elif kind == "stopped":
            self._feed(node, ReplicaStateChanged(p[3], p[4], "stopped", lane=p[5]))

    # ------------------------------------------------------------------ figures
    def _report(self, wall: float) -> dict[str, Any]:
        return report(self, wall)


def run(cfg: Config) -> dict[str, Any]:
    """Simulate and return the figures."""
    return Sim(cfg).run()


__all__ = ["CLUSTER", "EPOCH", "K_FAULT", "Config", "Node", "Sim", "run"]
