"""Published ports and podman health checks in the runtime (docs/protocol.md, section 22;
docs/runtime.md)."""

from __future__ import annotations

import json

import pytest

from meshletd.runtime.events import ReplicaExited, ReplicaHealth, ReplicaRunning
from meshletd.runtime.fake import FakeMachine, fake_runtime
from meshletd.runtime.spec import HealthCheck, InvalidReplicaSpec, PortBinding, validate_spec
from meshletd.runtime.testing import FakeHarness, ended, serving, spec, wait_event
from meshletd.runtime.units import (
    RuntimeConfig,
    identity_from_environment,
    podman_run_argv,
    unit_properties,
)

PORTS = (
    PortBinding("http", "10.251.1.2", 20000, 8080),
    PortBinding("dns", "fd00::2", 20001, 53, "udp"),
)
CHECK = HealthCheck(("wget", "-q", "-O-", "http://127.0.0.1:8080/"), 5, 2, 2, 10)


def test_ports_are_published_on_the_chosen_address_and_host_port() -> None:
    h = FakeHarness(FakeMachine())
    argv = podman_run_argv(spec(h, ports=PORTS), RuntimeConfig(), "c")
    assert "--publish=10.251.1.2:20000:8080/tcp" in argv
    assert "--publish=[fd00::2]:20001:53/udp" in argv
    assert argv.index("--publish=10.251.1.2:20000:8080/tcp") < argv.index(h.image)


def test_the_health_check_is_podmans_in_exec_form_and_kills_an_unhealthy_container() -> None:
    h = FakeHarness(FakeMachine())
    argv = podman_run_argv(spec(h, health=CHECK), RuntimeConfig(), "c")
    cmd = next(a for a in argv if a.startswith("--health-cmd="))
    assert json.loads(cmd.removeprefix("--health-cmd=")) == list(CHECK.command)  # no shell
    for flag in (
        "--health-interval=5s",
        "--health-timeout=2s",
        "--health-retries=2",
        "--health-start-period=10s",
        "--health-on-failure=kill",
    ):
        assert flag in argv
    assert not [a for a in podman_run_argv(spec(h), RuntimeConfig(), "c") if "health" in a]


def test_the_unit_remembers_its_endpoints_and_check_for_the_next_meshletd() -> None:
    h = FakeHarness(FakeMachine())
    props = unit_properties(spec(h, ports=PORTS, health=CHECK), RuntimeConfig(), "u", "c")
    ident = identity_from_environment(props["Environment"])  # type: ignore[arg-type]
    assert ident is not None and ident.health_check
    assert ident.endpoints == (
        ("http", "10.251.1.2", 20000, "tcp"),
        ("dns", "fd00::2", 20001, "udp"),
    )


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"ports": (PortBinding("x", "not-an-ip", 1, 1),)}, "not an IP"),
        ({"ports": (PortBinding("x", "10.0.0.1", 0, 1),)}, "host_port"),
        ({"ports": PORTS, "network": "none"}, "without a network"),
        ({"health": HealthCheck(("CMD-SHELL", "true"))}, "CMD-SHELL"),
        ({"health": HealthCheck(("true",), interval_s=0)}, "interval_s"),
    ],
)
def test_a_spec_with_bad_ports_or_check_is_refused(kw: dict, why: str) -> None:
    h = FakeHarness(FakeMachine())
    with pytest.raises(InvalidReplicaSpec, match=why):
        validate_spec(spec(h, **kw))


async def test_the_runtime_reports_the_verdicts_and_an_unhealthy_end() -> None:
    h = FakeHarness(FakeMachine())
    rt = h.runtime()
    s = spec(h, ports=PORTS, health=CHECK)
    async with serving(rt):
        running = await rt.start(s)
        assert isinstance(running, ReplicaRunning)
        [status] = rt.replicas()
        assert status.endpoints == PORTS
        container = h.machine.containers[running.unit.removesuffix(".service")]
        container.health = "starting"
        ev = await wait_event(rt, lambda e: isinstance(e, ReplicaHealth), 5)
        assert isinstance(ev, ReplicaHealth) and ev.health == "starting"
        container.health = "healthy"
        ev = await wait_event(rt, lambda e: isinstance(e, ReplicaHealth), 5)
        assert isinstance(ev, ReplicaHealth) and ev.health == "healthy"
        container.health = "unhealthy"  # podman: --health-on-failure=kill
        h.machine.end(container.name, 137)
        ev = await wait_event(rt, ended(s.replica), 5)
    assert isinstance(ev, ReplicaExited) and (ev.exit_code, ev.health) == (137, "unhealthy")


async def test_an_adopted_replica_says_where_its_ports_are_and_how_healthy_it_is() -> None:
    h = FakeHarness(FakeMachine())
    rt = h.runtime()
    s = spec(h, ports=PORTS, health=CHECK)
    async with serving(rt):
        running = await rt.start(s)
        assert isinstance(running, ReplicaRunning)
    h.machine.containers[running.unit.removesuffix(".service")].health = "healthy"
    async with serving(fake_runtime(h.machine)) as adopted:
        assert [(p.name, p.address, p.host_port) for p in adopted[0].endpoints] == [
            ("http", "10.251.1.2", 20000),
            ("dns", "fd00::2", 20001),
        ]
        assert adopted[0].health == "healthy"
