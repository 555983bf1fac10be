"""The replica lifecycle on the in-memory machine: the steps, their undo, the watcher."""

from __future__ import annotations

import trio

from meshletd.runtime.events import (
    ReplicaExited,
    ReplicaFailed,
    ReplicaRunning,
    ReplicaStarting,
    ReplicaStopped,
)
from meshletd.runtime.fake import FakeMachine, fake_runtime
from meshletd.runtime.machine import MachineError
from meshletd.runtime.outcome import UnitSnapshot
from meshletd.runtime.spec import Resources, Secret
from meshletd.runtime.testing import FakeHarness, drain, ended, serving, spec, wait_event


def harness() -> FakeHarness:
    return FakeHarness(FakeMachine())


async def test_secrets_reach_the_container_and_are_removed_with_the_replica() -> None:
    h = harness()
    rt = h.runtime()
    s = spec(h, secrets=(Secret("db", b"pa55"), Secret("token", b"t0k", env="TOKEN")))
    async with serving(rt):
        running = await rt.start(s)
        assert isinstance(running, ReplicaRunning)
        container = h.machine.containers[running.unit.removesuffix(".service")]
        assert sorted(container.secrets.values()) == [b"pa55", b"t0k"]
        assert b"pa55" not in repr(h.machine.units).encode()
        await rt.stop(s.replica)
    assert h.machine.secrets == {}


async def test_a_missing_image_is_pulled_first_and_the_pull_is_timed_apart() -> None:
    h = harness()
    h.machine.pullable.add("registry.test/app:1")
    rt = h.runtime()
    async with serving(rt):
        running = await rt.start(spec(h, image="registry.test/app:1"))
        assert isinstance(running, ReplicaRunning)
        assert running.pull_ms >= 0 and running.start_ms >= 0
        assert "registry.test/app:1" in h.machine.images


async def test_a_failing_secret_step_undoes_the_earlier_steps() -> None:
    h = harness()
    rt = h.runtime()

    async def broken(name: str, data: bytes) -> None:
        if name.endswith(".second"):
            raise MachineError("podman secret create: disk full")
        h.machine.secrets[name] = data

    h.machine.create_secret = broken  # type: ignore[method-assign]
    s = spec(h, secrets=(Secret("first", b"1"), Secret("second", b"2")))
    result = await rt.start(s)
    assert isinstance(result, ReplicaFailed) and "disk full" in result.message
    assert h.machine.leftovers() == {"units": [], "containers": [], "secrets": [], "state_dirs": []}


async def test_a_unit_whose_podman_fails_is_reported_failed_with_the_journal_hint() -> None:
    h = harness()
    rt = h.runtime()

    async def vanished(image: str) -> bool:  # present when checked, gone when the unit runs
        return True

    h.machine.image_present = vanished  # type: ignore[method-assign]
    result = await rt.start(spec(h, image="localhost/gone:latest"))
    assert isinstance(result, ReplicaFailed) and result.error == "UnitStartFailed"
    assert "125" in result.message and "journalctl -u" in result.message
    assert all(not v for v in h.machine.leftovers().values())


async def test_a_job_reports_starting_running_then_its_exit_with_usage() -> None:
    h = harness()
    rt = h.runtime()
    s = spec(h, workload="job", args=("sh", "-c", "exit 0"))
    async with serving(rt):
        await rt.start(s)
        seen: list = []
        await wait_event(rt, ended(s.replica), 5, seen)
    kinds = [type(e) for e in [*drain(rt), *seen]]
    assert kinds[:2] == [ReplicaStarting, ReplicaRunning] and kinds[-1] is ReplicaExited
    assert isinstance(seen[-1], ReplicaExited) and seen[-1].usage.peak_memory_bytes > 0


async def test_the_watcher_survives_a_systemd_hiccup() -> None:
    h = harness()
    rt = h.runtime()
    real = h.machine.unit_snapshot
    calls = 0

    async def flaky(unit: str) -> UnitSnapshot:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise MachineError("systemd: connection reset")
        return await real(unit)

    s = spec(h, workload="job", args=("sh", "-c", "exit 5"))
    async with serving(rt):
        await rt.start(s)
        h.machine.unit_snapshot = flaky  # type: ignore[method-assign]
        ev = await wait_event(rt, ended(s.replica), 5)
    assert isinstance(ev, ReplicaExited) and ev.exit_code == 5


