"""Secrets: stored root-only, sealed to the slot holder's key, refused to anyone else."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshletd.atproto.lexicon import validate_record
from meshletd.atproto.records import record_to_json
from meshletd.core.records import MeshletOwner as CoreOwner
from meshletd.core.records import format_datetime_ms
from meshletd.daemon.local import Local
from meshletd.daemon.publisher import PdsPublisher
from meshletd.daemon.secrets import EncryptionKey, SecretStore, seal
from meshletd.errors import Forbidden, NotFound
from meshletd.store import MemoryStore, StateStore
from tests.unit.daemon_parts import (
    ME,
    OWNER,
    Parts,
    config,
    owner_record,
    parts,
    put,
    workload_value,
)

WINNER, OTHER = "did:plc:bobmesh", "did:plc:eve"
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


def with_placement(slot_holder: str) -> tuple[Parts, EncryptionKey]:
    """alice's meshlet schedules a workload referencing secret `db`, whose slot 0 is held
    by `slot_holder`; WINNER publishes an encryption key, OTHER none."""
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", workload_value(secrets=[{"name": "db"}])))
    p.secrets.put("db", b"hunter2")
    winner_key = EncryptionKey(MemoryStore())
    for did in (WINNER, OTHER):
        key = winner_key.public_b64 if did == WINNER else None
        p.view.apply(put(did, "meshletOwner", "self", owner_record(did, "did:plc:bob", key)))
    p.schedule().scheduler.slots[URI] = ((0, slot_holder),)
    return p, winner_key


async def test_the_slot_holder_gets_the_secret_sealed_to_its_key() -> None:
    p, winner_key = with_placement(WINNER)
    sealed = await p.commands.get_secret(WINNER, URI, "db")
    assert winner_key.unseal(sealed) == b"hunter2"


async def test_a_meshlet_without_a_slot_is_refused() -> None:
    p, _ = with_placement(WINNER)
    with pytest.raises(Forbidden, match="holds no slot"):
        await p.commands.get_secret(OTHER, URI, "db")


async def test_a_slot_holder_without_an_encryption_key_is_refused() -> None:
    p, _ = with_placement(OTHER)
    with pytest.raises(Forbidden, match="publishes no encryption key"):
        await p.commands.get_secret(OTHER, URI, "db")


async def test_a_secret_the_workload_does_not_reference_is_refused() -> None:
    p, _ = with_placement(WINNER)
    p.secrets.put("other", b"x")
    with pytest.raises(Forbidden, match="does not reference"):
        await p.commands.get_secret(WINNER, URI, "other")


async def test_another_owners_workload_and_unknown_workloads_are_refused() -> None:
    p, _ = with_placement(WINNER)
    with pytest.raises(Forbidden):
        await p.commands.get_secret(WINNER, "at://did:plc:bob/commune.scheduler.workload/x", "db")
    with pytest.raises(NotFound):
        await p.commands.get_secret(WINNER, f"at://{OWNER}/commune.scheduler.workload/nope", "db")


async def test_a_meshlet_that_does_not_schedule_cannot_tell_slot_holders() -> None:
    p, _ = with_placement(WINNER)
    p.local.engine = None
    with pytest.raises(Forbidden, match="does not schedule"):
        await p.commands.get_secret(WINNER, URI, "db")


def test_the_balance_follows_usage_records_with_the_cores_formula() -> None:
    p, _ = with_placement(WINNER)
    # A period that ended before the current one began: the ledger is computed at the start
    # of the current usage period, as the core does for its bids.
    now = int(time.time() * 1000)
    end = now - now % p.local.cfg.scheduling.usage_period_ms - 1000
    usage = {
        "periodStart": format_datetime_ms(end - 60_000),
        "periodEnd": format_datetime_ms(end),
        "entries": [{"ownerDid": OWNER, "milliCpuSeconds": 6000, "memoryMiBSeconds": 100}],
        "createdAt": format_datetime_ms(end),
    }
    p.feed(put(WINNER, "usage", "u1", usage))
    ledger = {o["ownerDid"]: o for o in p.read.balance(now)["owners"]}
    assert 5900 <= ledger[OWNER]["tookMilliCpuSeconds"] <= 6000
    assert 5900 <= ledger["did:plc:bob"]["gaveMilliCpuSeconds"] <= 6000


def test_replica_views_carry_the_hosts_reported_exit_code() -> None:
    p, _ = with_placement(WINNER)
    status = {
        "workload": {"uri": URI, "cid": "bafyreiabcdefgh"},
        "slot": 0,
        "round": 0,
        "state": "failed",
        "exitCode": 4,
        "restarts": 0,
        "updatedAt": format_datetime_ms(1_764_000_000_000),
    }
    p.feed(put(WINNER, "workloadStatus", "s1", status))
    (replica,) = p.read.workload(URI)["running"]
    assert replica["meshletDid"] == WINNER and replica["state"] == "failed"
    assert replica["exitCode"] == 4 and replica["round"] == 0


def test_a_drained_meshlet_still_publishes_its_encryption_key() -> None:
    """The core decides drain/undrain; the publisher shapes the record it writes, so the key
    survives it, or the owner's meshlet would refuse every secret to this meshlet
    ("publishes no encryption key")."""
    key = EncryptionKey(MemoryStore())
    publisher = PdsPublisher(Local(config()), key)
    drained = CoreOwner(
        uri=f"at://{ME}/commune.scheduler.meshletOwner/self",
        meshlet=ME,
        owner=OWNER,
        milli_cpu=1000,
        memory_mib=1024,
        state="draining",
        state_since=1_700_000_000_000,
        drains=((1_600_000_000_000, 1_600_000_100_000),),
    )
    value = record_to_json(publisher.owner_record(drained))
    validate_record("commune.scheduler.meshletOwner", value, rkey="self")
    assert value["encryptionKey"] == key.public_b64
    assert value["state"] == "draining" and value["capacity"]["storageMiB"] == 10_240
    assert value["stateSince"] == format_datetime_ms(drained.state_since)
    assert value["drains"] == [
        {"since": format_datetime_ms(a), "until": format_datetime_ms(b)} for a, b in drained.drains
    ]
    assert "endpoint" not in value  # none configured: no empty string the lexicon refuses
