"""The cluster view admits only mutually verified meshlets, per configured cluster."""

from __future__ import annotations

from meshletd.atproto.cluster import ClusterView
from meshletd.atproto.frames import RecordEvent
from meshletd.atproto.records import Membership, Meshlet, MeshletOwner, Resources, rkey_for_did

A, B, C = "did:plc:alice", "did:plc:bob", "did:plc:carol"
AM, BM, CM = "did:plc:alice-mesh", "did:plc:bob-mesh", "did:plc:carol-mesh"
_rev = iter(range(10_000, 99_999))


def put(did, model, rkey):
    value = model.to_record(rkey=rkey)
    return RecordEvent(did, model.NSID, rkey, "create", "cid", value, str(next(_rev)))


def delete(did, nsid, rkey):
    return RecordEvent(did, nsid, rkey, "delete", None, None, str(next(_rev)))


def link(view, owner, meshlet, consents_to=(), owner_back=None):
    view.apply(put(owner, Meshlet(meshlet_did=meshlet), rkey_for_did(meshlet)))
    view.apply(
        put(
            meshlet,
            MeshletOwner(
                owner_did=owner_back or owner,
                capacity=Resources(milli_cpu=1000, memory_mib=512),
                arch="amd64",
            ),
            "self",
        )
    )
    if consents_to:
        view.apply(put(meshlet, Membership(cluster="home", members=tuple(consents_to)), "home"))


def members(view, cluster="home"):
    return set(view.clusters()[cluster].members)


def test_mutually_verified_meshlets_form_the_cluster():
    v = ClusterView.create(AM, A, {"home": [B, C]})
    link(v, A, AM, [B, C])
    link(v, B, BM, [A, C])
    link(v, C, CM, [A, B])
    assert members(v) == {AM, BM, CM}
    assert v.watched_dids() == {A, B, C, AM, BM, CM}


def test_removing_a_consent_record_drops_that_member():
    v = ClusterView.create(AM, A, {"home": [B, C]})
    link(v, B, BM, [A])
    link(v, C, CM, [A])
    assert v.apply(delete(CM, "commune.scheduler.membership", "home"))
    assert members(v) == {AM, BM}
    assert "does not list" in v.why_not(CM, C)


def test_one_way_owner_link_is_rejected():
    v = ClusterView.create(AM, A, {"home": [B]})
    link(v, B, BM, [A], owner_back=C)  # bob claims the meshlet, it names carol
    assert members(v) == {AM}
    assert "one-way" in v.why_not(BM, B)
    v2 = ClusterView.create(AM, A, {"home": [B]})
    v2.apply(
        put(
            BM,
            MeshletOwner(owner_did=B, capacity=Resources(milli_cpu=1, memory_mib=1), arch="amd64"),
            "self",
        )
    )
    v2.apply(put(BM, Membership(cluster="home", members=(A,)), "home"))  # no claim by bob
    assert members(v2) == {AM}


def test_a_member_not_configured_by_us_is_not_in_our_view():
    v = ClusterView.create(AM, A, {"home": [B]})
    link(v, C, CM, [A])  # carol consents to us, but we never listed carol
    assert members(v) == {AM}


def test_overlapping_clusters_give_each_meshlet_its_own_view():
    # A is in A-B and A-C; B and C do not list each other.
    a = ClusterView.create(AM, A, {"ab": [B], "ac": [C]})
    b = ClusterView.create(BM, B, {"ab": [A]})
    c = ClusterView.create(CM, C, {"ac": [A]})
    for v in (a, b, c):
        link(v, A, AM, [B, C])
        link(v, B, BM, [A])
        link(v, C, CM, [A])
    assert members(a, "ab") == {AM, BM} and members(a, "ac") == {AM, CM}
    assert members(b, "ab") == {AM, BM}
    assert members(c, "ac") == {AM, CM}
    assert set(a.all_members()) == {AM, BM, CM}


def test_meshlet_owner_edits_and_draining_are_visible():
    v = ClusterView.create(AM, A, {"home": [B]})
    link(v, B, BM, [A])
    v.apply(
        put(
            BM,
            MeshletOwner(
                owner_did=B,
                state="draining",
                capacity=Resources(milli_cpu=1, memory_mib=1),
                arch="arm64",
            ),
            "self",
        )
    )
    assert v.clusters()["home"].members[BM].state == "draining"
    v.apply(delete(B, "commune.scheduler.meshlet", rkey_for_did(BM)))
    assert members(v) == {AM}
    assert BM not in v.watched_dids()


def test_second_meshlet_of_our_own_owner_needs_no_consent_record():
    v = ClusterView.create(AM, A, {"home": [B]})
    link(v, A, "did:plc:alice-mesh2")
    assert "did:plc:alice-mesh2" in members(v)
