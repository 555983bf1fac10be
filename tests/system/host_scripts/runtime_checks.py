"""Runtime checks that run INSIDE a booted systemd host (as root, like meshletd).

    python tests/system/host_scripts/runtime_checks.py CHECK

Each check exits 0 on success; its last stdout line is a JSON object with what it measured.
tests/system/test_runtime_*.py runs them through `dev/hostenv exec`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from meshletd.runtime import testing
from meshletd.runtime.events import EndEvent, ReplicaOomKilled, ReplicaRunning, ReplicaStopped
from meshletd.runtime.naming import UNIT_PATTERN, UNIT_PREFIX
from meshletd.runtime.runtime import ReplicaRuntime
from meshletd.runtime.spec import Resources, Secret
from meshletd.runtime.systemd import SystemdPodmanMachine
from meshletd.runtime.units import LABEL, RuntimeConfig, identity_from_environment

IMAGE = "localhost/busybox:latest"
OOM_ARGS = ("sh", "-c", "echo hog; x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived")


@dataclass
class RealHarness:
    image: str = IMAGE
    oom_args: tuple[str, ...] = OOM_ARGS
    end_timeout_s: float = 60.0
    config: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(poll_interval_s=0.2))

    def machine(self) -> SystemdPodmanMachine:
        return SystemdPodmanMachine.for_user(self.config)

    def runtime(self) -> ReplicaRuntime:
        m = self.machine()
        return ReplicaRuntime(m, m.config)

    async def make_orphans(self, container: str) -> None:
        m = self.machine()
        await m._podman(
            "run",
            "-d",
            "--name",
            container,
            "--label",
            f"{LABEL}=orphan",
            self.image,
            "sleep",
            "600",
        )
        await m.create_secret(f"{container}.x", b"stale")

    async def leftovers(self) -> dict[str, list[str]]:
        m = self.machine()
        units = []
        for unit in await m.list_units(UNIT_PATTERN):
            snap = await m.unit_snapshot(unit)
            if identity_from_environment(snap.environment) is not None:
                units.append(f"{unit}")
        return {
            "units": units,
            "containers": await m.list_containers(LABEL),
            "secrets": await m.list_secrets(UNIT_PREFIX),
            "state_dirs": await m.list_state_dirs(),
        }


H = RealHarness()


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def show(unit: str, prop: str) -> str:
    return sh("systemctl", "show", unit, "-p", prop, "--value").strip()


def journal(unit: str) -> str:
    return sh("journalctl", "-u", unit, "-o", "cat", "--no-pager")


def output(unit: str) -> str:
    """What the unit's current run printed (its container's stdout and stderr)."""
    invocation = show(unit, "InvocationID")
    return sh("journalctl", "-o", "cat", "--no-pager", f"_SYSTEMD_INVOCATION_ID={invocation}")


async def wait_for(pred, timeout_s: float, what: str) -> None:
    with trio.fail_after(timeout_s):
        while not pred():
            await trio.sleep(0.1)
    _ = what


# ---- checks -------------------------------------------------------------------------------


async def check_contract(name: str) -> dict:
    fn = getattr(testing, f"contract_{name}")
    t0 = time.monotonic()
    await fn(H)
    return {"contract": name, "seconds": round(time.monotonic() - t0, 2)}


async def check_limits() -> dict:
    """CPU held to its quota (measured), fork refused at TasksMax, OOM kill reported."""
    out: dict = {}
    rt = H.runtime()
    async with testing.serving(rt):
        # CPU: a busy loop with 200 milli-CPU.
        cpu = testing.spec(
            H,
            workload="cpu",
            args=("sh", "-c", "while :; do :; done"),
            resources=Resources(milli_cpu=200, memory_mib=32, tasks=8),
        )
        r = await rt.start(cpu)
        assert isinstance(r, ReplicaRunning), r
        # The kernel's figure, read the moment it runs (it started at the launch quota).
        cfs = sh(
            "sh",
            "-c",
            f"cat /sys/fs/cgroup/cpu*/meshlet.slice/{r.unit}/cpu.cfs_quota_us "
            f"/sys/fs/cgroup/meshlet.slice/{r.unit}/cpu.max 2>/dev/null | head -1",
        )
        out["cfs_quota_at_running"] = cfs.strip()
        await trio.sleep(1.0)
        u0, t0 = await rt.usage(cpu.replica), time.monotonic()
        await trio.sleep(5.0)
        u1, t1 = await rt.usage(cpu.replica), time.monotonic()
        frac = (u1.cpu_ms - u0.cpu_ms) / 1000 / (t1 - t0)
        out["cpu_quota"] = 0.2
        out["cpu_measured"] = round(frac, 3)
        assert 0.15 <= frac <= 0.23, f"busy loop used {frac:.3f} CPU with a 0.2 quota"
        await rt.stop(cpu.replica)

        # Tasks: fork until refused.
        forks = testing.spec(
            H,
            workload="forks",
            args=(
                "sh",
                "-c",
                # busybox sh exits when a fork fails: fork in a subshell, then exec.
                "(i=0; while [ $i -lt 2000 ]; do sleep 1000 & i=$((i+1)); done); "
                "echo forks-done; exec sleep 1000",
            ),
            resources=Resources(milli_cpu=500, memory_mib=64, tasks=8),
        )
        r = await rt.start(forks)
        assert isinstance(r, ReplicaRunning), r
        tasks_max = int(show(r.unit, "TasksMax"))
        await wait_for(lambda: "forks-done" in output(r.unit), 60, "forks-done")
        current = int(show(r.unit, "TasksCurrent"))
        refused = [ln for ln in output(r.unit).splitlines() if "can't fork" in ln]
        out.update(
            tasks_max=tasks_max,
            tasks_current=current,
            fork_errors=len(refused),
            fork_error_sample=refused[:1],
        )
        # At the refused fork the unit was full; podman's start-up threads may have gone since.
        assert tasks_max // 2 <= current <= tasks_max, (current, tasks_max)
        assert refused, output(r.unit)[-2000:]
        await rt.stop(forks.replica)

        # Memory: allocate past MemoryMax.
        hog = testing.spec(
            H,
            workload="hog",
            args=OOM_ARGS,
            resources=Resources(milli_cpu=1000, memory_mib=32, tasks=8),
        )
        t = time.monotonic()
        r = await rt.start(hog)
        unit = r.unit
        ev = await testing.wait_event(
            rt, lambda e: isinstance(e, EndEvent) and e.replica == hog.replica, 60
        )
        assert isinstance(ev, ReplicaOomKilled), ev
        out.update(
            oom_event=type(ev).__name__,
            oom_after_s=round(time.monotonic() - t, 2),
            oom_memory_max=(32 + H.config.memory_overhead_mib) << 20,
            oom_peak_bytes=ev.usage.peak_memory_bytes,
        )
        assert "survived" not in journal(unit)
    await testing.assert_clean(H)
    return out


async def check_journal_once_and_secrets() -> dict:
    rt = H.runtime()
    marker = f"marker-{os.getpid()}-{time.time_ns()}"
    async with testing.serving(rt):
        s = testing.spec(
            H,
            workload="logs",
            args=(
                "sh",
                "-c",
                f"echo {marker}; echo {marker}-err >&2; "
                "echo file=$(cat /run/secrets/db); echo env=$API_TOKEN; "
                "touch /probe 2>/dev/null && echo rootfs-writable || echo rootfs-read-only; "
                "grep CapEff /proc/self/status; sleep 3600",
            ),
            secrets=(Secret("db", b"pa55-file"), Secret("token", b"t0ken-env", env="API_TOKEN")),
        )
        r = await rt.start(s)
        assert isinstance(r, ReplicaRunning), r
        await wait_for(lambda: "CapEff" in journal(r.unit), 30, "output")
        await trio.sleep(1.5)  # a duplicate from a second log path would arrive by now
        text = journal(r.unit)
        lines = text.splitlines()
        assert lines.count(marker) == 1 and lines.count(f"{marker}-err") == 1, text
        assert "file=pa55-file" in lines and "env=t0ken-env" in lines, text
        assert "rootfs-read-only" in lines, text
        cap = next(ln for ln in lines if ln.startswith("CapEff"))
        assert cap.split()[1].strip("0") == "", cap  # no capabilities at all
        unit_text = sh("systemctl", "show", r.unit, "-p", "Environment,ExecStart")
        ps = sh("ps", "-eo", "args")
        for secret in ("pa55-file", "t0ken-env"):
            assert secret not in unit_text and secret not in ps, secret
        ident = sh("journalctl", "-u", r.unit, "-o", "json", "--no-pager", "-g", marker)
        syslog_id = json.loads(ident.splitlines()[0])["SYSLOG_IDENTIFIER"]
        stopped = await rt.stop(s.replica)
        assert isinstance(stopped, ReplicaStopped)
    await testing.assert_clean(H)
    return {
        "journal_lines_per_output_line": 1,
        "syslog_identifier": syslog_id,
        "secret_in_unit_or_cmdline": False,
    }


async def _child_start(n: int) -> None:
    rt = H.runtime()
    async with testing.serving(rt):
        for i in range(n):
            r = await rt.start(testing.spec(H, workload="svc", index=i))
            assert isinstance(r, ReplicaRunning), r
        print("ready", flush=True)
        await trio.sleep_forever()


async def check_adopt_after_sigkill(n: int = 5) -> dict:
    child = subprocess.Popen(
        [sys.executable, __file__, "_child_start", str(n)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = await trio.to_thread.run_sync(child.stdout.readline)
    assert line.strip() == "ready", line
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = await H.leftovers()
    assert len(before["units"]) == n and len(before["containers"]) == n, before
    rt = H.runtime()
    t = time.monotonic()
    async with testing.serving(rt) as adopted:
        adopt_s = time.monotonic() - t
        assert len(adopted) == n, adopted
        events = testing.drain(rt)
        assert len(events) == n and all(
            isinstance(e, ReplicaRunning) and e.adopted for e in events
        ), events
        for i in range(n):
            r = await rt.start(testing.spec(H, workload="svc", index=i))
            assert isinstance(r, ReplicaRunning), r
        after = await H.leftovers()
        assert after == before, (before, after)
        failed = sh("systemctl", "list-units", "--failed", "--no-legend", "--plain", UNIT_PATTERN)
        assert failed.strip() == "", failed
        for r in adopted:
            container = r.unit.removesuffix(".service")
            stopped = await rt.stop(r.replica)
            assert isinstance(stopped, ReplicaStopped)
            assert container not in (await H.leftovers())["containers"]
    await testing.assert_clean(H)
    return {
        "replicas": n,
        "adopted": len(adopted),
        "adopt_s": round(adopt_s, 3),
        "duplicates": 0,
        "orphans": 0,
    }


async def check_stress(n: int = 12) -> dict:
    """Start and stop n sleeping replicas; every start must reach running."""
    rt = H.runtime()
    bad = []
    async with testing.serving(rt):
        for i in range(n):
            r = await rt.start(testing.spec(H, workload="stress", index=i))
            if not isinstance(r, ReplicaRunning):
                bad.append(repr(r))
        for i in range(n):
            await rt.stop(testing.spec(H, workload="stress", index=i).replica)
    assert not bad, bad
    await testing.assert_clean(H)
    return {"started": n}


async def check_cpu_quota_failure() -> dict:
    """A unit whose ExecStartPost cannot set the CPU quota never runs unlimited."""
    broken = RealHarness(config=replace(H.config, systemctl="/bin/false"))
    rt = broken.runtime()
    s = testing.spec(broken, workload="unlimited", args=("sleep", "600"))
    async with testing.serving(rt):
        result = await rt.start(s)
    await testing.assert_clean(H)
    return {"event": type(result).__name__, "message": getattr(result, "message", "")}


async def check_cpu_quota_after_daemon_reload() -> dict:
    """systemd 252 re-reads a transient unit's CPUQuota= in whole percent on daemon-reload;
    the watcher sets the workload's exact quota again."""
    rt = H.runtime()
    out: dict = {}
    async with testing.serving(rt):
        started = []
        for i, milli in enumerate((5, 15, 250)):
            s = testing.spec(
                H, workload="reload", index=i, resources=Resources(milli, 64, tasks=32)
            )
            r = await rt.start(s)
            assert isinstance(r, ReplicaRunning), r
            started.append((s, r.unit))
        sh("systemctl", "daemon-reload")
        out["after_reload"] = [await rt.machine.cpu_quota_usec(u) for _, u in started]
        await trio.sleep(3 * H.config.poll_interval_s + 0.5)
        out["after_a_poll"] = [await rt.machine.cpu_quota_usec(u) for _, u in started]
        for s, _ in started:
            await rt.stop(s.replica)
    await testing.assert_clean(H)
    return out


