"""Firehose frames are verified, filtered and validated before anything sees them."""

from __future__ import annotations

import libipld
import pytest

from meshletd.atproto.frames import FrameDecoder, Interest, RecordEvent, RepoMirror
from meshletd.atproto.testing import FakeRepo, SigningKey, error_frame, frame
from meshletd.atproto.verify import Unverified, cid_of, mst_lookup

NOW = "2026-11-27T06:00:00.000Z"
MEMBERSHIP = "commune.scheduler.membership"


def membership(members, cluster="home"):
    return {"$type": MEMBERSHIP, "cluster": cluster, "members": members, "createdAt": NOW}


@pytest.fixture
def alice():
    return FakeRepo("did:plc:alice")


@pytest.fixture
def decoder(alice):
    return FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})


def test_a_signed_commit_becomes_a_record_event(alice, decoder):
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership(["did:plc:bob"])))
    assert out.dropped == []
    [ev] = out.events
    assert (ev.did, ev.collection, ev.rkey, ev.action) == (alice.did, MEMBERSHIP, "home", "create")
    assert ev.record["members"] == ["did:plc:bob"]
    assert ev.uri == f"at://{alice.did}/{MEMBERSHIP}/home"
    assert ev.seq == out.seq


def test_updates_and_deletes_are_proven_too(alice, decoder):
    decoder.process(alice.put(MEMBERSHIP, "home", membership(["did:plc:bob"])))
    decoder.process(alice.put(MEMBERSHIP, "work", membership(["did:plc:c"], "work")))
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership(["did:plc:carol"])))
    assert [e.action for e in out.events] == ["update"]
    out = decoder.process(alice.delete(MEMBERSHIP, "home"))
    assert [(e.action, e.record) for e in out.events] == [("delete", None)]


def test_commit_signed_with_another_key_is_dropped_naming_why(alice, decoder):
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership([]), sign_with=SigningKey()))
    assert out.events == []
    assert out.bad_signature
    assert "bad commit signature" in out.dropped[0]
    assert alice.did in out.dropped[0]


def test_unsigned_commit_is_dropped(alice, decoder):
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership([]), unsigned=True))
    assert out.events == [] and "unsigned" in out.dropped[0]


def test_record_swapped_under_a_valid_signature_is_dropped(alice, decoder):
    forged = membership(["did:plc:mallory"])
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership([]), tamper_record=forged))
    assert out.events == []
    assert "does not match its CID" in out.dropped[0]


def test_non_member_repos_are_skipped_without_decoding(decoder):
    mallory = FakeRepo("did:plc:mallory")
    out = decoder.process(mallory.put(MEMBERSHIP, "home", membership([])))
    assert out.events == [] and out.dropped == [] and out.seq is not None


def test_other_collections_are_skipped(alice, decoder):
    out = decoder.process(alice.put("app.bsky.feed.post", "1", {"text": "hi", "createdAt": NOW}))
    assert out.events == [] and out.dropped == []


def test_invalid_record_is_dropped_naming_the_field(alice, decoder):
    out = decoder.process(alice.put(MEMBERSHIP, "home", membership(["not a did"])))
    # an invalid record counts as absent: consumers see it deleted (protocol 19.1)
    assert [(e.action, e.refused) for e in out.events] == [("delete", True)]
    assert "members[0]: not a valid did" in out.dropped[0]


def test_oversized_record_is_dropped(alice, decoder):
    big = {**membership([]), "pad": "x" * 70_000}
    out = decoder.process(alice.put(MEMBERSHIP, "home", big))
    assert [e.action for e in out.events] == ["delete"] and "over the" in out.dropped[0]


def test_unknown_key_asks_for_resolution(alice):
    d = FrameDecoder(Interest(dids={alice.did}))
    raw = alice.put(MEMBERSHIP, "home", membership([]))
    assert d.process(raw).need_key == alice.did
    d.keys[alice.did] = alice.key.did_key
    assert len(d.process(raw).events) == 1


def test_replayed_commit_is_not_applied_twice(alice, decoder):
    raw = alice.put(MEMBERSHIP, "home", membership([]))
    assert len(decoder.process(raw).events) == 1
    assert decoder.process(raw).events == []


def test_control_frames(alice, decoder):
    assert decoder.process(frame("#identity", {"seq": 5, "did": alice.did})).identity_changed
    assert decoder.process(frame("#sync", {"seq": 6, "did": alice.did, "rev": "x"})).resync == {
        alice.did
    }
    out = decoder.process(frame("#info", {"name": "OutdatedCursor"}))
    assert out.resync == {alice.did}
    assert "FutureCursor" in decoder.process(error_frame("FutureCursor", "no")).error
    assert decoder.process(b"\x00garbage").dropped


def test_mst_lookup_follows_subtrees():
    leaf_a = {"l": None, "e": [{"p": 0, "k": b"a/1", "v": b"\x01A", "t": None}]}
    leaf_c = {"l": None, "e": [{"p": 0, "k": b"c/1", "v": b"\x01C", "t": None}]}
    root = {"l": cid_of(leaf_a), "e": [{"p": 0, "k": b"b/1", "v": b"\x01B", "t": cid_of(leaf_c)}]}
    blocks = {cid_of(x): x for x in (leaf_a, leaf_c, root)}
    r = cid_of(root)
    assert mst_lookup(blocks, r, "a/1") == b"\x01A"
    assert mst_lookup(blocks, r, "b/1") == b"\x01B"
    assert mst_lookup(blocks, r, "c/1") == b"\x01C"
    assert mst_lookup(blocks, r, "c/0") is None
    del blocks[cid_of(leaf_c)]
    with pytest.raises(Unverified, match="missing"):
        mst_lookup(blocks, r, "c/1")
    blocks[cid_of(leaf_c)] = leaf_a  # a forged subtree
    with pytest.raises(Unverified, match="does not match"):
        mst_lookup(blocks, r, "c/1")


def test_real_pds_frame_layout_decodes():
    # A frame as the reference PDS encodes it (dag-cbor header + body) round-trips.
    repo = FakeRepo("did:plc:x")
    raw = repo.put(MEMBERSHIP, "home", membership([]))
    header, body = libipld.decode_dag_cbor_multi(raw)
    assert header == {"op": 1, "t": "#commit"} and body["repo"] == "did:plc:x"


def ev(action, cid, rev, rkey="home"):
    return RecordEvent("did:plc:a", MEMBERSHIP, rkey, action, cid, {} if cid else None, rev)


def test_mirror_orders_changes_by_rev_and_suppresses_repeats():
    m = RepoMirror()
    assert m.apply(ev("create", "c1", "2")).action == "create"
    assert m.apply(ev("create", "c1", "2")) is None  # same again
    assert m.apply(ev("update", "c0", "1")) is None  # older
    assert m.apply(ev("create", "c2", "3")).action == "update"  # resync says create: it's an update
    assert m.known("did:plc:a", MEMBERSHIP) == {"home": "c2"}
    assert m.apply(ev("delete", None, "4")).action == "delete"
    assert m.apply(ev("delete", None, "5")) is None
    assert m.known("did:plc:a", MEMBERSHIP) == {}
    assert m.apply(ev("delete", None, "1", rkey="never")).action == "delete"
    assert m.apply(ev("delete", None, "2", rkey="never")) is None
