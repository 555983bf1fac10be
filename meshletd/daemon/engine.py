"""The engine: the pure scheduler core driven by the real world.

Who does what: the `Scheduler` (meshletd.core) decides, with no I/O and no clock of its own;
the engine feeds it and carries out what it decides. The node (atproto_node.py) owns the
engine and hands it record changes; the engine never reads records or peers by itself.

Events go in one at a time, in order (record changes from the firehose, runtime state
changes, probe results, ticks from a single alarm, operator commands); the actions the core
returns are carried out: writes go to the PDS write queue (in order, retried), replica starts
and stops go to the runtime and report back as events, probes go to peers over XRPC. Time
reaches the core only as `Tick` (wall-clock ms), from the alarm the core sets with `WakeAt`.

Nothing reaches the core before the view is complete (docs/protocol.md, section 13): the
replicas the runtime adopts at start, their exits and operator commands are held, and
`view_complete(records)` hands the core the start-up read of every watched repo and then
what was held, as ONE batch. A restarted meshlet therefore decides nothing about a replica
(start, stop, bid) on a half-read state; its replicas keep running meanwhile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from meshletd import metrics
from meshletd.atproto.pds import Write
from meshletd.atproto.records import record_to_json
from meshletd.core.actions import (
    Action,
    DeleteRecord,
    ProbePeer,
    PutRecord,
    RefreshLease,
    Reply,
    StartReplica,
    StopReplica,
    WakeAt,
)
from meshletd.core.events import (
    Event,
    FeedsBehind,
    ProbeResult,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    SetDraining,
    Tick,
)
from meshletd.core.liveness import Liveness
from meshletd.core.nsid import NSID_BID, NSID_WORKLOAD
from meshletd.core.records import (
    Endpoint,
    MeshletOwner,
    Workload,
    WorkloadStatus,
    split_at_uri,
)
from meshletd.core.state import winning_bid_rkey
from meshletd.daemon.followed import core_record
from meshletd.daemon.local import PlacementQueries
from meshletd.jsonvalue import RecordChange
from meshletd.runtime import (
    HealthCheck,
    PortBinding,
    ReplicaExited,
    ReplicaFailed,
    ReplicaHealth,
    ReplicaId,
    ReplicaOomKilled,
    ReplicaPulling,
    ReplicaRunning,
    ReplicaSpec,
    ReplicaStatus,
    Resources,
    Runtime,
    Secret,
)
from meshletd.runtime.network import NetworkGrant
from meshletd.runtime.reference import parse_image, pinned_image
from meshletd.runtime.registry import auth_file
from meshletd.trace import trace

log = logging.getLogger("meshletd.engine")
# How often a replica's pull progress reaches its status record (each one is a PDS write).
PULL_PROGRESS_EVERY_S = 30.0


class Core(PlacementQueries, Protocol):
    """The scheduler core as the engine drives it (`meshletd.core.scheduler.Scheduler`)."""

    @property
    def now(self) -> int:
        """The time of the last event handled (ms)."""
        ...

    @property
    def liveness(self) -> Liveness:
        """Whom it probes and suspects (section 8)."""
        ...

    def handle(self, event: Event) -> list[Action]: ...

    def handle_batch(self, events: list[Event]) -> list[Action]: ...


def replica_id(workload_uri: str, slot: int, lane: int = 0) -> ReplicaId:
    owner, _, rkey = split_at_uri(workload_uri)
    return ReplicaId(owner_did=owner, workload=rkey, index=slot, lane=lane)


def workload_uri_of(rid: ReplicaId) -> str:
    return f"at://{rid.owner_did}/{NSID_WORKLOAD}/{rid.workload}"


def replica_spec(
    action: StartReplica, secret_values: Mapping[str, bytes], owner_handle: str
) -> ReplicaSpec:
    """What the runtime runs for a slot: the core's workload as published (image, command,
    args, env, resources, secret references; its spec version as the revision, handed
    back on adoption: docs/protocol.md, section 25)."""
    wl = action.workload
    secrets = []
    for ref in wl.secrets:
        if ref.name not in secret_values:
            raise LookupError(f"secret {ref.name!r} is not available to this meshlet")
        secrets.append(Secret(ref.target or ref.name, secret_values[ref.name], env=ref.env))
    pull_auth = None
    if wl.image_pull_secret:
        value = secret_values.get(wl.image_pull_secret)
        if value is None:
            raise LookupError(f"pull secret {wl.image_pull_secret!r} is not available")
        pull_auth = auth_file(value, parse_image(wl.image).registry)
    return ReplicaSpec(
        replica=replica_id(wl.uri, action.slot, action.lane),
        owner_handle=owner_handle,
        # Pinned to the digest resolved when the owner published: the same bits everywhere.
        image=pinned_image(wl.image, wl.image_digest),
        pull_auth=pull_auth,
        resources=Resources(milli_cpu=wl.milli_cpu, memory_mib=wl.memory_mib),
        args=wl.command + wl.args,
        env=tuple((e.name, e.value) for e in wl.env),
        secrets=tuple(secrets),
        revision=wl.version or wl.cid,
        # A workload that needs no network gets none (section 21); what the others reach
        # is the host's grant, held by its network rules.
        network="none" if wl.network == "none" else "private",
        ports=tuple(
            PortBinding(e.name, e.address, e.port, p.container_port, p.protocol)
            for e, p in zip(action.endpoints, wl.ports, strict=False)
        ),
        health=HealthCheck(
            wl.health_command,
            wl.health_interval_s,
            wl.health_timeout_s,
            wl.health_retries,
            wl.health_start_period_s,
        )
        if wl.health_command
        else None,
    )


def endpoints_of(status: ReplicaStatus) -> tuple[Endpoint, ...]:
    """Where an adopted replica's unit says its ports are published."""
    return tuple(Endpoint(p.name, p.address, p.host_port, p.protocol) for p in status.endpoints)


