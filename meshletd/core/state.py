"""The state of one meshlet's scheduler core, shared by the layers that build on it
(rounds → bidding → reconciliation → scheduler), and the few helpers every layer uses:
writing our records, asking for a wake-up, queueing a bid."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from hashlib import blake2b

from .actions import Action, DeleteRecord, PutRecord
from .bounds import REFUSALS_KEPT
from .cluster import ClusterView
from .ledger import UsageLedger
from .liveness import Liveness
from .orphans import Orphans
from .placement import Owner, WorkloadEntry
from .records import Endpoint, Record, Workload, at_uri, split_at_uri
from .timing import DEFAULT_TIMING, Timing


@dataclass(frozen=True, slots=True)
class MeshletIdentity:
    """Who this meshlet is and what it offers (the content of its meshletOwner record)."""

    did: str
    owner: str
    milli_cpu: int
    memory_mib: int
    arch: str = "amd64"
    labels: frozenset[str] = frozenset()
    endpoint: str = ""
    # Replicas at once on this machine ([contribution] max_replicas; None: no limit): this
    # meshlet never bids for more slots than it has left (docs/protocol.md, section 7).
    max_replicas: int | None = None
    # What each replica costs this machine beyond its workload's memory (conmon,
    # slirp4netns, the container's init: measured ~2 MiB, more under traffic). Counted
    # against our capacity for every slot we hold or bid for, so that what the commune was
    # promised fits inside the slice (docs/runtime.md, "What a replica really costs").
    replica_overhead_mib: int = 0
    lease: bool = False
    """Nobody can reach us (no endpoint, behind NAT): we write a lease every
    `lease_renew_ms` and our watchers judge us by it (docs/protocol.md, section 8)."""


def _rkey(prefix: str, text: str) -> str:
    return prefix + blake2b(text.encode(), digest_size=8).hexdigest()


def bid_rkey(workload_uri: str, round_: int, slot: int) -> str:
    """Deterministic rkey of our bid for (workload, round, slot): rewriting is idempotent."""
    return _rkey("b", f"{workload_uri}|{round_}|{slot}")


def winning_bid_rkey(workload_uri: str, round_: int, slot: int) -> str:
    """The rkey of our bid that placed us in (round, slot): round 0's bid offers slots of
    every index (slot -1), a later round's is for its one slot."""
    return bid_rkey(workload_uri, round_, -1 if round_ == 0 else slot)


def status_rkey(workload_uri: str, slot: int) -> str:
    """Deterministic rkey of our status record for (workload, slot)."""
    return _rkey("s", f"{workload_uri}|{slot}")


class Surge:
    """The new version of a slot started beside the old one (docs/protocol.md, section 25):
    in the other lane, until it serves (then the old one stops) or fails."""

    __slots__ = ("endpoints", "lane", "started_at", "wl")

    def __init__(
        self, wl: Workload, lane: int, started_at: int, endpoints: tuple[Endpoint, ...] = ()
    ) -> None:
        self.wl = wl
        self.lane = lane
        self.started_at = started_at
        self.endpoints = endpoints  # its own ports: the old one still holds the slot's


class Replica:
    """A replica this meshlet runs (or starts, or stops) for one slot of a workload."""

    __slots__ = (
        "endpoints",
        "exit_code",
        "failed",
        "failed_reason",
        "failing",
        "health",
        "lane",
        "lost_at",
        "message",
        "note",
        "restart_at",
        "restarts",
        "round",
        "served",
        "since",
        "spec",
        "started",
        "state",
        "stop_at",
        "surge",
        "tries",
        "up_since",
        "version",
        "written",
        "written_health",
        "written_version",
    )

    def __init__(self, round_: int, spec: Workload | None = None, lane: int = 0) -> None:
        self.round = round_
        self.state = "starting"  # starting | running | exited | stopping | pausing | paused
        self.since = 0  # counted in the usage ledger up to this time
        self.restarts = 0
        self.exit_code: int | None = None
        self.restart_at: int | None = None
        self.lost_at: int | None = None  # when we learnt the slot is no longer ours
        self.written = ""  # last state written in our status record
        self.message = ""  # the message written with it
        self.written_health: str | None = None  # and the health written with it
        self.endpoints: tuple[Endpoint, ...] = ()  # where its ports are published
        self.health: str | None = None  # its health check's verdict (None: no check)
        self.up_since: int | None = None  # when it last started running
        self.tries = 0  # failed tries since it last ran STABLE_MS (section 22)
        self.failing = ""  # why we handed its slot off ("" while we have not)
        self.note: str | None = None  # why it moves or stopped (host policy), in its status
        self.started: int | None = None  # when it first ran here (a job's run time)
        self.stop_at: int | None = None  # a job stopped then: its run time is up
        self.written_version = ""  # (version, failed version) last written, joined by "/"
        # What runs (section 25): the workload version it was started with (None: adopted
        # after a restart, only its version known), in which lane.
        self.spec = spec
        self.version = spec.version if spec is not None else ""
        self.lane = lane
        self.surge: Surge | None = None  # the new version starting beside it
        self.served = ""  # the last version that ran here (a start that never ran: failed)
        self.failed = ""  # a version whose update failed here (the rollout stops there)
        self.failed_reason = ""


