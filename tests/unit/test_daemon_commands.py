"""The owner's commands over fakes: workloads in the owner's repo, drain/undrain, secrets
fetched from the owner's meshlet, logs from the hosting meshlet."""

from __future__ import annotations

import pytest

from meshletd.atproto.pds import PdsUnavailable
from meshletd.daemon.fake_peers import FakePeer
from meshletd.daemon.peers import LogPage
from meshletd.daemon.secrets import seal
from meshletd.errors import (
    Conflict,
    DaemonUnavailable,
    Forbidden,
    MeshletError,
    NotFound,
    UpstreamFailure,
    from_xrpc,
)
from tests.unit.daemon_parts import (
    BOB,
    BOB_MESH,
    ME,
    OWNER,
    WORKLOAD,
    parts,
    put,
    workload_value,
)

RECORD = workload_value()
BOB_URI = f"at://{BOB}/{WORKLOAD}/3kbob"
NOW = "2026-12-04T05:00:00.000Z"


async def test_a_published_workload_is_in_the_owners_repo_and_shown_at_once() -> None:
    p = parts()
    got = await p.commands.create_workload(dict(RECORD))
    rkey = got["uri"].rsplit("/", 1)[1]
    cid, stored = p.owner_repo.records[(WORKLOAD, rkey)]
    assert got["cid"] == cid and stored["name"] == "web"
    assert stored == RECORD  # written as given: the defaults were filled once, before
    assert [w["uri"] for w in p.read.workloads()] == [got["uri"]]
    with pytest.raises(Conflict):
        await p.commands.create_workload(dict(RECORD))


async def test_without_the_owners_credential_nothing_is_published() -> None:
    p = parts(logged_in=False)
    with pytest.raises(Forbidden, match="owner-app-password"):
        await p.commands.create_workload(dict(RECORD))


async def test_pause_and_delete_by_name_rewrite_the_owners_record() -> None:
    p = parts()
    uri = (await p.commands.create_workload(dict(RECORD)))["uri"]
    rkey = uri.rsplit("/", 1)[1]
    await p.commands.set_paused("web", True)
    assert p.owner_repo.records[(WORKLOAD, rkey)][1]["paused"] is True
    assert p.read.workload(uri)["paused"] is True
    await p.commands.delete_workload("web")
    assert (WORKLOAD, rkey) not in p.owner_repo.records
    with pytest.raises(NotFound):
        p.read.workload(uri)


async def test_right_after_a_start_an_unknown_workload_is_retry_later_not_not_found() -> None:
    # Before the start-up read of every watched repo is done (docs/protocol.md section 13)
    # a workload may exist and not be read yet: `meshletctl stop web` must not say it does
    # not exist (a script would take that for done).
    p = parts()
    loaded = False
    p.read.loaded = lambda: loaded
    with pytest.raises(DaemonUnavailable, match="still reading the cluster's records"):
        await p.commands.delete_workload("web")
    loaded = True
    with pytest.raises(NotFound, match="no workload named 'web'"):
        await p.commands.delete_workload("web")


async def test_another_owners_workload_cannot_be_paused_or_deleted_here() -> None:
    p = parts()
    p.feed(put(BOB, "workload", "3kbob", dict(RECORD)))
    with pytest.raises(Forbidden, match="not a workload of this meshlet's owner"):
        await p.commands.delete_workload(BOB_URI)
    with pytest.raises(Forbidden):
        await p.commands.set_paused(BOB_URI, True)


async def test_drain_without_a_scheduler_republishes_the_state() -> None:
    p = parts()
    assert await p.commands.drain() == "draining"
    assert p.publisher.published == ["draining"] and p.read.summary()["state"] == "draining"
    assert await p.commands.undrain() == "active"
    assert p.publisher.published == ["draining", "active"]


async def test_drain_with_a_scheduler_is_the_cores_to_carry_out() -> None:
    p = parts()
    engine = p.schedule()
    assert await p.commands.drain() == "draining"
    assert engine.draining == [True] and p.publisher.published == []
    assert p.read.status_line().endswith(", draining")


async def test_a_drain_that_cannot_be_published_leaves_the_state_as_it_was() -> None:
    p = parts(logged_in=False)
    with pytest.raises(Forbidden):
        await p.commands.drain()
    assert p.local.state == "active"


async def test_a_secret_of_another_owner_is_fetched_from_its_meshlet_and_unsealed() -> None:
    p = parts()
    # bob claims two meshlets; the first refuses, the second holds the sealed value.
    for rkey, meshlet in (("a", "did:plc:bobmesh0"), ("b", BOB_MESH)):
        p.view.apply(put(BOB, "meshlet", rkey, {"meshletDid": meshlet, "createdAt": NOW}))
    sealed = seal(p.key.public_b64, b"hunter2")
    p.peers.peers["did:plc:bobmesh0"] = FakePeer()
    p.peers.peers[BOB_MESH] = FakePeer(secrets={(BOB_URI, "db"): (ME, sealed)})
    assert await p.commands.fetch_secret(BOB_URI, "db") == b"hunter2"
    assert p.peers.peers[BOB_MESH].callers == [("getSecret", ME)]
    assert await p.commands.fetch_secret(BOB_URI, "nope") is None


