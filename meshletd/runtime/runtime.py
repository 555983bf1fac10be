"""The replica lifecycle, as small steps in order, over a `Machine`.

    validate → image → secrets → state dir → unit start → running
             → (watch: exited | OOM-killed | failed)  or  stop → cleanup

Each step is a method below; a step that fails undoes what the earlier steps made, so a
replica that could not start leaves nothing behind. Every state change is an event on
`events`. A replica whose unit was started is owned by systemd from then on: cancelling
`start()` after that point leaves it running, and it is picked up like any adopted unit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from meshletd.runtime import naming
from meshletd.runtime.events import (
    EndEvent,
    ReplicaExited,
    ReplicaFailed,
    ReplicaHealth,
    ReplicaRunning,
    ReplicaStarting,
    ReplicaStatus,
    ReplicaStopped,
    ReplicaUsage,
    RuntimeEvent,
)
from meshletd.runtime.image_step import ImageStep
from meshletd.runtime.machine import Machine, MachineError
from meshletd.runtime.outcome import (
    end_event,
    oom_killed_from_counters,
    peak_memory_from_counters,
    unit_phase,
)
from meshletd.runtime.spec import (
    InvalidReplicaSpec,
    PortBinding,
    ReplicaId,
    ReplicaSpec,
    UnitStartFailed,
    validate_spec,
)
from meshletd.runtime.units import (
    INFINITY,
    LABEL,
    WARM_LABEL,
    RuntimeConfig,
    cpu_quota_per_sec_usec,
    identity_from_environment,
    replica_network,
    unit_properties,
)
from meshletd.runtime.upkeep import HostUpkeep
from meshletd.trace import trace

log = logging.getLogger("meshletd.runtime")
_E = TypeVar("_E", bound=RuntimeEvent)

# How often a starting unit is polled until it runs (short: it is on the start path).
START_POLL_S = 0.01


@dataclass
class _Replica:
    replica: ReplicaId
    unit: str
    container: str
    revision: str
    secrets: list[str] = field(default_factory=list)
    milli_cpu: int | None = None  # the workload's CPU limit (None: unknown, not checked)
    endpoints: tuple[PortBinding, ...] = ()  # where its ports are published
    health_check: bool = False  # podman checks its health: the runtime reads the verdict
    health: str = ""  # the last verdict reported
    ran: bool = False
    stop_requested: bool = False
    usage: ReplicaUsage = field(default_factory=ReplicaUsage)
    lock: trio.Lock = field(default_factory=trio.Lock)


class ReplicaRuntime(ImageStep, HostUpkeep):
    """Runs replicas as transient units; see the module docstring and docs/runtime.md."""

    def __init__(
        self,
        machine: Machine,
        config: RuntimeConfig | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.machine = machine
        self.config = config or RuntimeConfig()
        self._clock = clock
        self._send, self._events = trio.open_memory_channel[RuntimeEvent](math.inf)
        self._replicas: dict[ReplicaId, _Replica] = {}
        self._image_seen: dict[str, float] = {}  # image -> when found present
        self._pulling: dict[ReplicaId, trio.CancelScope] = {}  # starts in their image step
        # Slice limits an administrator's drop-in sets (meshletd leaves them), after serve().
        self.admin_slice_keys: frozenset[str] = frozenset()
        self._rules_in_force = False
        self._images_in_use = 0  # starts in their image step (upkeep.py)
        self._prune_lock = trio.Lock()
        self._warm_send, self._warm_queue = trio.open_memory_channel[str](math.inf)
        self._warm_pending: set[str] = set()
        self._warm_held: dict[str, int] = {}
        self.namespaces_warmed = 0

    # ---- public face -------------------------------------------------------------------

    @property
    def events(self) -> trio.MemoryReceiveChannel[RuntimeEvent]:
        """Every state change of every replica, in order."""
        return self._events

    def replicas(self) -> list[ReplicaStatus]:
        """The replicas this runtime looks after right now."""
        return [
            ReplicaStatus(
                r.replica,
                r.unit,
                "running" if r.ran else "starting",
                r.revision,
                r.usage,
                r.endpoints,
                r.health,
            )
            for r in sorted(self._replicas.values(), key=lambda r: r.replica)
        ]

    async def serve(
        self, *, task_status: trio.TaskStatus[list[ReplicaStatus]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Prepare the slice, adopt what is already there, then watch replicas until cancelled.

        `nursery.start(runtime.serve)` returns the adopted replicas.
        """
        admin = await self.machine.ensure_slice(self.config)
        self.admin_slice_keys = admin
        if admin:
            log.info(
                "%s: keeping the administrator's %s (a drop-in sets it; meshletd never "
                "overrides it)",
                self.config.slice,
                ", ".join(sorted(admin)),
            )
        await self.apply_network_rules()
        adopted = await self.adopt()
        task_status.started(adopted)
        rules_due = self._clock() + self.config.network_rules_refresh_s
        storage_due = self._clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.keep_user_namespaces_warm)
            while True:
                await trio.sleep(self.config.poll_interval_s)
                await self.poll()
                if self._clock() >= storage_due and self._prune_may_run():
                    storage_due = self._clock() + self.config.storage_check_s
                    await self.keep_image_store_in_bounds()
                if self.config.network_rules and self._clock() >= rules_due:
                    rules_due = self._clock() + self.config.network_rules_refresh_s
                    await self.apply_network_rules(quiet=True)

    async def start(self, spec: ReplicaSpec) -> ReplicaRunning | EndEvent:
        """Start one replica; returns its `ReplicaRunning`, or how it failed.

        Starting a replica that already runs is a no-op that returns its `ReplicaRunning`.
        """
        try:
            validate_spec(spec)
        except InvalidReplicaSpec as err:
            unit = ""
            try:
                unit = naming.unit_name(spec.replica, spec.owner_handle)
            except Exception:
                pass
            return self._emit(ReplicaFailed(spec.replica, unit, err.name, err.message))

        existing = self._replicas.get(spec.replica)
        if existing is not None:
            return ReplicaRunning(existing.replica, existing.unit, revision=existing.revision)

        container = naming.container_name(spec.replica, spec.owner_handle)
        unit = naming.unit_name(spec.replica, spec.owner_handle)
        found = await self.machine.unit_snapshot(unit)
        if unit_phase(found) != "gone":
            # A unit of this name exists: it is ours only if the identity it carries is this
            # replica's. Another's (a name collision, a unit made by hand) is left alone.
            ident = identity_from_environment(found.environment)
            if ident is None or ident.replica != spec.replica or ident.container != container:
                who = "no replica identity" if ident is None else f"replica {ident.replica}"
                log.warning("unit %s carries %s, not %s: not taken", unit, who, spec.replica)
                return self._emit(
                    ReplicaFailed(
                        spec.replica,
                        unit,
                        "UnitNameTaken",
                        f"unit {unit} exists and belongs to {who}",
                    )
                )
        if unit_phase(found) in ("starting", "running"):
            # Someone (an earlier meshletd) started it and we did not adopt it yet.
            rep = self._track(spec.replica, unit, container, spec.revision or "", ran=True)
            rep.milli_cpu = spec.resources.milli_cpu
            async with rep.lock:
                if failed := await self._enforce_cpu_limit(rep):
                    return failed
            return ReplicaRunning(rep.replica, unit, adopted=True, revision=spec.revision or "")
        if unit_phase(found) != "gone":
            # An ended, unreported unit of the same name: report it, then start afresh.
            rep = self._track(spec.replica, unit, container, spec.revision or "", ran=True)
            async with rep.lock:
                await self._finish(rep)

        if (
            self.config.network_rules
            and replica_network(spec, self.config) != "none"
            and not self._rules_in_force
            and not await self.apply_network_rules()
        ):
            return self._emit(
                ReplicaFailed(
                    spec.replica,
                    unit,
                    UnitStartFailed.name,
                    f"the host's network rules (grant {self.config.network_grant!r}) are not "
                    "in force: not started with a network (see meshletd's log)",
                )
            )
        self._emit(ReplicaStarting(spec.replica, unit))
        rep = _Replica(
            spec.replica,
            unit,
            container,
            spec.revision or "",
            milli_cpu=spec.resources.milli_cpu,
            endpoints=spec.ports,
            health_check=spec.health is not None,
        )
        t0 = self._clock()
        started = False
        async with self._image_in_use():  # no prune until its container uses the image
            try:
                # First: a pull with the owner's credentials keeps its auth file in here.
                await self.machine.prepare_state_dir(unit)
                if failed := await self._ensure_image(rep, spec):
                    return failed
                t1 = self._clock()
                if failed := await self._create_secrets(rep, spec):
                    return failed
                trace("unit", replica=spec.replica.workload, slot=spec.replica.index)
                if failed := await self._start_unit(rep, spec):
                    return failed
                trace("unit_started", replica=spec.replica.workload, slot=spec.replica.index)
                started = True
            finally:
                if not started:
                    with trio.CancelScope(shield=True):
                        await self._cleanup(rep, unit_started=False)
            result = await self._await_running(rep, pull_ms=_ms(t1 - t0), t_start=t1)
        if not isinstance(result, ReplicaRunning):
            self._image_seen.pop(spec.image, None)
        else:
            self._warm_after_start(spec.image, held=len(self._replicas))
        return result

    async def stop(self, replica: ReplicaId) -> ReplicaStopped | None:
        """Stop a replica and remove its container; None when no such replica runs."""
        rep = self._replicas.get(replica)
        if rep is None:
            if (pulling := self._pulling.get(replica)) is not None:
                pulling.cancel()  # its start ends without a unit (and says so)
            return None
        async with rep.lock:
            if self._replicas.get(replica) is not rep:
                return None  # it ended while we waited; its end event was emitted
            rep.stop_requested = True
            rep.usage = rep.usage.merge(await self._sample(rep))
            await self.machine.stop_unit(rep.unit)
            event = await self._finish(rep)
        return event if isinstance(event, ReplicaStopped) else None

    async def adopt(self) -> list[ReplicaStatus]:
        """Take over the replica units already on the machine (after a meshletd restart).

        Running units are tracked again (one `ReplicaRunning(adopted=True)` each, no second
        start); units that ended while meshletd was away are reported and cleaned up;
        containers, secrets and state dirs that belong to no unit are removed.
        """
        for unit in await self.machine.list_units(naming.UNIT_PATTERN):
            snap = await self.machine.unit_snapshot(unit)
            phase = unit_phase(snap)
            ident = identity_from_environment(snap.environment)
            if ident is None:
                continue  # named like ours but not a replica (e.g. a podman pause unit)
            if not naming.unit_belongs(unit, ident.replica, ident.container):
                log.warning(
                    "unit %s names replica %s but its name does not fit it: not adopted",
                    unit,
                    ident.replica,
                )
                continue
            if ident.replica in self._replicas:
                continue
            rep = self._track(
                ident.replica, unit, ident.container, ident.revision, ran=phase == "running"
            )
            rep.milli_cpu = ident.milli_cpu
            rep.endpoints = tuple(
                PortBinding(n, a, p, 0, proto) for n, a, p, proto in ident.endpoints
            )
            rep.health_check = ident.health_check
            if phase in ("starting", "running", "stopping"):
                log.info("adopted replica %s (unit %s)", ident.replica, unit)
                # /run may have been cleaned while meshletd was away; the unit's
                # ExecStopPost needs the dir to leave its memory counters in.
                await self.machine.prepare_state_dir(unit, keep=True)
                if phase == "running":
                    async with rep.lock:
                        if await self._enforce_cpu_limit(rep):
                            continue
                        if rep.health_check:  # what it was: the status need not say starting
                            await self._read_health(rep)
                    self._emit(
                        ReplicaRunning(rep.replica, unit, adopted=True, revision=rep.revision)
                    )
            else:
                rep.ran = True
                async with rep.lock:
                    await self._finish(rep)
        await self._remove_orphans()
        return self.replicas()

    async def poll(self) -> None:
        """Look at every replica once: sample usage, report and clean up the ended ones."""
        for rep in list(self._replicas.values()):
            try:
                await self._look_at(rep)
            except MachineError as err:
                # systemd or podman hiccuped: say so and look again next time.
                log.error("could not check replica %s (unit %s): %s", rep.replica, rep.unit, err)

    async def _look_at(self, rep: _Replica) -> None:
        if rep.lock.locked():
            return  # a start or stop is working on it
        async with rep.lock:
            if self._replicas.get(rep.replica) is not rep:
                return
            phase = unit_phase(await self.machine.unit_snapshot(rep.unit))
            if phase == "running":
                # Every look, not only the first: a `systemctl daemon-reload` re-reads a
                # transient unit's drop-ins, where systemd 252 writes CPUQuota= in whole
                # percent (15 milli-CPU comes back as 10, 5 as the launch quota).
                if await self._enforce_cpu_limit(rep):
                    return
                rep.usage = rep.usage.merge(await self._sample(rep))
                if not rep.ran:
                    rep.ran = True
                    self._emit(
                        ReplicaRunning(rep.replica, rep.unit, adopted=True, revision=rep.revision)
                    )
                if rep.health_check and rep.health != "healthy":
                    await self._read_health(rep)
            elif phase in ("ended", "gone"):
                await self._finish(rep)

    async def _read_health(self, rep: _Replica) -> None:
        """Report the verdict of podman's health check when it changed. Read until the
        replica is first healthy: after that the only change is to unhealthy, which podman
        ends by killing the container (`--health-on-failure=kill`), reported with the exit."""
        container = await self.machine.inspect_container(rep.container)
        if container is not None and container.health and container.health != rep.health:
            rep.health = container.health
            self._emit(ReplicaHealth(rep.replica, rep.unit, container.health))

    async def usage(self, replica: ReplicaId) -> ReplicaUsage:
        """CPU time and peak memory of a running replica so far."""
        rep = self._replicas.get(replica)
        if rep is None:
            return ReplicaUsage()
        rep.usage = rep.usage.merge(await self._sample(rep))
        return rep.usage

    # ---- the steps ----------------------------------------------------------------------

    async def _create_secrets(self, rep: _Replica, spec: ReplicaSpec) -> ReplicaFailed | None:
        for secret in spec.secrets:
            name = naming.secret_name(rep.container, secret.name)
            try:
                await self.machine.remove_secret(name)  # a leftover of an earlier run
                await self.machine.create_secret(name, secret.data)
            except MachineError as err:
                return self._emit(
                    ReplicaFailed(
                        rep.replica,
                        rep.unit,
                        UnitStartFailed.name,
                        f"could not create podman secret {name}: {err}",
                    )
                )
            rep.secrets.append(name)
        return None

    async def _start_unit(self, rep: _Replica, spec: ReplicaSpec) -> ReplicaFailed | None:
        props = unit_properties(spec, self.config, rep.unit, rep.container)
        try:
            await self.machine.start_unit(rep.unit, props)
        except MachineError as err:
            return self._emit(
                ReplicaFailed(
                    rep.replica,
                    rep.unit,
                    UnitStartFailed.name,
                    f"systemd refused unit {rep.unit}: {err}",
                )
            )
        self._replicas[rep.replica] = rep
        return None

    async def _await_running(
        self, rep: _Replica, *, pull_ms: int, t_start: float
    ) -> ReplicaRunning | EndEvent:
        deadline = t_start + self.config.start_timeout_s + 5
        async with rep.lock:
            # systemd says when the start job is over; the loop below then sees the
            # outcome at its first look (it polls only where the machine cannot tell).
            await self.machine.wait_started(rep.unit, max(0.0, deadline - self._clock()))
            while True:
                snap = await self.machine.unit_snapshot(rep.unit)
                phase = unit_phase(snap)
                if phase == "running":
                    # No quota check here: the unit became active only after its own
                    # ExecStartPost set the workload's quota (a failure fails the unit).
                    # The watcher checks it from its next look on.
                    rep.ran = True
                    return self._emit(
                        ReplicaRunning(
                            rep.replica,
                            rep.unit,
                            pull_ms=pull_ms,
                            start_ms=_ms(self._clock() - t_start),
                            revision=rep.revision,
                        )
                    )
                if phase in ("ended", "gone"):
                    return await self._finish(rep)
                if self._clock() > deadline:
                    await self.machine.stop_unit(rep.unit)
                    return await self._finish(rep)
                await trio.sleep(START_POLL_S)

    async def _enforce_cpu_limit(self, rep: _Replica) -> ReplicaFailed | None:
        """Make sure a running replica's unit has its workload's CPU quota, not the launch one.

        The unit sets it itself (ExecStartPost, before it is "active"); this is the check
        that it holds, wherever the runtime sees a replica running (its start, a unit
        found on adoption, every look of the watcher). A quota that is not the workload's is
        set again (runtime, not persistent); if that fails the replica is stopped and
        reported failed: it never runs on without its limit. Call with `rep.lock` held.
        """
        if rep.milli_cpu is None:
            return None  # started by a meshletd that did not record its limit
        want = cpu_quota_per_sec_usec(rep.milli_cpu)
        try:
            have = await self.machine.cpu_quota_usec(rep.unit)
            if have is None or have == want:
                return None  # gone (the caller finds out), or as it should be
            log.warning(
                "replica %s (unit %s) ran with CPU quota %s instead of %d milli-CPU; setting it",
                rep.replica,
                rep.unit,
                "none" if have == INFINITY else f"{have // 1000} milli-CPU",
                rep.milli_cpu,
            )
            await self.machine.set_cpu_quota_usec(rep.unit, want)
            return None
        except MachineError as err:
            why = str(err)
        log.error(
            "stopping replica %s (unit %s): could not set its CPU quota of %d milli-CPU: %s",
            rep.replica,
            rep.unit,
            rep.milli_cpu,
            why,
        )
        rep.usage = rep.usage.merge(await self._sample(rep))
        with trio.CancelScope(shield=True):
            await self._cleanup(rep, unit_started=True, snap_phase="running")
        self._replicas.pop(rep.replica, None)
        return self._emit(
            ReplicaFailed(
                rep.replica,
                rep.unit,
                UnitStartFailed.name,
                f"stopped: its CPU quota of {rep.milli_cpu} milli-CPU could not be set ({why})",
                rep.usage,
            )
        )

    async def _finish(self, rep: _Replica) -> EndEvent:
        """Report how an ended replica ended, then remove everything it left."""
        snap = await self.machine.unit_snapshot(rep.unit)
        container = await self.machine.inspect_container(rep.container)
        counters = await self.machine.read_saved_counters(rep.unit)
        usage = rep.usage.merge(ReplicaUsage(0, peak_memory_from_counters(counters)))
        if (
            not rep.ran
            and not snap.start_post_failed  # systemd ended it before it counted as running
            and container is not None
            and container.status in ("exited", "stopped")
        ):
            # It ran and ended between two looks (a short job): it did run.
            rep.ran = True
            self._emit(ReplicaRunning(rep.replica, rep.unit, revision=rep.revision))
        event = end_event(
            rep.replica,
            snap,
            container,
            ran=rep.ran,
            stop_requested=rep.stop_requested,
            oom_counted=oom_killed_from_counters(counters),
            usage=usage,
        )
        if isinstance(event, ReplicaExited) and container is not None:
            if container.health == "unhealthy" or rep.health == "unhealthy":
                event = dataclasses.replace(event, health="unhealthy")
        with trio.CancelScope(shield=True):
            await self._cleanup(rep, unit_started=True, snap_phase=unit_phase(snap))
        self._replicas.pop(rep.replica, None)
        if snap.start_post_failed and not rep.ran:
            log.error(
                "replica %s (unit %s) stopped by systemd: its CPU quota of %s milli-CPU could "
                "not be set (ExecStartPost failed; see journalctl -u %s)",
                rep.replica,
                rep.unit,
                rep.milli_cpu,
                rep.unit,
            )
        log.info(
            "replica %s ended: %s (unit %s, container %s)", rep.replica, event, snap, container
        )
        return self._emit(event)

    async def _cleanup(
        self, rep: _Replica, *, unit_started: bool, snap_phase: str = "gone"
    ) -> None:
        try:
            if unit_started:
                await self.machine.remove_container(rep.container)
                await self._discard_unit(rep.unit, snap_phase)
            names = rep.secrets or [
                *await self.machine.list_secrets(naming.secret_prefix(rep.container)),
                *await self.machine.list_secrets(naming.legacy_secret_prefix(rep.container)),
            ]
            for name in names:
                await self.machine.remove_secret(name)
            await self.machine.remove_state_dir(rep.unit)
        except MachineError as err:
            log.error("cleanup of replica %s (unit %s) incomplete: %s", rep.replica, rep.unit, err)

    async def _discard_unit(self, unit: str, phase: str) -> None:
        if phase in ("starting", "running", "stopping", "ended"):
            await self.machine.stop_unit(unit)
        await self.machine.reset_failed(unit)

    async def _remove_orphans(self) -> None:
        live_containers = {r.container for r in self._replicas.values()}
        live_units = {r.unit for r in self._replicas.values()}
        for name in await self.machine.list_containers(LABEL):
            if name not in live_containers:
                log.warning("removing orphan container %s", name)
                await self.machine.remove_container(name)
        # Left by a warm-up a killed meshletd did not finish: each holds a range.
        for name in await self.machine.list_containers(WARM_LABEL):
            await self.machine.remove_container(name)
        for name in await self.machine.list_secrets(naming.UNIT_PREFIX):
            if not any(
                name.startswith((naming.secret_prefix(c), naming.legacy_secret_prefix(c)))
                for c in live_containers
            ):
                await self.machine.remove_secret(name)
        for unit in await self.machine.list_state_dirs():
            if unit not in live_units:
                await self.machine.remove_state_dir(unit)

    # ---- small helpers ------------------------------------------------------------------

    def _track(
        self, replica: ReplicaId, unit: str, container: str, revision: str, *, ran: bool
    ) -> _Replica:
        rep = _Replica(replica, unit, container, revision, ran=ran)
        self._replicas[replica] = rep
        return rep

    async def _sample(self, rep: _Replica) -> ReplicaUsage:
        try:
            return await self.machine.sample_usage(rep.unit)
        except MachineError:
            return ReplicaUsage()

    def _emit(self, event: _E) -> _E:
        self._send.send_nowait(event)
        return event


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