ReplicaKey = tuple[str, int]
"""(workload URI, slot)."""


class SchedulerState:
    """Everything one meshlet's core remembers. The layers above read and change it; only
    `Scheduler` is public."""

    def __init__(self, me: MeshletIdentity, timing: Timing = DEFAULT_TIMING) -> None:
        self.me = me
        self.t = timing
        self.now = 0
        self.cluster = ClusterView()
        self.workloads: dict[str, WorkloadEntry] = {}
        # owner DID -> record keys of its workloads that take part (WORKLOADS_PER_OWNER)
        self._owner_keys: dict[str, set[str]] = {}
        # meshlet -> the (0, meshlet) owner tuple shared by every slot it wins in round 0
        self._round0_owner_of: dict[str, Owner] = {}
        self.orphans = Orphans()  # bids and statuses naming workloads not seen (yet)
        self._view_read = False  # the start-up batch was handled (section 13)
        # URIs of the bids of deleted workloads, until their own deletion comes (bounded)
        self._gone_bids: dict[str, None] = {}
        # records refused at intake -> why (the newest REFUSALS_KEPT)
        self.refused: dict[str, str] = {}
        self._refused_slots: dict[str, int] = {}  # refused workload URI -> its replicas
        # status URI -> (workload URI, slot) of every non-terminal status kept (for deletions)
        self._status_keys: dict[str, ReplicaKey] = {}
        self._replicas: dict[ReplicaKey, Replica] = {}
        # replicas with a restart or a fence deadline (restart_at or lost_at set)
        self._replicas_waiting: dict[ReplicaKey, None] = {}
        # (workload, slot, round) of our open bids -> (milli-CPU, MiB, until, slots) they reserve
        self._reserved: dict[tuple[str, int, int], tuple[int, int, int, int]] = {}
        # slots we own or still run -> (milli-CPU, MiB) they take
        self._owned_capacity: dict[ReplicaKey, tuple[int, int]] = {}
        # slots whose update runs a second replica here -> (milli-CPU, MiB) it takes
        self._surge_capacity: dict[ReplicaKey, tuple[int, int]] = {}
        self._my_rkeys: set[tuple[str, str]] = set()
        self._my_bids: dict[str, list[str]] = {}  # workload uri -> our bid rkeys
        self._closes: list[tuple[int, str]] = []  # heap of (close time, workload uri)
        self._lazy_closes: list[tuple[int, str]] = []  # closes that need no exact wake-up
        self._wakes: list[tuple[int, str]] = []  # heap of (time, workload uri) to re-evaluate
        self._bid_queue: set[str] = set()
        self._bid_batch_at: int | None = None
        self._dirty: dict[str, None] = {}  # workloads to re-resolve, in a deterministic order
        self._candidates_cache: dict[tuple[object, ...], list[str]] = {}
        self._small_cluster_cache: dict[tuple[str, str], bool] = {}
        self._small_cluster_version = -1
        self._involved: set[str] = set()  # workloads where we own a slot or run a replica
        self.draining = False
        self.draining_since = 0
        self.liveness = Liveness(me.did, self.cluster, timing)
        self._next_lease: int | None = None  # when we renew our lease (if we write one)
        self._next_scan = 0
        # workload -> the version (cid) whose slot we handed off: we bid for it no more
        self._gave_up: dict[str, str] = {}
        # (workload, slot) -> (when we last opened its replacement round, against which owner,
        # how many rounds in a row we opened against that owner): the reopen wait (section 8)
        self._reopened: dict[ReplicaKey, tuple[int, Owner, int]] = {}
        # (workload, slot, round): replacement rounds we saw open only after their window,
        # while we could have taken the slot; we open the next one if they close without a
        # winner (docs/protocol.md, section 8, "A missed window")
        self._missed: dict[tuple[str, int, int], None] = {}
        self.ledger = UsageLedger(me.did, timing)
        self.decisions = 0
        self._out: list[Action] = []
        # How many writes lead `_out`: writes go before the other actions, in the order
        # they were decided (the daemon's queue keeps the last write of a record).
        self._writes_out = 0
        self._resched = True
        self._last_wake = -1

    @property
    def suspects(self) -> set[str]:
        """Peers our probes currently say are lost."""
        return self.liveness.suspects

    def free_capacity(self) -> tuple[int, int]:
        """(milli-CPU, MiB) not held by owned slots, running replicas or open bids."""
        cpu, mem = self.me.milli_cpu, self.me.memory_mib
        for c, m in self._owned_capacity.values():
            cpu -= c
            mem -= m
        for c, m, *_ in self._reserved.values():
            cpu -= c
            mem -= m
        for c, m in self._surge_capacity.values():
            cpu -= c
            mem -= m
        return cpu, mem

    def replica_memory_mib(self, workload_memory_mib: int) -> int:
        """The memory one replica of a workload takes here: its own and its overhead."""
        return workload_memory_mib + self.me.replica_overhead_mib

    def free_replicas(self) -> int | None:
        """Replicas this meshlet may still bid for under its `max_replicas` (None: no limit):
        the limit less the slots it owns or runs and the slots its open bids reserve."""
        limit = self.me.max_replicas
        if limit is None:
            return None
        held = len(self._owned_capacity) + sum(r[3] for r in self._reserved.values())
        held += len(self._surge_capacity)
        return max(limit - held, 0)

    def free_ports(self) -> int:
        """Host ports this meshlet may still promise (docs/protocol.md, section 22): its
        policy's inbound range less the ports of the slots it owns or runs and of the slots
        its open bids reserve."""
        size = self.cluster.inbound_of(self.me.did).size
        if not size:
            return 0
        held = 0
        workloads = self.workloads
        for uri, _slot in self._owned_capacity:
            e = workloads.get(uri)
            if e is not None:
                held += len(e.wl.ports)
        for (uri, _slot, _round), r in self._reserved.items():
            e = workloads.get(uri)
            if e is not None:
                held += r[3] * len(e.wl.ports)
        return size - held

    # -- helpers every layer uses ------------------------------------------------------
    def _refuse(self, uri: str, reason: str, slots: int = 0) -> None:
        """A record refused at intake: it takes no part in anything; remember why (and, for
        a workload, its number of slots, so that each can say why it is not served)."""
        refused = self.refused
        refused.pop(uri, None)
        refused[uri] = reason
        if slots > 0:
            self._refused_slots[uri] = slots
        if len(refused) > REFUSALS_KEPT:
            oldest = next(iter(refused))
            del refused[oldest]
            self._refused_slots.pop(oldest, None)

    def _unrefuse(self, uri: str) -> None:
        """A record refused before was taken in or deleted: forget the refusal."""
        self.refused.pop(uri, None)
        self._refused_slots.pop(uri, None)

    def _put(self, coll: str, rkey: str, rec: Record, not_after: int | None = None) -> None:
        create = (coll, rkey) not in self._my_rkeys
        self._my_rkeys.add((coll, rkey))
        self._out.insert(self._writes_out, PutRecord(coll, rkey, rec, create, not_after))
        self._writes_out += 1

    def _delete(self, coll: str, rkey: str) -> None:
        if (coll, rkey) not in self._my_rkeys:
            return
        self._my_rkeys.discard((coll, rkey))
        self._out.insert(
            self._writes_out, DeleteRecord(coll, rkey, at_uri(self.me.did, coll, rkey))
        )
        self._writes_out += 1

    def _cluster_changed(self) -> None:
        """Eligibility is part of the placement function: re-resolve every placed workload."""
        for uri, e in self.workloads.items():
            if e.owners is not None:
                self._dirty[uri] = None

    def _note_mine(self, uri: str) -> None:
        repo, coll, rkey = split_at_uri(uri)
        if repo == self.me.did:
            self._my_rkeys.add((coll, rkey))

    def _forget_missed(self, uri: str) -> None:
        """The workload is gone: so are the rounds of it we saw too late."""
        for key in [k for k in self._missed if k[0] == uri] if self._missed else ():
            del self._missed[key]

    def _wake(self, at: int, uri: str) -> None:
        heapq.heappush(self._wakes, (at, uri))
        self._resched = True

    def _queue_bid(self, uri: str) -> None:
        self._bid_queue.add(uri)
        self._resched = True
        at = self.now + self.t.bid_batch_ms
        if self._bid_batch_at is None or at < self._bid_batch_at:
            self._bid_batch_at = at


__all__ = [
    "MeshletIdentity",
    "Replica",
    "ReplicaKey",
    "SchedulerState",
    "Surge",
    "bid_rkey",
    "status_rkey",
    "winning_bid_rkey",
]
