"""One hostile record, frame or PDS answer costs its own refusal, never the daemon
(issue #15, point 6). Each test here failed on db8aa19."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import httpx
import libipld
import pytest
import trio

from meshletd.atproto.firehose import Backoff, Firehose, MemoryCursorStore
from meshletd.atproto.frames import FrameDecoder, Interest
from meshletd.atproto.identity import Identity, StaticIdentityResolver, identity_from_doc
from meshletd.atproto.lexicon import MAX_DEPTH, default_lexicons
from meshletd.atproto.reader import ReadError, RepoReader
from meshletd.atproto.testing import FakeRepo, did_doc, frame
from meshletd.errors import InvalidRecord

WORKLOAD = "commune.scheduler.workload"
MEMBERSHIP = "commune.scheduler.membership"
NOW = "2026-11-27T06:00:00.000Z"
PDS = "http://pds.invalid"


def workload(**extra):
    return {
        "$type": WORKLOAD,
        "name": "web",
        "image": "docker.io/library/nginx:1.27",
        "resources": {"milliCpu": 100, "memoryMiB": 64},
        "replicas": 1,
        "kind": "service",
        "cluster": "home",
        "createdAt": NOW,
        **extra,
    }


def nested(depth):
    v: dict = {"leaf": 1}
    for _ in range(depth - 1):
        v = {"x": v}
    return v


@pytest.mark.parametrize("depth", [200, 500, 990, 5000])
def test_a_deeply_nested_extra_field_is_refused_naming_the_depth(depth):
    with pytest.raises(InvalidRecord) as err:
        default_lexicons().validate_record(WORKLOAD, workload(extra=nested(depth)))
    assert f"nested deeper than {MAX_DEPTH} levels" in err.value.message
    assert err.value.field.startswith("extra.x.x")


def test_nesting_up_to_the_limit_is_still_forward_compatible():
    # The record is level 1, `extra` level 2: MAX_DEPTH - 1 levels fit below it.
    default_lexicons().validate_record(WORKLOAD, workload(extra=nested(MAX_DEPTH - 1)))
    with pytest.raises(InvalidRecord):
        default_lexicons().validate_record(WORKLOAD, workload(extra=nested(MAX_DEPTH)))


def test_a_deep_record_on_the_firehose_is_one_refusal_with_field_and_reason():
    alice = FakeRepo("did:plc:alice")
    decoder = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})
    out = decoder.process(alice.put(WORKLOAD, "deep", workload(extra=nested(990))))
    assert [(e.action, e.refused) for e in out.events] == [("delete", True)]
    [refusal] = out.refused
    assert refusal.uri == f"at://{alice.did}/{WORKLOAD}/deep"
    assert "nested deeper" in refusal.reason and refusal.field.startswith("extra.")
    # the next record of the same repo still passes
    out = decoder.process(alice.put(WORKLOAD, "ok", workload()))
    assert [e.rkey for e in out.events] == ["ok"]


def _commit_body(alice, **changes):
    raw = alice.put(
        MEMBERSHIP,
        "home",
        {"$type": MEMBERSHIP, "cluster": "home", "members": [], "createdAt": NOW},
    )
    header, body = libipld.decode_dag_cbor_multi(raw)
    body.update(changes)
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: _commit_body(a, ops=[{"action": "create"}]),  # KeyError on path
        lambda a: _commit_body(a, ops=[{"path": 7, "action": "create"}]),  # TypeError
        lambda a: _commit_body(a, ops=5),
        lambda a: _commit_body(a, rev=12),
        lambda a: _commit_body(a, repo=["did:plc:alice"]),  # unhashable
        lambda a: _commit_body(a, blocks="not bytes"),
        lambda a: frame("#identity", {"did": {"a": 1}, "seq": 3}),
        lambda a: frame("#account", {"did": ["x"], "active": True}),
        lambda a: frame("#info", {"name": ["OutdatedCursor"], "message": 5}),
        lambda a: libipld.encode_dag_cbor({"op": 1, "t": 5}) + libipld.encode_dag_cbor({}),
    ],
)
def test_malformed_frames_are_dropped_not_raised(make):
    alice = FakeRepo("did:plc:alice")
    decoder = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})
    out = decoder.process(make(alice))
    assert out.events == []
    assert out.seq is None or isinstance(out.seq, int)
    # and the decoder still works afterwards
    ok = decoder.process(alice.put(WORKLOAD, "ok", workload()))
    assert [e.rkey for e in ok.events] == ["ok"]


def test_a_sequence_number_that_is_not_an_integer_never_becomes_the_cursor():
    alice = FakeRepo("did:plc:alice")
    decoder = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})
    out = decoder.process(_commit_body(alice, seq="12; DROP"))
    assert out.seq is None


def test_a_malformed_commit_of_a_watched_repo_asks_for_its_resync():
    alice = FakeRepo("did:plc:alice")
    decoder = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})
    out = decoder.process(_commit_body(alice, ops=[{"path": 7, "action": "create"}]))
    assert out.dropped and "malformed" in out.dropped[0]
    assert out.resync == {alice.did}


def test_a_pds_endpoint_with_a_port_out_of_range_is_no_endpoint():
    from meshletd.atproto.testing import SigningKey

    key = SigningKey()
    doc = did_doc("did:web:evil.example", key.multikey, "http://localhost:99999")
    ident = identity_from_doc("did:web:evil.example", doc)
    assert ident.pds is None


def _reader(handler):
    return RepoReader(httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize(
    "content",
    [b"<html>not json</html>", b"[1, 2]", b'{"x":' * 100_000 + b"1" + b"}" * 100_000],
)
async def test_a_non_json_answer_with_status_200_is_a_read_error(content):
    reader = _reader(lambda request: httpx.Response(200, content=content))
    with pytest.raises(ReadError):
        await reader.latest_rev(PDS, "did:plc:alice")
    with pytest.raises(ReadError):
        await reader.list_records(PDS, "did:plc:alice", WORKLOAD)


async def test_a_listing_with_malformed_entries_is_a_read_error():
    reader = _reader(lambda r: httpx.Response(200, json={"records": [{"uri": 5}]}))
    with pytest.raises(ReadError):
        await reader.list_records(PDS, "did:plc:alice", WORKLOAD)


async def test_an_endless_answer_is_cut_off():
    reader = _reader(lambda r: httpx.Response(200, content=b" " * (9 * 2**20)))
    with pytest.raises(ReadError, match="answer over"):
        await reader.latest_rev(PDS, "did:plc:alice")


class _Garbage:
    """A RepoReader whose PDS answers 200 with HTML to everything."""

    def __init__(self):
        self.inner = _reader(lambda r: httpx.Response(200, content=b"<html>"))

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_anti_entropy_against_a_garbage_pds_is_logged_and_the_firehose_lives(caplog):
    alice = FakeRepo("did:plc:alice")
    resolver = StaticIdentityResolver({alice.did: Identity(alice.did, PDS, alice.key.did_key)})

    @asynccontextmanager
    async def connect(url):
        class WS:
            async def get_message(self):
                await trio.sleep_forever()

        yield WS()

    async def sink(ev):
        pass

    caplog.set_level(logging.WARNING)
    fh = Firehose(
        resolver,
        MemoryCursorStore(),
        sink,
        reader=_Garbage(),
        connect=connect,
        anti_entropy_every_s=0.01,
        backoff=Backoff(0.01, 0.05),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fh.run)
        await fh.watch(alice.did)  # the forced resync fails: logged
        await trio.sleep(0.1)  # a few periodic passes fail too
        nursery.cancel_scope.cancel()
    assert any("anti-entropy" in r.getMessage() for r in caplog.records)


async def test_a_subscription_whose_connect_fails_oddly_retries_with_backoff():
    alice = FakeRepo("did:plc:alice")
    resolver = StaticIdentityResolver({alice.did: Identity(alice.did, PDS, alice.key.did_key)})
    attempts = []

    @asynccontextmanager
    async def connect(url):
        attempts.append(url)
        raise ValueError("Port out of range 0-65535")
        yield  # pragma: no cover

    class Empty:
        async def collections(self, pds, did):
            return set()

        async def list_records(self, pds, did, collection):
            return {}

        async def latest_rev(self, pds, did):
            return None

    async def sink(ev):
        pass

    fh = Firehose(
        resolver,
        MemoryCursorStore(),
        sink,
        reader=Empty(),
        connect=connect,
        anti_entropy_every_s=3600,
        backoff=Backoff(0.01, 0.02),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fh.run)
        await fh.watch(alice.did)
        with trio.fail_after(5):
            while len(attempts) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(attempts) >= 3


async def test_a_consumer_that_fails_on_one_record_still_gets_the_next():
    alice = FakeRepo("did:plc:alice")
    resolver = StaticIdentityResolver({alice.did: Identity(alice.did, PDS, alice.key.did_key)})
    send, recv = trio.open_memory_channel(10)

    @asynccontextmanager
    async def connect(url):
        class WS:
            async def get_message(self):
                return await recv.receive()

        yield WS()

    class Empty:
        async def collections(self, pds, did):
            return set()

        async def list_records(self, pds, did, collection):
            return {}

        async def latest_rev(self, pds, did):
            return None

    seen = []

    async def sink(ev):
        if ev.rkey == "bad":
            raise KeyError("the consumer chokes on this one")
        seen.append(ev.rkey)

    fh = Firehose(
        resolver,
        MemoryCursorStore(),
        sink,
        reader=Empty(),
        connect=connect,
        anti_entropy_every_s=3600,
        backoff=Backoff(0.01, 0.02),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fh.run)
        await fh.watch(alice.did, resync=False)
        await send.send(alice.put(WORKLOAD, "bad", workload()))
        await send.send(alice.put(WORKLOAD, "good", workload()))
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen == ["good"]
    assert any("consumer failed" in d for d in fh.dropped)


async def test_refused_records_are_remembered_for_their_owner_and_cleared_by_a_fix():
    alice = FakeRepo("did:plc:alice")
    resolver = StaticIdentityResolver({alice.did: Identity(alice.did, PDS, alice.key.did_key)})
    send, recv = trio.open_memory_channel(10)

    @asynccontextmanager
    async def connect(url):
        class WS:
            async def get_message(self):
                return await recv.receive()

        yield WS()

    seen = []

    async def sink(ev):
        seen.append((ev.rkey, ev.action))

    fh = Firehose(
        resolver, MemoryCursorStore(), sink, reader=None, connect=connect, anti_entropy_every_s=3600
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fh.run)
        await fh.watch(alice.did, resync=False)
        await send.send(alice.put(WORKLOAD, "w", workload()))
        await send.send(alice.put(WORKLOAD, "w", workload(replicas=0, name="bad")))
        with trio.fail_after(5):
            while not fh.refusals(alice.did):
                await trio.sleep(0.01)
        [r] = fh.refusals(alice.did)
        assert (r.field, r.reason, r.name) == ("replicas", "below the minimum 1", "bad")
        # The valid version before it is withdrawn: an invalid record counts as absent for
        # every observer, also for one that never saw the valid version.
        assert seen == [("w", "create"), ("w", "delete")]
        await send.send(alice.put(WORKLOAD, "w", workload()))
        with trio.fail_after(5):
            while len(seen) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen[-1] == ("w", "create")
    assert fh.refusals(alice.did) == []