async def check_slice_cap() -> dict:
    """The machine's cap: two full-CPU busy replicas share a 300 milli-CPU slice."""
    capped = RealHarness(config=replace(H.config, slice_milli_cpu=300, slice_memory_mib=512))
    rt = capped.runtime()
    busy = ("sh", "-c", "while :; do :; done")
    specs = [
        testing.spec(
            capped,
            workload="capped",
            index=i,
            args=busy,
            resources=Resources(milli_cpu=1000, memory_mib=32, tasks=8),
        )
        for i in range(2)
    ]
    try:
        async with testing.serving(rt):
            shown = sh("systemctl", "show", "meshlet.slice", "-p", "CPUQuotaPerSecUSec,MemoryMax")
            for s in specs:
                assert isinstance(await rt.start(s), ReplicaRunning)
            await trio.sleep(1.0)
            u0 = [await rt.usage(s.replica) for s in specs]
            t0 = time.monotonic()
            await trio.sleep(5.0)
            u1 = [await rt.usage(s.replica) for s in specs]
            wall = time.monotonic() - t0
            total = sum(b.cpu_ms - a.cpu_ms for a, b in zip(u0, u1, strict=True)) / 1000 / wall
            for s in specs:
                await rt.stop(s.replica)
    finally:
        # Lift the cap again for the other checks.
        uncapped = H.runtime()
        async with testing.serving(uncapped):
            pass
    assert "CPUQuotaPerSecUSec=300ms" in shown and "MemoryMax=536870912" in shown, shown
    assert total <= 0.33, f"two busy replicas used {total:.3f} CPU under a 0.3 cap"
    await testing.assert_clean(H)
    return {"slice_cap": 0.3, "measured_total": round(total, 3), "shown": shown.split()}


