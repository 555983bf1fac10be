"""Pause and rolling updates on a real commune (issue 18, "Updates and pause"): three
meshlets, each meshletd on its own booted systemd host, one module-scoped commune.

- `meshletctl pause` stops a workload's replicas and keeps their slots; `resume` starts
  them again on the same meshlets (docs/protocol.md, section 10);
- `meshletctl update NAME --image ...` rolls the replicas to the new version one slot at
  a time, make-before-break (the container of one slot changes, then the other's; never
  both down), and a version that cannot start is rolled back with the reason shown
  (docs/protocol.md, section 21).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.commune import Commune, Meshlet, wait_for
from tests.system.hostenv import host_kind, nspawn_available
from tests.system.test_commune_e2e import agreed_placement, find, publish

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
)

TICKER = ["sh", "-c", 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 1; done']
PLACED_S = 45  # bid window + settle + image check + unit start, on 2 busy cores


@pytest.fixture(scope="module")
def commune(devnet: Any) -> Iterator[Commune]:
    if not nspawn_available():
        pytest.fail("the commune needs root and systemd-nspawn (dev/test installs it)", False)
    c = Commune.up(devnet)
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def formed(commune: Commune) -> None:
    for m in commune:
        wait_for(
            lambda m=m: m.ctl_json("status")["members"] == 2,
            60,
            f"{m.person}'s meshletd to verify the other two",
        )


def containers(commune: Commune, uri: str) -> dict[str, list[tuple[str, str]]]:
    """person -> [(container name, container id)] of the workload's running containers."""
    rkey = uri.rsplit("/", 1)[1]
    out: dict[str, list[tuple[str, str]]] = {}
    for m in commune:
        done = m.host.run("podman", "ps", "--format", "{{.Names}} {{.ID}}", user="meshlet")
        rows = [tuple(line.split()) for line in done.stdout.splitlines() if rkey in line]
        out[m.person] = sorted((str(r[0]), str(r[1])) for r in rows if len(r) == 2)
    return out


def placed_units(commune: Commune, uri: str) -> dict[str, list[str]]:
    rkey = uri.rsplit("/", 1)[1]
    return {m.person: [u for u in m.replica_units() if rkey in u] for m in commune}


def slot_states(m: Meshlet, name: str) -> dict[int, tuple[str, str]]:
    view = find(m, name) or {}
    return {
        int(r["slot"]): (r.get("meshletDid", ""), r.get("state", ""))
        for r in view.get("running", [])
        if r.get("meshletDid")
    }


def test_a_paused_workload_stops_its_replicas_keeps_its_slots_and_resumes_where_it_was(
    commune: Commune, formed: None
) -> None:
    alice = commune["alice"]
    uri = publish(alice, TICKER, "--name", "sleeper", "--replicas", "2", "--cpu", "100",
                  "--memory", "32")
    before = wait_for(
        lambda: agreed_placement(commune, "sleeper", 2), PLACED_S, "sleeper placed and running"
    )
    first = containers(commune, uri)
    assert sum(len(v) for v in first.values()) == 2, first

    done = alice.ctl("pause", "sleeper")
    assert done.returncode == 0, done.stdout + done.stderr

    def all_paused() -> dict[int, tuple[str, str]] | None:
        for m in commune:
            got = slot_states(m, "sleeper")
            if sorted(got) != [0, 1] or any(st != "paused" for _, st in got.values()):
                return None
        return slot_states(alice, "sleeper")

    paused = wait_for(all_paused, 60, "every meshlet to report both slots paused")
    # the slots stay where they were
    assert {s: d for s, (d, _) in paused.items()} == before
    # nothing of it runs anywhere: no unit, no container
    wait_for(
        lambda: not any(placed_units(commune, uri).values()), 30, "the replica units to stop"
    )
    assert not any(containers(commune, uri).values())
    # and it stays so (no failover of a paused slot: liveness watches meshlets)
    time.sleep(8)
    assert all_paused() is not None
    assert not any(placed_units(commune, uri).values())

    done = alice.ctl("resume", "sleeper")
    assert done.returncode == 0, done.stdout + done.stderr
    after = wait_for(
        lambda: agreed_placement(commune, "sleeper", 2), PLACED_S, "sleeper running again"
    )
    assert after == before  # the same meshlets
    again = containers(commune, uri)
    assert sum(len(v) for v in again.values()) == 2, again
    for person, rows in again.items():
        # started anew on the same machine: same container names, new containers
        assert [n for n, _ in rows] == [n for n, _ in first[person]]
        assert not set(rows) & set(first[person])
    alice.ctl("stop", "sleeper")
