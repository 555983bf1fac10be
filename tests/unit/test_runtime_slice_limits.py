"""The machine's contribution ([contribution] in meshlet.toml) is a hard cap on its slice."""

from __future__ import annotations

import trio

from meshletd.config import parse
from meshletd.runtime import FakeMachine, ReplicaRuntime, contribution_runtime_config
from meshletd.runtime.units import (
    INFINITY,
    RuntimeConfig,
    dropin_limit_keys,
    is_admin_dropin,
    slice_properties,
)

TOML = """
did = "did:plc:alicemesh"
owner = "did:plc:alice"
pds = "http://127.0.0.1:2583"
[contribution]
milli_cpu = 1500
memory_mib = 512
tasks_max = 300
max_replicas = 4
"""


def _serve_once(machine: FakeMachine, config: RuntimeConfig) -> ReplicaRuntime:
    runtime = ReplicaRuntime(machine, config)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return runtime


def test_the_slice_carries_the_configured_contribution() -> None:
    cfg = parse(TOML)
    machine = FakeMachine()
    _serve_once(machine, contribution_runtime_config(cfg.contribution))
    props = machine.slice_properties
    assert props is not None
    assert props["CPUQuotaPerSecUSec"] == 1_500_000
    assert props["MemoryMax"] == 512 << 20
    assert props["TasksMax"] == 300


def test_no_tasks_cap_configured_means_none_set() -> None:
    cfg = parse(TOML.replace("tasks_max = 300\n", ""))
    props = slice_properties(contribution_runtime_config(cfg.contribution))
    assert props["TasksMax"] == INFINITY
    assert props["MemoryMax"] == 512 << 20


def test_an_administrators_dropin_limit_is_never_overridden() -> None:
    cfg = parse(TOML)
    machine = FakeMachine(admin_slice_keys={"MemoryMax"})
    runtime = _serve_once(machine, contribution_runtime_config(cfg.contribution))
    props = machine.slice_properties
    assert props is not None
    assert "MemoryMax" not in props  # the admin's value holds
    assert props["CPUQuotaPerSecUSec"] == 1_500_000  # the rest is still capped
    assert runtime.admin_slice_keys == {"MemoryMax"}


def test_dropin_limit_keys_reads_the_slice_section() -> None:
    text = """
# admin: keep replicas small
[Unit]
Description=x
[Slice]
MemoryMax=2G
CPUQuota = 50%
TasksMax=
IOWeight=10
"""
    assert dropin_limit_keys(text) == {"MemoryMax", "CPUQuota"}
    assert dropin_limit_keys("[Unit]\nMemoryMax=1G\n") == set()


def test_runtime_settings_are_not_taken_for_an_administrators_dropin() -> None:
    assert is_admin_dropin("/etc/systemd/system/meshlet.slice.d/10-admin.conf")
    assert is_admin_dropin("/run/systemd/system/meshlet.slice.d/10-admin.conf")
    assert not is_admin_dropin("/run/systemd/system.control/meshlet.slice.d/50-MemoryMax.conf")
    assert not is_admin_dropin("/run/systemd/transient/meshlet.slice.d/50-Description.conf")


def test_the_slice_yields_cpu_to_the_hosts_own_services_unless_an_admin_says_otherwise() -> None:
    assert slice_properties(RuntimeConfig())["CPUWeight"] == 20
    assert "CPUWeight" not in slice_properties(RuntimeConfig(), {"CPUWeight"})
    assert dropin_limit_keys("[Slice]\nCPUWeight=500\n") == {"CPUWeight"}