async def check_slice_contribution() -> dict:
    """[contribution] caps the slice; an admin drop-in survives a start; a hog is held inside."""
    from meshletd.config import parse
    from meshletd.runtime import contribution_runtime_config

    cfg = parse(
        'did = "did:plc:limitsmesh"\nowner = "did:plc:limits"\npds = "http://127.0.0.1:1"\n'
        "[contribution]\nmilli_cpu = 700\nmemory_mib = 160\ntasks_max = 500\n"
    )
    config = replace(contribution_runtime_config(cfg.contribution), poll_interval_s=0.2)
    capped = RealHarness(config=config)
    dropin = Path("/etc/systemd/system/meshlet.slice.d/50-admin-limits-test.conf")
    props = "CPUQuotaPerSecUSec,MemoryMax,TasksMax"
    out: dict = {}
    # Something of the host's, outside the slice, that a runaway replica must not touch.
    bystander = "limits-bystander.service"
    sh("systemd-run", "--unit", bystander, "--collect", "sleep", "600")
    try:
        rt = capped.runtime()
        async with testing.serving(rt):
            out["shown"] = sh("systemctl", "show", "meshlet.slice", "-p", props).split()
            hog = testing.spec(
                capped,
                workload="slicehog",
                args=OOM_ARGS,  # ~200 MB and more: past the slice's 160 MiB
                # The unit alone would allow 1 GiB + overhead: only the slice can stop it.
                resources=Resources(milli_cpu=500, memory_mib=1024, tasks=8),
            )
            r = await rt.start(hog)
            ev = await testing.wait_event(
                rt, lambda e: isinstance(e, EndEvent) and e.replica == hog.replica, 90
            )
            out["hog_event"] = type(ev).__name__
            out["hog_peak_bytes"] = ev.usage.peak_memory_bytes if ev.usage else None
            out["hog_survived"] = "survived" in journal(r.unit)
        out["bystander"] = show(bystander, "ActiveState")
        out["host"] = sh("systemctl", "is-system-running").strip()

        # The administrator lowers TasksMax in a drop-in; the next start keeps it.
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Slice]\nTasksMax=321\n")
        sh("systemctl", "daemon-reload")
        rt = capped.runtime()
        async with testing.serving(rt):
            out["shown_with_dropin"] = sh("systemctl", "show", "meshlet.slice", "-p", props).split()
            out["admin_keys"] = sorted(rt.admin_slice_keys)
    finally:
        dropin.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "stop", bystander)
        uncapped = H.runtime()  # lift the caps again for the other checks
        async with testing.serving(uncapped):
            pass
    await testing.assert_clean(H)
    return out