@dataclass(frozen=True, slots=True)
class _Batch:
    """Events the core takes in one `handle_batch` (the start-up read)."""

    events: list[Event]


class Published(Protocol):
    """Our writes on their way to the PDS (the write queue)."""

    def is_pending(self, collection: str, rkey: str) -> bool: ...
    async def written(self, collection: str, rkey: str) -> bool: ...


class Engine:
    """Drives one scheduler core (`Core`) over one runtime."""

    def __init__(
        self,
        scheduler: Core,
        runtime: Runtime,
        submit_write: Callable[[Write], None],
        *,
        secret: Callable[[str, str], Awaitable[bytes | None]] | None = None,
        own_record: Callable[[MeshletOwner], MeshletOwner] = lambda decided: decided,
        probe: Callable[[str], Awaitable[bool]] | None = None,
        owner_handle: Callable[[str], str] = lambda did: did.rsplit(":", 1)[-1][:16],
        clock: Callable[[], float] = time.time,
        probe_timeout_s: float = 2.0,
        feeds_behind: Callable[[], frozenset[str]] | None = None,
        refresh_lease: Callable[[str], object] | None = None,
        published: Published | None = None,
    ) -> None:
        self.probe_timeout_s = probe_timeout_s  # the probe's own bounds, plus a margin
        self.scheduler = scheduler
        self.runtime = runtime
        self._submit_write = submit_write
        self._secret = secret
        self._own_record = own_record
        self._probe = probe
        self._owner_handle = owner_handle
        self._clock = clock
        # The repos whose PDS we have not heard lately (the firehose's judgement), told to
        # the core before each tick when they change (docs/protocol.md, section 8).
        self._feeds_behind = feeds_behind
        # Reads a peer's lease again from its PDS (the core's `RefreshLease`): what it
        # finds comes back as a record, like a hinted one.
        self._refresh_lease = refresh_lease
        self._behind: frozenset[str] = frozenset()
        self._suspects: frozenset[str] = frozenset()  # as last logged
        self._suspect_changes = 0
        self._send, self._recv = trio.open_memory_channel[Event | _Batch](math.inf)
        self._wake_at: int | None = None
        self._alarm_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        # (workload uri, slot) -> the unit of its replica (the lane that last came up)
        self.units: dict[tuple[str, int], str] = {}
        self.handled = 0
        self.adopted: list[ReplicaStatus] = []
        # Until the view is complete: events held back from the core, in arrival order.
        self.view_is_complete = False
        self._held: list[Event] = []
        # Replicas the core has heard of (adopted running, or started by it), by (uri, slot,
        # lane): an exit of any other is one that ended while meshletd was away.
        self._told: set[tuple[str, int, int]] = set()
        self._pull_said: dict[tuple[str, int], float] = {}  # last pull progress forwarded
        # Our writes on their way to the PDS (None: every write is taken as made at once).
        # A replica won with a bid still unwritten waits for it (docs/protocol.md, section
        # 14): starts waiting so, by (uri, slot, lane), and those whose bid never will be.
        self._published = published
        self._held_starts: dict[tuple[str, int, int], trio.CancelScope] = {}
        self._never_started: set[tuple[str, int, int]] = set()

    @property
    def admin_slice_keys(self) -> frozenset[str]:
        """Slice limits an administrator's drop-in sets (the runtime leaves them to it)."""
        return self.runtime.admin_slice_keys

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- inputs --------------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Queue one event for the core (never blocks); held until the view is complete."""
        if not self.view_is_complete:
            self._held.append(event)
            return
        self._send.send_nowait(event)

    def view_complete(self, records: Sequence[RecordChange]) -> None:
        """The start-up read is done (every watched repo listed, ours included): hand the
        core `records` (firehose `RecordEvent`s) and then the events held since start, as
        one batch. From here on events flow one by one."""
        if self.view_is_complete:
            return
        events: list[Event] = [Tick(self.now_ms())]
        for ev in records:
            got = self._record_event(ev)
            if got is not None:
                events.append(got)
        held, self._held = self._held, []
        n = len(events) - 1
        events += held
        self.view_is_complete = True
        log.info(
            "view complete: %d record(s), then %d held event(s), to the scheduler", n, len(held)
        )
        self._send.send_nowait(_Batch(events))

    def record_changed(self, ev: RecordChange) -> None:
        """A firehose `RecordEvent` (created/updated/deleted) → the core's record events."""
        got = self._record_event(ev)
        if got is not None:
            self.feed(got)

    def _record_event(self, ev: RecordChange) -> Event | None:
        trace("seen", uri=ev.uri, action=ev.action, via=getattr(ev, "source", "?"))
        if ev.action == "delete":
            return RecordDeleted(ev.uri)
        rec = core_record(ev, "scheduler")
        return RecordSeen(rec) if rec is not None else None

    def set_draining(self, draining: bool) -> None:
        self.feed(SetDraining(draining))

    async def set_network_grant(self, grant: NetworkGrant) -> None:
        if not await self.runtime.set_network_grant(grant):
            log.error("the network rules for grant %r could not be loaded", grant)

    # -- the loop ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[list[ReplicaStatus]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            adopted = await nursery.start(self.runtime.serve)
            self.adopted = list(adopted)
            for st in adopted:
                uri = workload_uri_of(st.replica)
                slot, lane = st.replica.index, st.replica.lane
                self.units[(uri, slot)] = st.unit
                if st.state in ("running", "starting"):
                    log.info("adopted replica %s (unit %s)", st.replica, st.unit)
                    self._told.add((uri, slot, lane))
                    self.feed(
                        ReplicaStateChanged(
                            uri,
                            slot,
                            "running",
                            health=st.health or None,
                            endpoints=endpoints_of(st),
                            lane=lane,
                            version=st.revision,
                        )
                    )
            nursery.start_soon(self._runtime_events)
            # What the runtime reported while adopting (a replica that ended while meshletd
            # was away) is held before anyone can complete the view: handed over later, it
            # would reach a core that saw our `running` status and no replica, and that
            # started the finished job again. The events task handles each event without
            # an await, so once it waits on an empty channel every one was handled.
            with trio.move_on_after(5):
                while True:
                    st = self.runtime.events.statistics()
                    if not st.current_buffer_used and st.tasks_waiting_receive:
                        break
                    await trio.sleep(0)
            nursery.start_soon(self._alarm)
            nursery.start_soon(self._loop)
            self.feed(Tick(self.now_ms()))  # (held until the view is complete)
            task_status.started(self.adopted)

    async def _loop(self) -> None:
        async for event in self._recv:
            if isinstance(event, _Batch):
                self._perform(self.scheduler.handle_batch(event.events))
                self.handled += len(event.events)
                await trio.sleep(0)
                continue
            now = self.now_ms()
            if not isinstance(event, Tick) and now > self.scheduler.now:
                self._perform(self.scheduler.handle(Tick(now)))
            self._perform(self.scheduler.handle(event))
            self.handled += 1
            await trio.sleep(0)

    def _perform(self, actions: list[Action]) -> None:
        assert self._nursery is not None
        liveness = self.scheduler.liveness
        if liveness.suspect_changes != self._suspect_changes:
            self._suspect_changes = liveness.suspect_changes
            self._log_suspects(frozenset(liveness.suspects), liveness.why)
        for a in actions:
            if isinstance(a, PutRecord):
                record = a.record
                if isinstance(record, MeshletOwner):
                    # The core decided a drain or undrain; the publisher shapes the record
                    # (daemon/publisher.py: the one writer of meshletOwner).
                    record = self._own_record(record)
                elif isinstance(record, WorkloadStatus) and record.state == "failing":
                    log.warning(
                        "replica %d of %s handed off: %s",
                        record.slot,
                        record.workload_uri,
                        record.message,
                    )
                value = record_to_json(record)
                trace("queued", key=f"{a.collection}/{a.rkey}")
                metrics.count_write(a.collection, "create" if a.create else "update")
                if a.collection.endswith(".bid"):
                    metrics.bid_written(value)
                self._submit_write(Write("put", a.collection, a.rkey, value, a.not_after))
            elif isinstance(a, DeleteRecord):
                trace("queued", key=f"{a.collection}/{a.rkey}", delete=1)
                metrics.count_write(a.collection, "delete")
                self._submit_write(Write("delete", a.collection, a.rkey))
            elif isinstance(a, StartReplica):
                trace("start", uri=a.workload.uri, slot=a.slot, round=a.round)
                metrics.ROUNDS_WON.labels(metrics.kind_of(a.round)).inc()
                self._nursery.start_soon(self._start, a)
            elif isinstance(a, StopReplica):
                metrics.REPLICA_STOPS.inc()
                self._nursery.start_soon(self._stop, a)
            elif isinstance(a, ProbePeer):
                self._nursery.start_soon(self._run_probe, a.meshlet)
            elif isinstance(a, RefreshLease):
                if self._refresh_lease is not None:
                    self._refresh_lease(a.meshlet)
            elif isinstance(a, WakeAt):
                self._wake_at = a.at
                self._alarm_changed.set()
            elif isinstance(a, Reply):
                log.info("scheduler: %s", a.message)

    def _log_suspects(self, now: frozenset[str], why: dict[str, str]) -> None:
        """Say in the journal whom we suspect lost, and why (section 8): the first thing
        an operator looks for when a slot moved off a host that was up."""
        for m in sorted(now - self._suspects):
            log.info("suspect %s lost: %s", m, why.get(m, "?"))
            trace("suspect", peer=m)
        for m in sorted(self._suspects - now):
            log.info("suspect %s answers again", m)
        self._suspects = now

    async def _alarm(self) -> None:
        while True:
            self._alarm_changed = trio.Event()
            at = self._wake_at
            if at is None:
                await self._alarm_changed.wait()
                continue
            delay = max(0.0, at / 1000 - self._clock())
            with trio.move_on_after(delay):
                await self._alarm_changed.wait()
                continue
            self._wake_at = None
            if self._feeds_behind is not None:
                behind = self._feeds_behind()
                if behind != self._behind:
                    if behind:
                        log.info("not heard lately from the PDS of: %s", ", ".join(sorted(behind)))
                    else:
                        log.info("every followed PDS heard again")
                    self._behind = behind
                    self.feed(FeedsBehind(behind))
            self.feed(Tick(self.now_ms()))

    # -- replicas ------------------------------------------------------------------------

    async def secrets_for(self, wl: Workload) -> dict[str, bytes]:
        """The values of the secrets a workload references (fetched where they live)."""
        out: dict[str, bytes] = {}
        names = [ref.name for ref in wl.secrets]
        if wl.image_pull_secret:
            names.append(wl.image_pull_secret)
        for name in names:
            value = await self._secret(wl.uri, name) if self._secret else None
            if value is None:
                raise LookupError(f"secret {name!r} is not available to this meshlet")
            out[name] = value
        return out

    def spec_for(
        self, action: StartReplica, secret_values: Mapping[str, bytes] | None = None
    ) -> ReplicaSpec:
        owner_handle = self._owner_handle(action.workload.owner)
        return replica_spec(action, secret_values or {}, owner_handle)

    async def _bid_published(self, action: StartReplica, what: str) -> bool:
        """Wait while our bid that won this slot is still unwritten: no replica runs on a
        bid no observer can see yet (its PDS down: the bid may be dropped at its round's
        deadline and the slot go to another meshlet, which would run it too). False if it
        never will be, or a stop came first."""
        published = self._published
        key = (action.workload.uri, action.slot, action.lane)
        self._never_started.discard(key)
        if published is None:
            return True
        bid = (NSID_BID, winning_bid_rkey(action.workload.uri, action.round, action.slot))
        if not published.is_pending(*bid):
            return True
        log.info("%s waits for our bid of round %d to reach our PDS", what, action.round)
        made = False
        with trio.CancelScope() as scope:
            self._held_starts[key] = scope
            try:
                made = await published.written(*bid)
            finally:
                stopped = self._held_starts.get(key) is not scope  # `_stop` took it
                if not stopped:
                    del self._held_starts[key]
        if stopped:
            return False
        if not made:
            log.info("%s not started: our bid never reached our PDS", what)
            self._never_started.add(key)
        return made

    async def _start(self, action: StartReplica) -> None:
        uri, slot, lane = action.workload.uri, action.slot, action.lane
        what = f"replica {slot} of {uri}" + (f" (lane {lane})" if lane else "")
        if not await self._bid_published(action, what):
            return
        self._told.add((uri, slot, lane))
        log.info("starting %s (round %d, version %s)", what, action.round, action.workload.version)
        try:
            values = await self.secrets_for(action.workload)
            outcome = await self.runtime.start(self.spec_for(action, values))
        except Exception as e:
            log.warning("%s could not start: %s", what, e)
            self.feed(ReplicaStateChanged(uri, slot, "failed", message=str(e)[:200], lane=lane))
            return
        if isinstance(outcome, ReplicaRunning):
            self.units[(uri, slot)] = outcome.unit
            trace(
                "running",
                uri=uri,
                slot=slot,
                pull_ms=outcome.pull_ms,
                start_ms=outcome.start_ms,
            )
            self.feed(ReplicaStateChanged(uri, slot, "running", lane=lane))
        # An immediate end (failed pull, exit) arrives as a runtime event too.

    async def _stop(self, action: StopReplica) -> None:
        uri, slot, lane = action.workload_uri, action.slot, action.lane
        what = f"replica {slot} of {uri}" + (f" (lane {lane})" if lane else "")
        key = (uri, slot, lane)
        held = self._held_starts.pop(key, None)
        if held is not None or key in self._never_started:
            if held is not None:
                held.cancel()
            self._never_started.discard(key)
            log.info("%s not started after all (%s)", what, action.reason)
            self.feed(ReplicaStateChanged(uri, slot, "stopped", lane=lane))
            return
        log.info("stopping %s (%s)", what, action.reason)
        try:
            await self.runtime.stop(replica_id(uri, slot, lane))
            self._told.discard((uri, slot, lane))
        except Exception as e:
            log.warning("%s did not stop cleanly: %s", what, e)
        self.feed(ReplicaStateChanged(uri, slot, "stopped", lane=lane))

    async def _runtime_events(self) -> None:
        async for ev in self.runtime.events:
            uri, slot, lane = workload_uri_of(ev.replica), ev.replica.index, ev.replica.lane
            if isinstance(ev, ReplicaRunning):
                self.units[(uri, slot)] = ev.unit
            else:
                self.units.setdefault((uri, slot), ev.unit)
            what = f"replica {slot} of {uri}" + (f" (lane {lane})" if lane else "")
            told = (uri, slot, lane) in self._told
            if isinstance(ev, ReplicaExited | ReplicaOomKilled) and not told:
                # It ended while meshletd was away (found ended on adoption): the core learns
                # that it ran here, then how it ended, and reports it like any exit.
                log.info("%s ended while meshletd was not running", what)
                self.feed(ReplicaStateChanged(uri, slot, "running", lane=lane))
            self._told.add((uri, slot, lane))
            if isinstance(ev, ReplicaPulling):
                # Each forwarded step is a status write: the first at once, then at most
                # one per PULL_PROGRESS_EVERY_S (a long pull of many layers costs few).
                last = self._pull_said.get((uri, slot))
                now = self._clock()
                if last is None or ev.layers_done == 0 or now - last >= PULL_PROGRESS_EVERY_S:
                    self._pull_said[(uri, slot)] = now
                    self.feed(
                        ReplicaStateChanged(uri, slot, "pulling", message=ev.message, lane=lane)
                    )
                continue
            self._pull_said.pop((uri, slot), None)
            if isinstance(ev, ReplicaRunning):
                self.feed(ReplicaStateChanged(uri, slot, "running", lane=lane))
            elif isinstance(ev, ReplicaHealth):
                log.info("%s is %s", what, ev.health)
                self.feed(ReplicaStateChanged(uri, slot, "running", health=ev.health, lane=lane))
            elif isinstance(ev, ReplicaExited):
                log.info(
                    "%s exited with %d%s",
                    what,
                    ev.exit_code,
                    " (unhealthy: killed by its health check)" if ev.health else "",
                )
                self.feed(
                    ReplicaStateChanged(
                        uri, slot, "exited", ev.exit_code, health=ev.health or None, lane=lane
                    )
                )
            elif isinstance(ev, ReplicaOomKilled):
                log.info("%s was killed: out of memory", what)
                self.feed(ReplicaStateChanged(uri, slot, "exited", 137, lane=lane))
            elif isinstance(ev, ReplicaFailed):
                log.warning("%s failed: %s", what, ev.message)
                self.feed(
                    ReplicaStateChanged(
                        uri, slot, "failed", message=f"{ev.error}: {ev.message}"[:200], lane=lane
                    )
                )
            # ReplicaStarting/ReplicaStopped: the core learns these from its own actions.

    async def _run_probe(self, meshlet: str) -> None:
        ok = False
        if self._probe is not None:
            try:
                with trio.move_on_after(self.probe_timeout_s):
                    ok = await self._probe(meshlet)
            except Exception:
                ok = False
        metrics.PROBES.inc()
        if not ok:
            metrics.PROBE_FAILURES.inc()
        self.feed(ProbeResult(meshlet, ok))
