"""The runtime's contract: one suite of behaviours, run against the fake and the real machine.

tests/unit/test_runtime_fake_contract.py runs it on `FakeMachine`; the system tests run it
on a booted systemd host. A `Harness` gives fresh runtimes over one machine (a new runtime
on the same machine is what a restarted meshletd is) and lists what replicas left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import trio

from meshletd.runtime.events import (
    ReplicaExited,
    ReplicaFailed,
    ReplicaOomKilled,
    ReplicaRunning,
    ReplicaStarting,
    ReplicaStatus,
    ReplicaStopped,
    RuntimeEvent,
)
from meshletd.runtime.outcome import unit_phase
from meshletd.runtime.runtime import ReplicaRuntime
from meshletd.runtime.spec import ReplicaId, ReplicaSpec, Resources

OWNER = "did:plc:contractowner00000000000"
HANDLE = "alice.test"
SLEEP = ("sleep", "3600")
LATE_EXIT_4 = ("sh", "-c", "sleep 2; exit 4")


class Harness(Protocol):
    image: str
    oom_args: tuple[str, ...]
    end_timeout_s: float

    def runtime(self) -> ReplicaRuntime:
        """A new runtime on the machine (as after a restart of meshletd)."""
        ...

    async def leftovers(self) -> dict[str, list[str]]:
        """Replica units (any state), containers, secrets and state dirs on the machine."""
        ...

    async def make_orphans(self, container: str) -> None:
        """A labelled container and a secret `<container>.x` that no unit owns."""
        ...


def spec(
    h: Harness, workload: str = "web", index: int = 0, args: tuple[str, ...] = SLEEP, **kw: object
) -> ReplicaSpec:
    base = ReplicaSpec(
        replica=ReplicaId(OWNER, workload, index),
        owner_handle=HANDLE,
        image=h.image,
        resources=Resources(milli_cpu=500, memory_mib=64, tasks=32),
        args=args,
        stop_timeout_s=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def serving(rt: ReplicaRuntime) -> AsyncIterator[list[ReplicaStatus]]:
    """Run `rt.serve` for the block; leaving the block is like meshletd being killed."""
    async with trio.open_nursery() as nursery:
        adopted = await nursery.start(rt.serve)
        yield adopted
        nursery.cancel_scope.cancel()


async def wait_event(
    rt: ReplicaRuntime,
    match: Callable[[RuntimeEvent], bool],
    timeout_s: float,
    seen: list[RuntimeEvent] | None = None,
) -> RuntimeEvent:
    with trio.fail_after(timeout_s):
        async for event in rt.events:
            if seen is not None:
                seen.append(event)
            if match(event):
                return event
    raise AssertionError("event channel closed")


def ended(replica: ReplicaId) -> Callable[[RuntimeEvent], bool]:
    """Matches the end event (exited, OOM-killed, failed, stopped) of one replica."""

    def match(event: RuntimeEvent) -> bool:
        return event.replica == replica and isinstance(
            event, ReplicaExited | ReplicaFailed | ReplicaOomKilled | ReplicaStopped
        )

    return match


def drain(rt: ReplicaRuntime) -> list[RuntimeEvent]:
    out: list[RuntimeEvent] = []
    while True:
        try:
            out.append(rt.events.receive_nowait())
        except trio.WouldBlock:
            return out


async def assert_clean(h: Harness) -> None:
    left = await h.leftovers()
    assert all(not v for v in left.values()), f"replicas left things behind: {left}"


# ---- the contract -----------------------------------------------------------------------


async def contract_start_then_stop_leaves_nothing(h: Harness) -> None:
    rt = h.runtime()
    async with serving(rt):
        s = spec(h)
        result = await rt.start(s)
        assert isinstance(result, ReplicaRunning), result
        assert [type(e) for e in drain(rt)] == [ReplicaStarting, ReplicaRunning]
        assert [r.replica for r in rt.replicas()] == [s.replica]
        assert (await h.leftovers())["units"] == [result.unit]
        stopped = await rt.stop(s.replica)
        assert isinstance(stopped, ReplicaStopped)
        assert drain(rt) == [stopped]
        assert rt.replicas() == []
        assert await rt.stop(s.replica) is None
    await assert_clean(h)


async def contract_exit_codes_are_reported(h: Harness) -> None:
    rt = h.runtime()
    async with serving(rt):
        for i, code in enumerate((0, 3)):
            s = spec(h, workload=f"job{code}", index=i, args=("sh", "-c", f"exit {code}"))
            await rt.start(s)
            ev = await wait_event(rt, ended(s.replica), h.end_timeout_s)
            assert isinstance(ev, ReplicaExited), ev
            assert ev.exit_code == code
    await assert_clean(h)


async def contract_oom_is_reported(h: Harness) -> None:
    rt = h.runtime()
    async with serving(rt):
        s = spec(
            h,
            workload="hog",
            args=h.oom_args,
            resources=Resources(milli_cpu=1000, memory_mib=32, tasks=32),
        )
        await rt.start(s)
        ev = await wait_event(
            rt,
            lambda e: isinstance(e, ReplicaExited | ReplicaFailed | ReplicaOomKilled),
            h.end_timeout_s,
        )
        assert isinstance(ev, ReplicaOomKilled), ev
        assert ev.usage.peak_memory_bytes > 16 << 20
    await assert_clean(h)


async def contract_bad_specs_fail_clearly_and_leave_nothing(h: Harness) -> None:
    rt = h.runtime()
    cases = {
        "InvalidReplicaSpec:image": spec(h, image="busybox; touch /tmp/pwned"),
        "InvalidReplicaSpec:$(": spec(h, image="$(reboot)"),
        "InvalidReplicaSpec:resources.memory_mib": spec(
            h, resources=Resources(milli_cpu=100, memory_mib=-5)
        ),
        "InvalidReplicaSpec:resources.milli_cpu": spec(
            h, resources=Resources(milli_cpu=0, memory_mib=64)
        ),
        "ImageNotFound:localhost/nope": spec(h, image="localhost/nope:latest"),
    }
    async with serving(rt):
        for want, s in cases.items():
            error, _, fragment = want.partition(":")
            result = await rt.start(s)
            assert isinstance(result, ReplicaFailed), (want, result)
            assert result.error == error, (want, result)
            assert fragment in result.message, (want, result.message)
            assert drain(rt)[-1] == result
        assert rt.replicas() == []
    await assert_clean(h)


async def contract_starting_twice_runs_once(h: Harness) -> None:
    rt = h.runtime()
    async with serving(rt):
        s = spec(h)
        first = await rt.start(s)
        second = await rt.start(s)
        assert isinstance(first, ReplicaRunning), first
        assert isinstance(second, ReplicaRunning), second
        assert (await h.leftovers())["containers"] == [first.unit.removesuffix(".service")]
        await rt.stop(s.replica)
    await assert_clean(h)


async def contract_restart_adopts_without_duplicates_or_orphans(h: Harness, n: int = 5) -> None:
    specs = [spec(h, workload="svc", index=i) for i in range(n)]
    first = h.runtime()
    async with serving(first):
        for s in specs:
            assert isinstance(await first.start(s), ReplicaRunning)
    # meshletd is gone; the replicas are not.
    left = await h.leftovers()
    assert len(left["containers"]) == n, left
    second = h.runtime()
    async with serving(second) as adopted:
        assert sorted(r.replica for r in adopted) == [s.replica for s in specs]
        events = drain(second)
        assert all(isinstance(e, ReplicaRunning) and e.adopted for e in events), events
        assert len(events) == n
        for s in specs:  # the daemon asks again: nothing new starts
            assert isinstance(await second.start(s), ReplicaRunning)
        left = await h.leftovers()
        assert len(left["units"]) == n and len(left["containers"]) == n, left
        for s in specs:
            assert isinstance(await second.stop(s.replica), ReplicaStopped)
    await assert_clean(h)


async def contract_exit_while_away_is_reported_on_adoption(h: Harness) -> None:
    first = h.runtime()
    # Not an immediate exit: the job must outlive the first runtime's start() (a job that
    # ends during the unit's start is reported by that start, with nobody away).
    s = spec(h, workload="batch", args=LATE_EXIT_4)
    async with serving(first):
        assert isinstance(await first.start(s), ReplicaRunning)
    # Let it end with nobody watching (the fake ends on its next look). Ended, not merely
    # no longer running: a unit still deactivating (ExecStop's `podman rm`, ExecStopPost)
    # would rightly be adopted as a replica that is stopping.
    with trio.fail_after(h.end_timeout_s):
        while True:
            snap = await first.machine.unit_snapshot((await h.leftovers())["units"][0])
            if unit_phase(snap) == "ended":
                break
            await trio.sleep(0.05)
    second = h.runtime()
    async with serving(second) as adopted:
        assert adopted == [], adopted
        events = drain(second)
        assert len(events) == 1 and isinstance(events[0], ReplicaExited), events
        assert events[0].exit_code == 4
    await assert_clean(h)


async def contract_cancelled_start_leaves_nothing_after_adoption(h: Harness) -> None:
    for i, delay in enumerate((0, 0.001, 0.01, 0.05, 0.2)):
        rt = h.runtime()
        with trio.move_on_after(delay):
            await rt.start(spec(h, workload="cancel", index=i))
        # Whatever got started is adopted by the next runtime and stopped.
        nxt = h.runtime()
        async with serving(nxt) as adopted:
            for r in adopted:
                await nxt.stop(r.replica)
        await assert_clean(h)


async def contract_orphans_are_removed_when_a_runtime_starts(h: Harness) -> None:
    orphan = "meshlet-orphan.test-gone-0-000000"
    await h.make_orphans(orphan)
    left = await h.leftovers()
    assert orphan in left["containers"] and f"{orphan}.x" in left["secrets"], left
    rt = h.runtime()
    async with serving(rt) as adopted:
        assert adopted == []
    await assert_clean(h)


async def contract_cpu_quota_is_the_workloads_once_running_and_after_adoption(
    h: Harness,
) -> None:
    s = spec(h, workload="quota", resources=Resources(milli_cpu=150, memory_mib=64, tasks=32))
    want = 150_000  # CPUQuotaPerSecUSec of 150 milli-CPU
    first = h.runtime()
    async with serving(first):
        running = await first.start(s)
        assert isinstance(running, ReplicaRunning), running
        # The unit started with the launch quota; once running it has the workload's.
        assert await first.machine.cpu_quota_usec(running.unit) == want
        # As if meshletd had died before the limit was set: the unit has its launch quota.
        launch = max(150, first.config.launch_milli_cpu) * 1000
        await first.machine.set_cpu_quota_usec(running.unit, launch)
    second = h.runtime()
    async with serving(second) as adopted:
        assert [r.replica for r in adopted] == [s.replica], adopted
        assert await second.machine.cpu_quota_usec(running.unit) == want
        assert isinstance(await second.stop(s.replica), ReplicaStopped)
    await assert_clean(h)


async def contract_two_lanes_of_a_slot_run_side_by_side(h: Harness) -> None:
    """A rolling update runs a slot's new version beside the old one (lane 1): two units,
    adopted apart after a restart, each stopped on its own (docs/protocol.md section 25)."""
    old = spec(h, workload="roll", index=0, revision="v1")
    new = replace(old, replica=replace(old.replica, lane=1), revision="v2")
    first = h.runtime()
    async with serving(first):
        a, b = await first.start(old), await first.start(new)
        assert isinstance(a, ReplicaRunning) and isinstance(b, ReplicaRunning), (a, b)
        assert a.unit != b.unit
    second = h.runtime()
    async with serving(second) as adopted:
        got = {(r.replica, r.revision) for r in adopted}
        assert got == {(old.replica, "v1"), (new.replica, "v2")}, got
        assert isinstance(await second.stop(old.replica), ReplicaStopped)
        left = await h.leftovers()
        assert left["containers"] == [b.unit.removesuffix(".service")], left
        assert isinstance(await second.stop(new.replica), ReplicaStopped)
    await assert_clean(h)


CONTRACT = [
    contract_start_then_stop_leaves_nothing,
    contract_exit_codes_are_reported,
    contract_oom_is_reported,
    contract_bad_specs_fail_clearly_and_leave_nothing,
    contract_starting_twice_runs_once,
    contract_restart_adopts_without_duplicates_or_orphans,
    contract_exit_while_away_is_reported_on_adoption,
    contract_cancelled_start_leaves_nothing_after_adoption,
    contract_orphans_are_removed_when_a_runtime_starts,
    contract_cpu_quota_is_the_workloads_once_running_and_after_adoption,
    contract_two_lanes_of_a_slot_run_side_by_side,
]


@dataclass
class FakeHarness:
    """The contract's harness over a `FakeMachine`."""

    machine: object
    image: str = "localhost/busybox:latest"
    oom_args: tuple[str, ...] = ("sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' x)")
    end_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self.machine.behave(self.oom_args, "oom")  # type: ignore[attr-defined]
        self.machine.behave(LATE_EXIT_4, "exit:4")  # type: ignore[attr-defined]

    def runtime(self) -> ReplicaRuntime:
        from meshletd.runtime.fake import fake_runtime

        return fake_runtime(self.machine)  # type: ignore[arg-type]

    async def leftovers(self) -> dict[str, list[str]]:
        return self.machine.leftovers()  # type: ignore[attr-defined,no-any-return]

    async def make_orphans(self, container: str) -> None:
        from meshletd.runtime.fake import FakeContainer
        from meshletd.runtime.units import LABEL

        m = self.machine
        m.containers[container] = FakeContainer(  # type: ignore[attr-defined]
            container, self.image, SLEEP, {LABEL: "orphan"}, {}
        )
        m.secrets[f"{container}.x"] = b"stale"  # type: ignore[attr-defined]