async def check_user_manager() -> dict:
    """The fallback: replicas as units of meshlet's own user manager (user@1000.service)."""
    user = RealHarness(config=replace(H.config, manager="user"))
    done = []
    for name in (
        "start_then_stop_leaves_nothing",
        "exit_codes_are_reported",
        "bad_specs_fail_clearly_and_leave_nothing",
        "restart_adopts_without_duplicates_or_orphans",
        "exit_while_away_is_reported_on_adoption",
    ):
        await getattr(testing, f"contract_{name}")(user)
        done.append(name)
    rt = user.runtime()
    marker = f"user-marker-{time.time_ns()}"
    async with testing.serving(rt):
        s = testing.spec(user, workload="ulogs", args=("sh", "-c", f"echo {marker}; sleep 600"))
        r = await rt.start(s)
        assert isinstance(r, ReplicaRunning), r

        def user_journal() -> str:
            return sh("journalctl", "-o", "cat", "--no-pager", f"_SYSTEMD_USER_UNIT={r.unit}")

        await wait_for(lambda: marker in user_journal(), 30, "user journal")
        await trio.sleep(1.0)
        once = user_journal().splitlines().count(marker) == 1
        cgroup = sh("systemctl", "--user", "-M", "meshlet@", "show", r.unit, "-p", "ControlGroup")
        await rt.stop(s.replica)
    assert once
    await testing.assert_clean(user)
    return {"contract_in_user_manager": done, "journal_once": once, "cgroup": cgroup.strip()}