async def test_our_owners_secret_comes_from_the_local_store() -> None:
    p = parts()
    await p.commands.put_secret("db", b"hunter2")
    assert await p.commands.fetch_secret(f"at://{OWNER}/{WORKLOAD}/x", "db") == b"hunter2"


async def test_logs_of_a_replica_elsewhere_come_from_its_host_as_the_owner() -> None:
    p = parts()
    uri = (await p.commands.create_workload(dict(RECORD)))["uri"]
    status = {
        "workload": {"uri": uri, "cid": "bafyreiabcdefgh"},
        "slot": 0,
        "round": 0,
        "state": "running",
        "updatedAt": NOW,
    }
    p.feed(put(BOB_MESH, "workloadStatus", "s1", status))
    lines = [{"line": "hello"}, {"line": "world"}]
    p.peers.peers[BOB_MESH] = FakePeer(logs={(uri, 0): lines})
    got = await p.commands.logs("web", 0, 1)
    assert got == LogPage(({"line": "world"},), "2")
    assert p.peers.peers[BOB_MESH].callers == [("getLogs", OWNER)]
    with pytest.raises(NotFound):
        await p.commands.logs("web", 3, 1)


async def test_logs_of_a_replica_here_come_from_its_unit_journal() -> None:
    asked: list[tuple[str, int, str | None]] = []

    async def journal(unit: str, lines: int, cursor: str | None) -> LogPage:
        asked.append((unit, lines, cursor))
        return LogPage(({"line": "local"},), "c1")

    p = parts()
    p.commands.journal = journal
    uri = (await p.commands.create_workload(dict(RECORD)))["uri"]
    engine = p.schedule()
    engine.scheduler.slots[uri] = ((0, ME),)
    engine.scheduler.local[(uri, 0)] = "running"
    engine.units[(uri, 0)] = "meshlet-web-0.service"
    assert (await p.commands.logs(uri, 0, 5, "c0")).entries == ({"line": "local"},)
    assert asked == [("meshlet-web-0.service", 5, "c0")]


async def test_an_update_keeps_the_previous_spec_and_the_rollback_writes_it_back() -> None:
    from meshletd.core.versions import spec_version

    p = parts()
    uri = (await p.commands.create_workload(dict(RECORD)))["uri"]
    rkey = uri.rsplit("/", 1)[1]
    v1 = spec_version(RECORD)
    got = await p.commands.update_workload("web", "registry.test/web:2")
    _, stored = p.owner_repo.records[(WORKLOAD, rkey)]
    assert got["previousVersion"] == v1 and got["version"] == spec_version(stored) != v1
    assert stored["image"] == "registry.test/web:2"
    assert stored["createdAt"] == RECORD["createdAt"]  # the placement stays
    assert stored["previous"]["image"] == RECORD["image"] and "name" not in stored["previous"]
    # the same image again: nothing written
    again = await p.commands.update_workload("web", "registry.test/web:2")
    assert "cid" not in again and again["version"] == got["version"]
    # the new version failed on a slot: the owner's meshlet writes the previous spec back
    assert await p.commands.roll_back(uri, got["version"], "it could not start")
    _, back = p.owner_repo.records[(WORKLOAD, rkey)]
    assert spec_version(back) == v1 and back["image"] == RECORD["image"]
    assert back["rollback"]["version"] == got["version"]
    assert back["rollback"]["reason"] == "it could not start" and "previous" not in back
    assert p.read.workload(uri)["rollback"].startswith(f"update to version {got['version']}")
    # a second report of the same failure changes nothing
    assert await p.commands.roll_back(uri, got["version"], "again")
    assert p.owner_repo.records[(WORKLOAD, rkey)][1] == back


async def test_a_record_without_a_previous_spec_is_not_rolled_back() -> None:
    from meshletd.core.versions import spec_version

    p = parts()
    uri = (await p.commands.create_workload(dict(RECORD)))["uri"]
    rkey = uri.rsplit("/", 1)[1]
    before = p.owner_repo.records[(WORKLOAD, rkey)]
    assert await p.commands.roll_back(uri, spec_version(RECORD), "it could not start")
    assert p.owner_repo.records[(WORKLOAD, rkey)] == before


async def test_a_stop_during_the_owners_pds_outage_is_an_upstream_failure_not_internal() -> None:
    # dev/chaos: `meshletctl stop` while the owner's PDS was down printed InternalError.
    p = parts()
    await p.commands.create_workload(dict(RECORD))

    async def down(*_: object) -> None:
        raise PdsUnavailable("http://pds.example com.atproto.repo.deleteRecord: ConnectError")

    p.owner_repo.delete_record = down  # type: ignore[method-assign]
    with pytest.raises(MeshletError) as got:
        await p.commands.delete_workload("web")
    answered = from_xrpc(got.value.to_xrpc(), got.value.status)  # as meshletctl reads it
    assert isinstance(answered, UpstreamFailure) and answered.status == 502
    assert "deleteRecord: ConnectError" in str(answered)
