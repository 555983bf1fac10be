"""A secret crosses meshlets: bob's meshlet wins a slot of alice's workload and obtains the
secret from alice's meshlet (service auth, sealed to its key); nobody else can."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import httpx
import trio
from pydantic import SecretStr

from meshletd.config import Cluster, Config, Control, Credentials, Listen
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier

_n = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_for(devnet, tmp: Path, owner, mesh, members: list[str]) -> Daemon:
    port = free_port()
    cfg = Config(
        did=mesh.did,
        owner=owner.did,
        pds=mesh.pds_url,
        plc_url=devnet.plc_url,
        public_endpoint=f"http://127.0.0.1:{port}",
        clusters=[Cluster(name="home", members=members)],
        listen=Listen(xrpc=f"127.0.0.1:{port}", control_socket=tmp / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        state_dir=tmp / "state",
        runtime="fake",
    )
    creds = Credentials(
        meshlet_app_password=SecretStr(mesh.app_password),
        owner_app_password=SecretStr(owner.app_password),
    )
    return Daemon(cfg, creds, notifier=RecordingNotifier(), handle_signals=False, environ={})


def ctl(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url="http://localhost/xrpc",
        transport=httpx.AsyncHTTPTransport(uds=str(d.cfg.listen.control_socket)),
    )


async def wait_until(predicate, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.2)


async def test_only_the_slot_holder_obtains_the_secret(
    devnet, tmp_path: Path, nursery: trio.Nursery
) -> None:
    k = next(_n)
    alice = await devnet.create_account_async(f"scal{k}", pds=0)
    alice_mesh = await devnet.create_account_async(f"scalm{k}", pds=0)
    bob = await devnet.create_account_async(f"scbo{k}", pds=1)
    bob_mesh = await devnet.create_account_async(f"scbom{k}", pds=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    da = daemon_for(devnet, tmp_path / "a", alice, alice_mesh, [bob.did])
    db = daemon_for(devnet, tmp_path / "b", bob, bob_mesh, [alice.did])
    with trio.fail_after(90):
        await nursery.start(da.run)
        await nursery.start(db.run)
    ca, cb = ctl(da), ctl(db)
    try:

        async def both_verified() -> bool:
            # the view of a running node refreshes from the firehose; anti-entropy on watch
            for c in (ca, cb):
                members = (await c.get("/farm.meshlet.ctl.listMembers")).json()["members"]
                if not members[0]["verified"]:
                    await da.node.formation.sync_watches()
                    await db.node.formation.sync_watches()
                    return False
            return True

        await wait_until(both_verified, 30)

        r = await ca.post(
            "/farm.meshlet.putSecret", json={"name": "db", "value": {"$bytes": "aHVudGVyMg=="}}
        )
        assert r.status_code == 200, r.text
        record = {
            "name": "uses-secret",
            "image": "localhost/busybox:latest",
            "args": ["sleep", "600"],
            "resources": {"milliCpu": 100, "memoryMiB": 32},
            "replicas": 1,
            "kind": "service",
            "bidWindowMs": 1000,
            "secrets": [{"name": "db"}],
            "constraints": {"avoidMeshlets": [alice_mesh.did]},
        }
        r = await ca.post("/farm.meshlet.ctl.createWorkload", json={"record": record})
        assert r.status_code == 200, r.text
        uri = r.json()["uri"]

        async def running_on_bob() -> bool:
            return (await cb.get("/farm.meshlet.ctl.getStatus")).json()["replicas"] == 1

        await wait_until(running_on_bob, 60)
        machine = db.node.engine.runtime.machine
        with trio.fail_after(10):
            while not machine.containers:
                await trio.sleep(0.1)
        (container,) = machine.containers.values()
        assert list(container.secrets.values()) == [b"hunter2"]
        assert "hunter2" not in " ".join(container.args)

        # alice reads its logs through her own meshlet, which asks bob's as alice.
        logs = await ca.get("/farm.meshlet.getLogs", params={"uri": uri, "slot": 0})
        assert logs.status_code == 200, logs.text
        assert isinstance(logs.json()["lines"], list)

        # alice's own meshlet holds no slot: the owner's meshlet refuses even itself.
        token_for_alice_mesh = await da.node.meshlet_pds.session.request(
            "GET",
            "com.atproto.server.getServiceAuth",
            params={"aud": alice_mesh.did, "lxm": "farm.meshlet.getSecret"},
        )
        host, port = da.tcp_address
        async with httpx.AsyncClient() as http:
            refused = await http.get(
                f"http://{host}:{port}/xrpc/farm.meshlet.getSecret",
                params={"workload": uri, "name": "db"},
                headers={"authorization": f"Bearer {token_for_alice_mesh.json()['token']}"},
            )
        assert refused.status_code == 403 and refused.json()["error"] == "Forbidden"
        assert "hunter2" not in refused.text
    finally:
        await ca.aclose()
        await cb.aclose()
        da.request_stop()
        db.request_stop()