async def check_start_job_wait() -> dict:
    """`wait_started` returns when systemd ends the unit's start job (JobRemoved), on the
    system manager and on a user manager: not before the unit is active, at once for a
    unit that failed or does not exist, and after its timeout for one still starting."""
    out: dict = {}
    for manager in ("system", "user"):
        m = RealHarness(config=replace(H.config, manager=manager)).machine()

        def notify_unit(delay_s: float) -> dict[str, object]:
            script = f"sleep {delay_s}; systemd-notify --ready; exec sleep 600"
            return {
                "Type": "notify",
                "NotifyAccess": "all",
                "ExecStart": [("/bin/sh", ["/bin/sh", "-c", script], False)],
            }

        got: dict = {}
        units = [f"jobwait-{manager}-{k}-{os.getpid()}.service" for k in ("ready", "fail", "slow")]
        ready, fail, slow = units
        try:
            await m.start_unit(ready, notify_unit(0.6))
            t = time.monotonic()
            ticks = 0

            async def tick() -> None:  # the rest of the daemon, meanwhile
                nonlocal ticks
                while True:
                    await trio.sleep(0.01)
                    ticks += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                await m.wait_started(ready, 10)
                nursery.cancel_scope.cancel()
            got["ready_waited_s"] = round(time.monotonic() - t, 2)
            got["ticks_while_waiting"] = ticks
            got["ready_state"] = (await m.unit_snapshot(ready)).active_state
            await m.start_unit(
                fail, {**notify_unit(0), "ExecStart": [("/bin/false", ["/bin/false"], False)]}
            )
            t = time.monotonic()
            await m.wait_started(fail, 10)
            got["fail_waited_s"] = round(time.monotonic() - t, 2)
            got["fail_state"] = (await m.unit_snapshot(fail)).active_state
            await m.start_unit(slow, notify_unit(5))
            t = time.monotonic()
            await m.wait_started(slow, 0.5)
            got["slow_waited_s"] = round(time.monotonic() - t, 2)
            got["slow_state"] = (await m.unit_snapshot(slow)).active_state
            t = time.monotonic()
            await m.wait_started("jobwait-no-such.service", 10)
            got["missing_waited_s"] = round(time.monotonic() - t, 2)
        finally:
            for unit in units:
                with contextlib.suppress(Exception):
                    await m.stop_unit(unit)
                with contextlib.suppress(Exception):
                    await m.reset_failed(unit)
        out[manager] = got
    return out


async def check_cleanup() -> dict:
    """Adopt whatever replicas a failed run left and stop them."""
    rt = H.runtime()
    async with testing.serving(rt) as adopted:
        for r in adopted:
            await rt.stop(r.replica)
    testing.drain(rt)
    return {"stopped": len(adopted), "left": await H.leftovers()}


async def main(argv: list[str]) -> dict:
    name = argv[0]
    if name == "_child_start":
        await _child_start(int(argv[1]))
        return {}
    if name.startswith("contract:"):
        return await check_contract(name.split(":", 1)[1])
    return await globals()[f"check_{name}"](*(int(a) for a in argv[1:]))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    result = trio.run(main, sys.argv[1:])
    print(json.dumps(result))
