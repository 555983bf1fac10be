"""The cluster view admits only mutually verified meshlets, per configured cluster."""

from __future__ import annotations

from meshletd.atproto.cluster import ConfiguredClusters as ClusterView
from meshletd.atproto.frames import RecordEvent
from meshletd.atproto.records import record_to_json
from meshletd.core.nsid import NSID_MEMBERSHIP, NSID_MESHLET, NSID_MESHLET_OWNER
from meshletd.core.records import Membership, MeshletLink, MeshletOwner, at_uri, rkey_for_did

A, B, C = "did:plc:alice", "did:plc:bob", "did:plc:carol"
AM, BM, CM = "did:plc:alice-mesh", "did:plc:bob-mesh", "did:plc:carol-mesh"
_rev = iter(range(10_000, 99_999))
T = 1_764_000_000_000


def put(did, nsid, rkey, rec):
    return RecordEvent(did, nsid, rkey, "create", "cid", record_to_json(rec), str(next(_rev)))


def claim(owner, meshlet):
    rkey = rkey_for_did(meshlet)
    return put(
        owner,
        NSID_MESHLET,
        rkey,
        MeshletLink(at_uri(owner, NSID_MESHLET, rkey), owner, meshlet, created_at=T),
    )


def self_record(meshlet, owner, state="active", arch="amd64"):
    uri = at_uri(meshlet, NSID_MESHLET_OWNER, "self")
    rec = MeshletOwner(uri, meshlet, owner, 1000, 512, state=state, state_since=T, arch=arch)
    return put(meshlet, NSID_MESHLET_OWNER, "self", rec)


def consent(meshlet, members, cluster="home"):
    uri = at_uri(meshlet, NSID_MEMBERSHIP, cluster)
    return put(
        meshlet, NSID_MEMBERSHIP, cluster, Membership(uri, meshlet, cluster, frozenset(members), T)
    )


def delete(did, nsid, rkey):
    return RecordEvent(did, nsid, rkey, "delete", None, None, str(next(_rev)))


def link(view, owner, meshlet, consents_to=(), owner_back=None):
    view.apply(claim(owner, meshlet))
    view.apply(self_record(meshlet, owner_back or owner))
    if consents_to:
        view.apply(consent(meshlet, consents_to))


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
    v2.apply(self_record(BM, B))
    v2.apply(consent(BM, [A]))  # no claim by bob
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
    v.apply(self_record(BM, B, state="draining", arch="arm64"))
    assert v.clusters()["home"].members[BM].state == "draining"
    v.apply(delete(B, "commune.scheduler.meshlet", rkey_for_did(BM)))
    assert members(v) == {AM}
    assert BM not in v.watched_dids()


def test_second_meshlet_of_our_own_owner_needs_no_consent_record():
    v = ClusterView.create(AM, A, {"home": [B]})
    link(v, A, "did:plc:alice-mesh2")
    assert "did:plc:alice-mesh2" in members(v)