async def test_cancelling_serve_leaves_replicas_running_for_the_next_meshletd() -> None:
    h = harness()
    rt = h.runtime()
    s = spec(h, revision="bafyrev")
    async with serving(rt):
        await rt.start(s)
    assert len(h.machine.containers) == 1
    nxt = fake_runtime(h.machine)
    async with serving(nxt) as adopted:
        assert [(r.replica, r.revision) for r in adopted] == [(s.replica, "bafyrev")]
        assert isinstance(await nxt.stop(s.replica), ReplicaStopped)
    with trio.fail_after(1):
        assert all(not v for v in h.machine.leftovers().values())


class _CancelAtCall:
    """Wraps a FakeMachine; cancels `scope` at the n-th machine call (shutdown mid-start)."""

    def __init__(self, machine: FakeMachine, n: int, scope: trio.CancelScope) -> None:
        self._machine, self._n, self._scope, self.calls = machine, n, scope, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        target = getattr(self._machine, name)
        if not callable(target) or name.startswith("_"):
            return target

        async def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == self._n:
                self._scope.cancel()
                await trio.lowlevel.checkpoint()
            return await target(*args, **kwargs)

        return call


async def test_a_start_cancelled_at_any_step_leaves_nothing_once_adopted_and_stopped() -> None:
    from meshletd.runtime.runtime import ReplicaRuntime
    from meshletd.runtime.units import RuntimeConfig

    n = 1
    while True:
        machine = FakeMachine()
        h = FakeHarness(machine)
        s = spec(h, secrets=(Secret("a", b"1"), Secret("b", b"2")))
        with trio.CancelScope() as scope:
            wrapped = _CancelAtCall(machine, n, scope)
            rt = ReplicaRuntime(wrapped, RuntimeConfig())  # type: ignore[arg-type]
            await rt.start(s)
        if not scope.cancelled_caught:
            break  # n is past the last call of start(): every step has been tried
        nxt = fake_runtime(machine)
        async with serving(nxt) as adopted:
            for r in adopted:
                await nxt.stop(r.replica)
        assert all(not v for v in machine.leftovers().values()), (n, machine.leftovers())
        n += 1
    assert n > 8, n  # start() really went through its steps


async def test_adoption_recreates_a_state_dir_that_vanished_with_the_old_daemon() -> None:
    h = harness()
    s = spec(h)
    first = h.runtime()
    async with serving(first):
        await first.start(s)
    h.machine.state_dirs.clear()  # /run cleaned while meshletd was away
    nxt = h.runtime()
    async with serving(nxt) as adopted:
        assert len(adopted) == 1
        assert len(h.machine.state_dirs) == 1
        await nxt.stop(s.replica)


async def test_a_unit_that_cannot_set_its_cpu_quota_is_reported_failed_and_leaves_nothing() -> None:
    h = harness()
    h.machine.start_post_fails = True
    rt = h.runtime()
    async with serving(rt):
        failed = await rt.start(spec(h))
        assert isinstance(failed, ReplicaFailed), failed
        assert "CPU quota could not be set" in failed.message
    assert h.machine.leftovers() == {"units": [], "containers": [], "secrets": [], "state_dirs": []}


async def test_an_adopted_replica_whose_quota_cannot_be_set_again_is_stopped() -> None:
    h = harness()
    first = h.runtime()
    s = spec(h)
    async with serving(first):
        running = await first.start(s)
        assert isinstance(running, ReplicaRunning)
    h.machine.units[running.unit].properties["CPUQuotaPerSecUSec"] = 2_000_000  # never set
    h.machine.set_quota_fails = True
    second = h.runtime()
    async with serving(second) as adopted:
        assert adopted == []
        events = drain(second)
        assert len(events) == 1 and isinstance(events[0], ReplicaFailed), events
        assert "CPU quota of 500 milli-CPU could not be set" in events[0].message
    assert h.machine.leftovers() == {"units": [], "containers": [], "secrets": [], "state_dirs": []}


async def test_the_watcher_sets_a_cpu_quota_again_that_systemd_lost_while_it_ran() -> None:
    # As after `systemctl daemon-reload`: systemd 252 re-reads CPUQuota= in whole percent.
    h = harness()
    rt = h.runtime()
    s = spec(h, resources=Resources(milli_cpu=15, memory_mib=64, tasks=32))
    async with serving(rt):
        running = await rt.start(s)
        assert isinstance(running, ReplicaRunning)
        props = h.machine.units[running.unit].properties
        assert props["CPUQuotaPerSecUSec"] == 15_000
        props["CPUQuotaPerSecUSec"] = 10_000
        await rt.poll()
        assert props["CPUQuotaPerSecUSec"] == 15_000
        assert [type(e) for e in drain(rt)] == [ReplicaStarting, ReplicaRunning]
