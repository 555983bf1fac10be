"""Secrets: stored root-only, sealed to the slot holder's key, refused to anyone else."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshletd.config import Cluster, Config, Credentials
from meshletd.core.records import MeshletOwner
from meshletd.daemon.atnode import AtprotoNode
from meshletd.daemon.secrets import EncryptionKey, SecretStore, seal
from meshletd.errors import Forbidden, NotFound
from meshletd.store import MemoryStore, StateStore

OWNER, ME, WINNER, OTHER = "did:plc:alice", "did:plc:alicemesh", "did:plc:bobmesh", "did:plc:eve"
URI = f"at://{OWNER}/commune.scheduler.workload/3kweb"


def test_only_the_key_holder_can_open_a_sealed_secret() -> None:
    mine, theirs = EncryptionKey(MemoryStore()), EncryptionKey(MemoryStore())
    sealed = seal(mine.public_b64, b"hunter2")
    assert b"hunter2" not in sealed
    assert mine.unseal(sealed) == b"hunter2"
    with pytest.raises(Exception):  # noqa: B017 - nacl's CryptoError
        theirs.unseal(sealed)


def test_keys_and_secrets_survive_a_restart_in_private_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    key = EncryptionKey(store)
    SecretStore(store).put("db", b"hunter2")
    again = StateStore(tmp_path)
    assert EncryptionKey(again).public_b64 == key.public_b64
    assert SecretStore(again).get("db") == b"hunter2"
    assert "hunter2" not in repr(SecretStore(again)) and "private" not in repr(key)
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o077 == 0


def node_with_placement(slot_holder: str) -> tuple[AtprotoNode, EncryptionKey]:
    cfg = Config(did=ME, owner=OWNER, pds="http://127.0.0.1:1", clusters=[Cluster(name="home")])
    node = AtprotoNode(cfg, Credentials(), MemoryStore())
    node._workloads[URI] = ("bafyx", {"name": "web", "secrets": [{"name": "db"}]})
    node._secrets.put("db", b"hunter2")
    winner_key = EncryptionKey(MemoryStore())
    for did in (WINNER, OTHER):
        node.view.owners[did] = MeshletOwner(
            uri=f"at://{did}/commune.scheduler.meshletOwner/self",
            meshlet=did,
            owner="did:plc:someone",
            milli_cpu=1000,
            memory_mib=1024,
            encryption_key=winner_key.public_b64 if did == WINNER else "",
        )
    sched = SimpleNamespace(placement=lambda: {URI: ((0, slot_holder),)})
    node.engine = SimpleNamespace(scheduler=sched, record_changed=lambda ev: None)
    return node, winner_key


async def test_the_slot_holder_gets_the_secret_sealed_to_its_key() -> None:
    node, winner_key = node_with_placement(WINNER)
    sealed = await node.get_secret(WINNER, URI, "db")
    assert winner_key.unseal(sealed) == b"hunter2"


async def test_a_meshlet_without_a_slot_is_refused() -> None:
    node, _ = node_with_placement(WINNER)
    with pytest.raises(Forbidden, match="holds no slot"):
        await node.get_secret(OTHER, URI, "db")


async def test_a_secret_the_workload_does_not_reference_is_refused() -> None:
    node, _ = node_with_placement(WINNER)
    node._secrets.put("other", b"x")
    with pytest.raises(Forbidden, match="does not reference"):
        await node.get_secret(WINNER, URI, "other")


async def test_another_owners_workload_and_unknown_workloads_are_refused() -> None:
    node, _ = node_with_placement(WINNER)
    with pytest.raises(Forbidden):
        await node.get_secret(WINNER, "at://did:plc:bob/commune.scheduler.workload/x", "db")
    with pytest.raises(NotFound):
        await node.get_secret(WINNER, f"at://{OWNER}/commune.scheduler.workload/nope", "db")


def test_the_balance_follows_usage_records_with_the_cores_formula() -> None:
    from meshletd.core.records import format_datetime_ms

    node, _ = node_with_placement(WINNER)
    node.view.owners[WINNER] = dataclasses.replace(node.view.owners[WINNER], owner="did:plc:bob")
    # A period that ended before the current one began: the ledger is computed at the start
    # of the current usage period, as the core does for its bids.
    now = int(time.time() * 1000)
    end = now - now % node.cfg.scheduling.usage_period_ms - 1000
    ev = SimpleNamespace(
        did=WINNER,
        collection="commune.scheduler.usage",
        rkey="u1",
        action="create",
        cid="bafyu",
        record={
            "periodStart": format_datetime_ms(end - 60_000),
            "periodEnd": format_datetime_ms(end),
            "entries": [{"ownerDid": OWNER, "milliCpuSeconds": 6000, "memoryMiBSeconds": 100}],
        },
        uri=f"at://{WINNER}/commune.scheduler.usage/u1",
    )
    node._on_event(ev)
    ledger = {o["ownerDid"]: o for o in node.balance()["owners"]}
    assert 5900 <= ledger[OWNER]["tookMilliCpuSeconds"] <= 6000
    assert 5900 <= ledger["did:plc:bob"]["gaveMilliCpuSeconds"] <= 6000


def test_replica_views_carry_the_hosts_reported_exit_code() -> None:
    node, _ = node_with_placement(WINNER)
    node.engine.scheduler.replicas = lambda: {}
    node.engine.units = {}
    node._statuses[URI] = {
        f"{WINNER}/s1": {
            "meshletDid": WINNER,
            "slot": 0,
            "round": 0,
            "state": "failed",
            "exitCode": 4,
            "restarts": 0,
        }
    }
    (replica,) = node.workload(URI)["running"]
    assert replica["meshletDid"] == WINNER and replica["state"] == "failed"
    assert replica["exitCode"] == 4 and replica["round"] == 0


def test_a_drained_meshlet_still_publishes_its_encryption_key() -> None:
    """The core rewrites meshletOwner on drain/undrain; the key must survive it, or the
    owner's meshlet refuses every secret to this meshlet ("publishes no encryption key")."""
    from meshletd.atproto.lexicon import validate_record
    from meshletd.atproto.records import record_to_json
    from meshletd.core.records import MeshletOwner as CoreOwner

    cfg = Config(did=ME, owner=OWNER, pds="http://127.0.0.1:1", clusters=[Cluster(name="home")])
    node = AtprotoNode(cfg, Credentials(), MemoryStore())
    drained = CoreOwner(
        uri=f"at://{ME}/commune.scheduler.meshletOwner/self",
        meshlet=ME,
        owner=OWNER,
        milli_cpu=1000,
        memory_mib=1024,
        state="draining",
        state_since=1_700_000_000_000,
    )
    value = node._complete_owner_record(record_to_json(drained))
    validate_record("commune.scheduler.meshletOwner", value)
    assert value["encryptionKey"] == node.key.public_b64
    assert value["state"] == "draining" and value["capacity"]["storageMiB"] == 10_240
    assert "endpoint" not in value  # none configured: no empty string the lexicon refuses
