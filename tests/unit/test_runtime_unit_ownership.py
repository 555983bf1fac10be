"""Replica units cannot be taken over (issue #15, point 7): names carry 128 bits of the
replica's identity, and a unit is adopted or taken as started only if the identity it
carries is the replica's. The two takeover tests failed on db8aa19."""

from __future__ import annotations

import pytest

from meshletd.runtime import naming
from meshletd.runtime.events import ReplicaFailed, ReplicaRunning
from meshletd.runtime.fake import FakeMachine
from meshletd.runtime.spec import ReplicaId
from meshletd.runtime.testing import FakeHarness, serving, spec
from meshletd.runtime.units import ENV_OWNER


def test_a_brute_force_search_finds_no_colliding_name():
    """At db8aa19 the tag had 24 bits: ~2^12 tries found a collision (birthday bound);
    now 2^64 would be needed. 20 000 tries find none."""
    seen: dict[str, ReplicaId] = {}
    for i in range(20_000):
        rid = ReplicaId(f"did:plc:mallory{i}", "web", 0)
        name = naming.unit_name(rid, "alice.example.com")
        assert name not in seen
        seen[name] = rid


def _collide(monkeypatch, victim_unit: str) -> None:
    """Make every replica map to the victim's unit name (a collision, as found at db8aa19)."""
    base = victim_unit.removesuffix(".service")
    monkeypatch.setattr(naming, "container_name", lambda replica, handle: base)
    monkeypatch.setattr(naming, "unit_name", lambda replica, handle: victim_unit)


async def test_a_running_unit_of_another_replica_is_not_taken_as_ours(monkeypatch) -> None:
    h = FakeHarness(FakeMachine())
    victim = spec(h, workload="web")
    rt = h.runtime()
    async with serving(rt):
        running = await rt.start(victim)
        assert isinstance(running, ReplicaRunning)
    _collide(monkeypatch, running.unit)
    attacker = spec(h, workload="evil")
    rt2 = h.runtime()  # a restarted meshletd (the victim's unit is adopted by its identity)
    async with serving(rt2):
        out = await rt2.start(attacker)
    assert isinstance(out, ReplicaFailed) and out.error == "UnitNameTaken"
    # the victim's unit still runs, and still says it is the victim's
    unit = h.machine.units[running.unit]
    assert unit.active_state == "active"
    assert f"MESHLET_WORKLOAD={victim.replica.workload}" in unit.environment


async def test_a_unit_whose_identity_does_not_fit_its_name_is_not_adopted() -> None:
    h = FakeHarness(FakeMachine())
    rt = h.runtime()
    async with serving(rt):
        running = await rt.start(spec(h, workload="web"))
        assert isinstance(running, ReplicaRunning)
    # Somebody rewrites the unit's stored identity to another owner's replica.
    unit = h.machine.units[running.unit]
    env = [e for e in unit.environment if not e.startswith(f"{ENV_OWNER}=")]
    unit.properties["Environment"] = [*env, f"{ENV_OWNER}=did:plc:mallory"]
    async with serving(h.runtime()) as adopted:
        assert [a for a in adopted if a.replica.owner_did == "did:plc:mallory"] == []


@pytest.mark.parametrize("digits", [naming.TAG_HEX, naming.LEGACY_TAG_HEX])
def test_units_named_by_this_and_the_older_scheme_belong_to_their_replica(digits) -> None:
    rid = ReplicaId("did:plc:alice", "web", 3)
    tag = naming.workload_tag(rid.owner_did, rid.workload, digits)
    name = f"meshlet-alice-web-3-{tag}"
    assert naming.unit_belongs(name + ".service", rid, name)
    other = ReplicaId("did:plc:bob", "web", 3)
    assert not naming.unit_belongs(name + ".service", other, name)
    assert not naming.unit_belongs(name + ".service", ReplicaId(*rid.__dict__.values()), "x")


def test_names_keep_a_readable_prefix_for_operators() -> None:
    name = naming.unit_name(ReplicaId("did:plc:alice", "web", 0), "alice.example.com")
    assert name.startswith("meshlet-alice.example.com-web-0-")
    assert len(name) < 140


def test_podman_secret_names_fit_podmans_64_characters() -> None:
    """The 128-bit tag made `<container>.<secret>` longer than podman allows (seen in the
    e2e: `podman secret create` refused the name)."""
    import re

    rid = ReplicaId("did:plc:bussyd4mkaqeuhzz", "3n3t3vw7jbaze" + "x" * 40, 9999)
    container = naming.container_name(rid, "h" * 253)
    for secret in ("db", "a" * 63, "db.password_1"):
        name = naming.secret_name(container, secret)
        assert len(name) <= 64 and re.fullmatch(r"[A-Za-z0-9_.-]+", name)
        assert name.startswith(naming.secret_prefix(container))
    assert naming.secret_name(container, "db") != naming.secret_name(container, "dc")
    other = naming.container_name(ReplicaId("did:plc:x", "w", 0), "h")
    assert naming.secret_prefix(other) != naming.secret_prefix(container)


def test_the_second_lane_of_a_slot_has_its_own_unit_that_only_it_owns() -> None:
    """A rolling update runs a slot's new version beside the old one (docs/protocol.md,
    section 25): lane 1's unit is a different name, found again from its environment."""
    from meshletd.runtime.units import identity_from_environment

    old = ReplicaId("did:plc:alice", "web", 3)
    new = ReplicaId("did:plc:alice", "web", 3, lane=1)
    a, b = naming.unit_name(old, "alice.test"), naming.unit_name(new, "alice.test")
    assert a != b and b.startswith("meshlet-alice.test-web-3.1-")
    assert naming.unit_belongs(b, new, b.removesuffix(".service"))
    assert not naming.unit_belongs(b, old, b.removesuffix(".service"))
    assert not naming.unit_belongs(a, new, a.removesuffix(".service"))
    env = {
        "MESHLET_OWNER_DID": "did:plc:alice",
        "MESHLET_WORKLOAD": "web",
        "MESHLET_REPLICA": "3",
        "MESHLET_LANE": "1",
        "MESHLET_CONTAINER": b.removesuffix(".service"),
    }
    ident = identity_from_environment(env)
    assert ident is not None and ident.replica == new
    assert identity_from_environment({**env, "MESHLET_LANE": "7"}) is None
    del env["MESHLET_LANE"]
    got = identity_from_environment(env)
    assert got is not None and got.replica == old  # units from before lanes: lane 0
