"""Cluster formation on the real reference PDS: three people, three meshlets, two PDSes."""

from __future__ import annotations

import itertools

import trio

from meshletd.atproto.testing import MeshletNode

_n = itertools.count()


async def people(devnet, names_pds):
    """Fresh owner + meshlet accounts per person, so tests don't see each other's records."""
    k = next(_n)
    out = {}
    for name, pds in names_pds:
        owner = await devnet.create_account_async(f"{name}{k}c", pds=pds)
        mesh = await devnet.create_account_async(f"{name}{k}m", pds=pds)
        out[name] = (owner, mesh)
    return out


def node(devnet, p, clusters):
    owner, mesh = p
    return MeshletNode(plc_url=devnet.plc_url, meshlet=mesh, owner=owner, clusters=clusters)


async def test_three_people_form_a_cluster_and_a_withdrawn_consent_drops_a_member(devnet):
    ps = await people(devnet, [("a", 0), ("b", 0), ("c", 1)])
    did = {k: (o.did, m.did) for k, (o, m) in ps.items()}
    nodes = {k: node(devnet, ps[k], {"home": [did[x][0] for x in "abc" if x != k]}) for k in "abc"}
    for n in nodes.values():
        assert await n.publish() > 0
        assert await n.publish() == 0  # idempotent: nothing rewritten
    everyone = {m for _, m in did.values()}
    async with trio.open_nursery() as nursery:
        for n in nodes.values():
            await n.start(nursery)
        for k, n in nodes.items():
            assert await n.wait_members("home", everyone), (k, n.members("home"))

        # carol withdraws consent: her membership record goes away.
        with trio.fail_after(10):
            t0 = trio.current_time()
            await nodes["c"].meshlet_pds.delete_record("commune.scheduler.membership", "home")
            for k in "ab":
                assert await nodes[k].wait_members("home", everyone - {did["c"][1]})
            took = trio.current_time() - t0
        print(f"consent withdrawal reached both other views in {took:.2f}s")
        assert took < 5, took
        # ... and gives it back.
        await nodes["c"].publish()
        for k in "ab":
            assert await nodes[k].wait_members("home", everyone)
        nursery.cancel_scope.cancel()


async def test_a_one_way_owner_link_is_rejected(devnet):
    ps = await people(devnet, [("a", 0), ("b", 1), ("c", 0)])
    a, b, c = (ps[x] for x in "abc")
    na = node(devnet, a, {"home": [b[0].did]})
    nb = node(devnet, b, {"home": [a[0].did]})
    await na.publish()
    await nb.publish()
    # carol's meshlet says carol owns it, but bob claims it too: bob's claim is one-way.
    from meshletd.atproto.records import record_to_json
    from meshletd.core.nsid import NSID_MESHLET
    from meshletd.core.records import MeshletLink, at_uri, rkey_for_did

    rkey = rkey_for_did(c[1].did)
    owner = nb.owner_pds.did
    link = MeshletLink(at_uri(owner, NSID_MESHLET, rkey), owner, c[1].did, created_at=1)
    await nb.owner_pds.put_record(NSID_MESHLET, rkey, record_to_json(link))
    nc = node(devnet, c, {"home": [a[0].did]})
    await nc.publish()
    async with trio.open_nursery() as nursery:
        await na.start(nursery)
        assert await na.wait_members("home", {a[1].did, b[1].did})
        await trio.sleep(1)
        assert c[1].did not in na.members("home")
        why = na.formation.view.why_not(c[1].did, b[0].did)
        assert "one-way" in why
        nursery.cancel_scope.cancel()


async def test_overlapping_clusters_give_each_meshlet_the_right_view(devnet):
    ps = await people(devnet, [("a", 0), ("b", 0), ("c", 1)])
    a, b, c = (ps[x] for x in "abc")
    na = node(devnet, a, {"ab": [b[0].did], "ac": [c[0].did]})
    nb = node(devnet, b, {"ab": [a[0].did]})
    nc = node(devnet, c, {"ac": [a[0].did]})
    for n in (na, nb, nc):
        await n.publish()
    async with trio.open_nursery() as nursery:
        for n in (na, nb, nc):
            await n.start(nursery)
        assert await na.wait_members("ab", {a[1].did, b[1].did})
        assert await na.wait_members("ac", {a[1].did, c[1].did})
        assert await nb.wait_members("ab", {a[1].did, b[1].did})
        assert await nc.wait_members("ac", {a[1].did, c[1].did})
        assert c[1].did not in nb.members("ab") and b[1].did not in nc.members("ac")
        nursery.cancel_scope.cancel()


async def test_an_edit_to_a_meshlet_owner_record_reaches_the_view(devnet):
    ps = await people(devnet, [("a", 0), ("b", 1)])
    a, b = ps["a"], ps["b"]
    na = node(devnet, a, {"home": [b[0].did]})
    nb = node(devnet, b, {"home": [a[0].did]})
    await na.publish()
    await nb.publish()
    async with trio.open_nursery() as nursery:
        await na.start(nursery)
        # The start-up read came as one batch, before anything else was handed on.
        first = {(e.did, e.collection) for e in na.startup_batch}
        assert (b[1].did, "commune.scheduler.meshletOwner") in first
        assert (b[1].did, "commune.scheduler.membership") in first
        assert na.events[: len(na.startup_batch)] == na.startup_batch
        assert await na.wait_members("home", {a[1].did, b[1].did})
        await nb.publish(state="draining")
        ok = await na.formation.wait_for(
            lambda v: v.clusters()["home"].members[b[1].did].state == "draining", 10
        )
        assert ok
        nursery.cancel_scope.cancel()
