"""Image pulls from a real registry, checked INSIDE a booted systemd host (as root, like
meshletd): the runtime over systemd and rootless podman, the registry on the host's gateway.

    python tests/system/host_scripts/registry_checks.py CHECK ARG...

Each check exits 0; its last stdout line is a JSON object with what it saw.
tests/system/test_registry_pulls.py runs them through `dev/hostenv exec`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from meshletd.runtime import testing
from meshletd.runtime.events import ReplicaFailed, ReplicaPulling, ReplicaRunning, RuntimeEvent
from meshletd.runtime.reference import parse_image
from meshletd.runtime.registry import RegistryClient, auth_file
from meshletd.runtime.runtime import ReplicaRuntime
from meshletd.runtime.spec import ReplicaId, ReplicaSpec, Resources
from meshletd.runtime.systemd import SystemdPodmanMachine
from meshletd.runtime.units import RuntimeConfig

OWNER = "did:plc:registrycheck"
MESHLET_ENV = {"HOME": "/home/meshlet", "XDG_RUNTIME_DIR": "/run/user/1000"}


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    """podman as user meshlet (the replicas' storage)."""
    env = [f"{k}={v}" for k, v in MESHLET_ENV.items()]
    return sh("runuser", "-u", "meshlet", "--", "env", *env, "podman", *args)


def output(unit: str) -> str:
    inv = sh("systemctl", "show", unit, "-p", "InvocationID", "--value").stdout.strip()
    return sh("journalctl", "-o", "cat", "--no-pager", f"_SYSTEMD_INVOCATION_ID={inv}").stdout


def runtime(**config: object) -> ReplicaRuntime:
    # The test registry listens on the hosts' bridge gateway, a private (LAN) address: the
    # default grant (internet only) drops the replica user's traffic to it, and the
    # system.slice exemption for pulls does not hold inside nspawn hosts (docs/runtime.md,
    # "Tenants apart"), so these hosts lend with the `lan` grant, as a host whose registry
    # is on its LAN would.
    base = RuntimeConfig(poll_interval_s=0.2, network_grant="lan")
    machine = SystemdPodmanMachine.for_user(replace(base, **config))  # type: ignore[arg-type]
    return ReplicaRuntime(machine, machine.config)


def spec(image: str, workload: str, *, auth: bytes | None = None) -> ReplicaSpec:
    return ReplicaSpec(
        replica=ReplicaId(OWNER, workload, 0),
        owner_handle="registry.check",
        image=image,
        resources=Resources(milli_cpu=200, memory_mib=32, tasks=32),
        args=("sh", "-c", "cat /marker; sleep 600"),
        stop_timeout_s=2,
        pull_auth=auth,
    )


def drain(rt: ReplicaRuntime) -> list[RuntimeEvent]:
    out: list[RuntimeEvent] = []
    while True:
        try:
            out.append(rt.events.receive_nowait())
        except trio.WouldBlock:
            return out


def describe(result: object, events: list[RuntimeEvent], t: float) -> dict:
    pulling = [e for e in events if isinstance(e, ReplicaPulling)]
    got: dict = {
        "event": type(result).__name__,
        "seconds": round(t, 2),
        "progress": [e.message for e in pulling],
    }
    if isinstance(result, ReplicaFailed):
        got |= {"error": result.error, "message": result.message}
    if isinstance(result, ReplicaRunning):
        got |= {"pull_ms": result.pull_ms, "start_ms": result.start_ms, "unit": result.unit}
    return got


async def start_once(rt: ReplicaRuntime, s: ReplicaSpec, *, keep: bool = False) -> dict:
    """Start `s`; report how it went (and what it printed); stop it unless `keep`."""
    async with testing.serving(rt):
        t0 = time.monotonic()
        result = await rt.start(s)
        got = describe(result, drain(rt), time.monotonic() - t0)
        if isinstance(result, ReplicaRunning):
            with trio.fail_after(20):
                while not output(result.unit).strip():
                    await trio.sleep(0.1)
            got["printed"] = output(result.unit).strip().splitlines()[0]
            props = sh("systemctl", "show", result.unit, "--no-pager").stdout
            got["unit_properties"] = props
            if not keep:
                await rt.stop(s.replica)
    return got


async def leftovers() -> dict:
    """What replicas and pulls left, once systemd has collected ended podman-call units
    (it may take a moment on a loaded machine): polled for up to 10 s."""
    got = await _leftovers()
    for _ in range(50):
        if not any(got.values()):
            break
        await trio.sleep(0.2)
        got = await _leftovers()
    return got


async def _leftovers() -> dict:
    m = SystemdPodmanMachine.for_user(RuntimeConfig())
    calls = sh("systemctl", "list-units", "--all", "--no-legend", "meshletd-podman-*").stdout
    return {
        "state_dirs": await m.list_state_dirs(),
        "podman_call_units": calls.split(),
        "auth_files": sh("find", "/run/meshlet-replicas", "-name", "pull-auth.json").stdout.split(),
    }


# ---- checks -------------------------------------------------------------------------------


async def check_lend_lan() -> dict:
    """Load this host's network rules for the `lan` grant, as meshletd does at start: the
    registry is on the LAN, and an earlier test's runtime may have left the default grant
    (internet only) in force, which drops the pushes of user meshlet to it."""
    return {"applied": await runtime().apply_network_rules()}


async def check_resolve(ref: str, auth: str = "") -> dict:
    """What the owner's meshlet does at publish time: tag -> digest, from the registry."""
    client = RegistryClient()
    try:
        parsed = parse_image(ref)
        secret = auth_file(auth.encode(), parsed.registry) if auth else None
        remote = await client.inspect(parsed, auth=secret)
    finally:
        await client.aclose()
    return {"digest": remote.digest, "size_bytes": remote.size_bytes, "layers": remote.layers}


async def check_run_pinned(ref: str, digest: str, workload: str) -> dict:
    """A replica of `ref` pinned to `digest`, pulled first (the image is removed before)."""
    pinned = parse_image(ref).pinned(digest)
    podman("rmi", "-f", pinned)
    got = await start_once(runtime(), spec(pinned, workload))
    inspect = podman("image", "inspect", "--format", "{{.Digest}}", pinned)
    got["local_digest"] = inspect.stdout.strip()
    got.pop("unit_properties", None)
    got["left"] = await leftovers()
    return got


async def check_private(ref: str, user: str) -> dict:
    """A private image: refused without and with wrong credentials, pulled with the owner's.
    The password comes on stdin (an argument would be in the journal's record of this run)."""
    password = sys.stdin.readline().strip()
    registry = parse_image(ref).registry
    digest = (await check_resolve(ref, f"{user}:{password}"))["digest"]
    pinned = parse_image(ref).pinned(digest)
    podman("rmi", "-f", pinned)
    none = await start_once(runtime(), spec(pinned, "private-none"))
    wrong = auth_file(f"{user}:not-{password}".encode(), registry)
    bad = await start_once(runtime(), spec(pinned, "private-wrong", auth=wrong))
    good_auth = auth_file(f"{user}:{password}".encode(), registry)
    good = await start_once(runtime(), spec(pinned, "private-good", auth=good_auth))
    props = good.pop("unit_properties", "")
    journal = sh("journalctl", "--no-pager", "-o", "verbose", "-n", "20000").stdout
    leaks = [line for line in journal.splitlines() if password in line][:5]
    secret_b64 = json.loads(good_auth)["auths"][registry]["auth"]
    return {
        "without": none,
        "wrong": bad,
        "with": good,
        "password_in_unit": password in props or secret_b64 in props,
        "password_in_journal": password in journal or secret_b64 in journal,
        "leaks": leaks,
        "left": await leftovers(),
    }


async def check_not_found(open_addr: str) -> dict:
    missing_digest = f"{open_addr}/meshlet/app@sha256:{'0' * 64}"
    missing_repo = f"{open_addr}/meshlet/nothing@sha256:{'1' * 64}"
    a = await start_once(runtime(), spec(missing_digest, "missing-digest"))
    b = await start_once(runtime(), spec(missing_repo, "missing-repo"))
    return {"digest": a, "repository": b, "left": await leftovers()}


async def check_too_large(ref: str, digest: str, max_bytes: int) -> dict:
    pinned = parse_image(ref).pinned(digest)
    podman("rmi", "-f", pinned)
    got = await start_once(runtime(pull_max_bytes=max_bytes), spec(pinned, "too-large"))
    got["pulled"] = podman("image", "exists", pinned).returncode == 0
    got["left"] = await leftovers()
    return got


async def check_timeout(ref: str, digest: str, timeout_s: int) -> dict:
    pinned = parse_image(ref).pinned(digest)
    podman("rmi", "-f", pinned)
    got = await start_once(runtime(pull_timeout_s=timeout_s), spec(pinned, "slow"))
    await trio.sleep(1)  # the pull's unit is stopped as the runtime gives up
    got["left"] = await leftovers()
    return got


async def main(argv: list[str]) -> dict:
    name, *args = argv
    fn = globals()[f"check_{name}"]
    typed = [int(a) if a.isdigit() else a for a in args]
    return await fn(*typed)  # type: ignore[no-any-return]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    print(json.dumps(trio.run(main, sys.argv[1:])))
