"""meshletd with the atproto-backed node on the real reference PDS: it publishes its own
records, verifies its members, and publishes/deletes the owner's workloads."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from meshletd.atproto.testing import MeshletNode
from meshletd.config import Cluster
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import StateStore
from tests.devnet.daemons import fake_runtime_config, start_daemon

_n = itertools.count()


async def get_record(pds: str, did: str, collection: str, rkey: str) -> dict | None:
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"{pds}/xrpc/com.atproto.repo.getRecord",
            params={"repo": did, "collection": collection, "rkey": rkey},
        )
    return r.json()["value"] if r.status_code == 200 else None


class Setup:
    def __init__(
        self, daemon: Daemon, ctl: httpx.AsyncClient, alice, alice_mesh, bob, bob_mesh
    ) -> None:
        self.daemon = daemon
        self.alice, self.alice_mesh, self.bob, self.bob_mesh = alice, alice_mesh, bob, bob_mesh
        # Every successful answer has the shape its lexicon promises (ctl.* included).
        self.ctl = ctl


@pytest.fixture
async def setup(devnet, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Setup]:
    k = next(_n)
    alice = await devnet.create_account_async(f"dnal{k}", pds=0)
    alice_mesh = await devnet.create_account_async(f"dnalm{k}", pds=0)
    bob = await devnet.create_account_async(f"dnbo{k}", pds=1)
    bob_mesh = await devnet.create_account_async(f"dnbom{k}", pds=1)
    # bob's meshlet consents to alice and links both ways (the atproto layer's test node).
    bob_node = MeshletNode(
        plc_url=devnet.plc_url, meshlet=bob_mesh, owner=bob, clusters={"home": [alice.did]}
    )
    assert await bob_node.publish() > 0
    cfg = fake_runtime_config(
        tmp_path,
        alice,
        alice_mesh,
        devnet.plc_url,
        clusters=[Cluster(name="home", members=[bob.did])],
        runtime="auto",
    )
    daemon, ctl = await start_daemon(nursery, cfg, alice, alice_mesh)
    s = Setup(daemon, ctl, alice, alice_mesh, bob, bob_mesh)
    yield s
    await s.ctl.aclose()
    daemon.request_stop()


async def wait_until(predicate, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.1)


async def test_it_publishes_its_records_and_verifies_its_member(setup: Setup) -> None:
    owner_rec = await get_record(
        setup.alice_mesh.pds_url, setup.alice_mesh.did, "commune.scheduler.meshletOwner", "self"
    )
    assert owner_rec is not None and owner_rec["ownerDid"] == setup.alice.did
    membership = await get_record(
        setup.alice_mesh.pds_url, setup.alice_mesh.did, "commune.scheduler.membership", "home"
    )
    # Our own owner is always listed (the scheduler counts bids by membership).
    assert set(membership["members"]) == {setup.bob.did, setup.alice.did}

    async def bob_verified() -> bool:
        members = (await setup.ctl.get("/farm.meshlet.ctl.listMembers")).json()["members"]
        return members[0]["verified"] and members[0]["meshletDids"] == [setup.bob_mesh.did]

    await wait_until(bob_verified)
    # (each answer is checked against its lexicon by the client's response hook)
    status = (await setup.ctl.get("/farm.meshlet.ctl.getStatus")).json()
    assert status["members"] == 1 and status["backend"] == "atproto"


async def test_firehose_cursors_are_kept_in_the_state_store_on_stop(setup: Setup) -> None:
    # A write after start-up: the firehose of our PDS then has a sequence number to keep.
    await setup.ctl.post("/farm.meshlet.drain", json={})
    await trio.sleep(2)
    setup.daemon.request_stop()
    store = StateStore(setup.daemon.cfg.state_dir)

    async def saved() -> bool:
        cursors = store.get("firehose-cursors")
        return bool(cursors) and all(isinstance(v, int) for v in cursors.values())

    await wait_until(saved, 10)
    assert setup.alice_mesh.pds_url in store.get("firehose-cursors")


async def test_run_publishes_the_workload_in_the_owners_repo_and_stop_deletes_it(
    setup: Setup,
) -> None:
    record = {
        "name": "hello",
        "image": "localhost/busybox",
        "resources": {"milliCpu": 100, "memoryMiB": 32},
        "replicas": 1,
        "kind": "job",
    }
    r = await setup.ctl.post("/farm.meshlet.ctl.createWorkload", json={"record": record})
    assert r.status_code == 200, r.text
    uri = r.json()["uri"]
    rkey = uri.rsplit("/", 1)[1]
    assert uri.startswith(f"at://{setup.alice.did}/commune.scheduler.workload/")
    stored = await get_record(
        setup.alice.pds_url, setup.alice.did, "commune.scheduler.workload", rkey
    )
    assert stored["name"] == "hello" and stored["cluster"] == "home"

    listed = (await setup.ctl.get("/farm.meshlet.listWorkloads")).json()["workloads"]
    assert [w["uri"] for w in listed] == [uri]
    again = await setup.ctl.post("/farm.meshlet.ctl.createWorkload", json={"record": record})
    assert again.status_code == 409 and again.json()["error"] == "Conflict"

    r = await setup.ctl.post("/farm.meshlet.deleteWorkload", json={"uri": uri})
    assert r.status_code == 200, r.text
    assert (
        await get_record(setup.alice.pds_url, setup.alice.did, "commune.scheduler.workload", rkey)
        is None
    )


async def test_drain_and_undrain_publish_the_meshlet_state(setup: Setup) -> None:
    r = await setup.ctl.post("/farm.meshlet.drain", json={})
    assert r.json() == {"state": "draining"}
    rec = await get_record(
        setup.alice_mesh.pds_url, setup.alice_mesh.did, "commune.scheduler.meshletOwner", "self"
    )
    assert rec["state"] == "draining"
    r = await setup.ctl.post("/farm.meshlet.undrain", json={})
    assert r.json() == {"state": "active"}
    # The undrain records the drain it ends (docs/protocol.md, section 4) and keeps the
    # fields the scheduler core does not model.
    with trio.fail_after(30):
        while True:
            after = await get_record(
                setup.alice_mesh.pds_url,
                setup.alice_mesh.did,
                "commune.scheduler.meshletOwner",
                "self",
            )
            if after is not None and after["state"] == "active":
                break
            await trio.sleep(0.1)
    assert after["drains"] == [{"since": rec["stateSince"], "until": after["stateSince"]}]
    assert after["encryptionKey"] == rec["encryptionKey"]


async def test_a_drain_outlives_a_restart_of_meshletd(setup: Setup, nursery: trio.Nursery) -> None:
    """An operator drains before maintenance; the reboot must not put the machine back to
    work: the new meshletd starts draining, and the drain keeps its start time."""
    await setup.ctl.post("/farm.meshlet.drain", json={})
    before = await get_record(
        setup.alice_mesh.pds_url, setup.alice_mesh.did, "commune.scheduler.meshletOwner", "self"
    )
    assert before["state"] == "draining"
    old = setup.daemon
    old.request_stop()
    await trio.sleep(1)
    again = Daemon(
        old.cfg, old.credentials, notifier=RecordingNotifier(), handle_signals=False, environ={}
    )
    with trio.fail_after(60):
        await nursery.start(again.run)
    try:
        async with httpx.AsyncClient(
            base_url="http://localhost/xrpc",
            transport=httpx.AsyncHTTPTransport(uds=str(old.cfg.listen.control_socket)),
        ) as ctl:
            status = (await ctl.get("/farm.meshlet.ctl.getStatus")).json()
        assert status["state"] == "draining"
        after = await get_record(
            setup.alice_mesh.pds_url,
            setup.alice_mesh.did,
            "commune.scheduler.meshletOwner",
            "self",
        )
        assert after["state"] == "draining" and after["stateSince"] == before["stateSince"]
    finally:
        again.request_stop()


async def test_with_a_runtime_the_published_workload_runs_here(
    devnet, tmp_path: Path, nursery: trio.Nursery
) -> None:
    k = next(_n)
    alice = await devnet.create_account_async(f"rtal{k}", pds=0)
    alice_mesh = await devnet.create_account_async(f"rtalm{k}", pds=0)
    cfg = fake_runtime_config(tmp_path, alice, alice_mesh, devnet.plc_url)
    daemon, ctl = await start_daemon(nursery, cfg, alice, alice_mesh)
    try:
        record = {
            "name": "sleeper",
            "image": "localhost/busybox:latest",
            "args": ["sleep", "600"],
            "resources": {"milliCpu": 100, "memoryMiB": 32},
            "replicas": 1,
            "kind": "service",
            "bidWindowMs": 1000,
        }
        r = await ctl.post("/farm.meshlet.ctl.createWorkload", json={"record": record})
        assert r.status_code == 200, r.text
        uri = r.json()["uri"]

        async def running_here() -> bool:
            st = (await ctl.get("/farm.meshlet.getWorkloadStatus", params={"uri": uri})).json()
            return any(
                rep.get("meshletDid") == alice_mesh.did and rep["state"] == "running"
                for rep in st.get("replicas", [])
            )

        try:
            await wait_until(running_here, 30)
        except trio.TooSlowError:
            st = await ctl.get("/farm.meshlet.getWorkloadStatus", params={"uri": uri})
            raise AssertionError(f"not running here: {st.text}") from None
        status = (await ctl.get("/farm.meshlet.ctl.getStatus")).json()
        assert status["replicas"] == 1
        bids = (await ctl.get("/farm.meshlet.ctl.getBids", params={"uri": uri})).json()
        assert bids["workload"] == uri
        ledger = (await ctl.get("/farm.meshlet.ctl.getBalance")).json()
        assert ledger["owners"][0]["ownerDid"] == alice.did

        # Our status record reached our PDS through the write queue.
        async def status_published() -> bool:
            async with httpx.AsyncClient() as http:
                got = await http.get(
                    f"{alice_mesh.pds_url}/xrpc/com.atproto.repo.listRecords",
                    params={
                        "repo": alice_mesh.did,
                        "collection": "commune.scheduler.workloadStatus",
                    },
                )
            return any(
                r["value"]["workload"]["uri"] == uri and r["value"]["state"] == "running"
                for r in got.json()["records"]
            )

        await wait_until(status_published, 15)

        r = await ctl.post("/farm.meshlet.deleteWorkload", json={"uri": uri})
        assert r.status_code == 200

        async def none_left() -> bool:
            return (await ctl.get("/farm.meshlet.ctl.getStatus")).json()["replicas"] == 0

        await wait_until(none_left, 30)
    finally:
        await ctl.aclose()
        daemon.request_stop()


async def test_a_member_s_invalid_workload_is_listed_with_the_field_and_the_reason(
    setup: Setup,
) -> None:
    """bob writes to his own repo a workload podman would misread (an image that is an
    option): no meshlet bids on it, and `listWorkloads` names it with the field and why."""
    from meshletd.atproto.pds import PdsClient

    bob = PdsClient(setup.bob.pds_url, setup.bob.did, setup.bob.app_password)
    await bob.login()
    record = {
        "$type": "commune.scheduler.workload",
        "name": "sneaky\u202etxt",
        "image": "--privileged",
        "resources": {"milliCpu": 100, "memoryMiB": 32},
        "replicas": 1,
        "kind": "service",
        "cluster": "home",
        "createdAt": "2026-12-04T05:00:00.000Z",
    }
    r = await bob.session.request(  # without our own validation, as a hostile member would
        "POST",
        "com.atproto.repo.putRecord",
        json={
            "repo": bob.did,
            "collection": "commune.scheduler.workload",
            "rkey": "3kbadimage2aa",
            "record": record,
        },
    )
    assert r.status_code == 200, r.text
    uri = f"at://{setup.bob.did}/commune.scheduler.workload/3kbadimage2aa"

    async def listed() -> bool:
        got = (await setup.ctl.get("/farm.meshlet.listWorkloads")).json()
        return any(w["uri"] == uri for w in got.get("invalid", []))

    await wait_until(listed, 30)
    got = await setup.ctl.get("/farm.meshlet.listWorkloads", params={"owner": setup.bob.did})
    (bad,) = got.json()["invalid"]
    assert bad["ownerDid"] == setup.bob.did and bad["name"] == "sneaky\u202etxt"
    assert bad["problem"]["field"] == "image" and bad["problem"]["reason"]
    assert uri not in [w["uri"] for w in got.json()["workloads"]]


async def test_its_hints_carry_the_proof_its_pds_serves_for_the_record(setup: Setup) -> None:
    from meshletd.atproto.identity import IdentityResolver
    from meshletd.atproto.reader import verify_record_proof
    from meshletd.core.nsid import NSID_MESHLET_OWNER
    from meshletd.daemon.fake_peers import FakePeer, FakePeers
    from meshletd.daemon.peers import RecordRef

    node = setup.daemon.node
    client = node.meshlet_pds
    assert client is not None
    # The meshletOwner record it published at start (a record it hints after each write).
    (rkey, cid), *_ = [(k[1], c) for k, c in client.known.items() if k[0] == NSID_MESHLET_OWNER]
    assert cid is not None
    peer = FakePeer()
    node.peers = FakePeers({"did:plc:peer": peer})
    uri = f"at://{client.did}/{NSID_MESHLET_OWNER}/{rkey}"
    await node._send_hints(client, [RecordRef(uri, cid)], False, ["did:plc:peer"])
    with trio.fail_after(10):
        while not peer.hints:
            await trio.sleep(0.02)
    (hint,) = peer.hints
    assert hint.uri == uri and hint.cid == cid and hint.proof is not None
    key = (await IdentityResolver(setup.daemon.cfg.plc_url).resolve(client.did)).signing_key
    proved = verify_record_proof(hint.proof, client.did, key, NSID_MESHLET_OWNER, rkey)
    assert proved.cid == cid and proved.value is not None
