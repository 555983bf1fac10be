"""Service auth on the real reference PDS: tokens from `getServiceAuth`, verified by meshletd
against DID documents from the local PLC."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from meshletd.config import Cluster, Config, Control, Listen
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore
from meshletd.xrpc.auth import LEEWAY
from meshletd.xrpc.testing import TokenIssuer

_n = itertools.count()
CAPACITY = "farm.meshlet.getCapacity"


class Peer:
    """Somebody with an account on the devnet PDS who asks it for service-auth tokens."""

    def __init__(self, account, access_jwt: str) -> None:
        self.did = account.did
        self.pds = account.pds_url
        self.jwt = access_jwt

    async def token(self, aud: str, lxm: str | None, exp: int | None = None) -> str:
        params: dict[str, str | int] = {"aud": aud}
        if lxm is not None:
            params["lxm"] = lxm
        if exp is not None:
            params["exp"] = exp
        async with httpx.AsyncClient() as http:
            r = await http.get(
                f"{self.pds}/xrpc/com.atproto.server.getServiceAuth",
                params=params,
                headers={"authorization": f"Bearer {self.jwt}"},
            )
        assert r.status_code == 200, r.text
        return r.json()["token"]


async def login(account) -> Peer:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{account.pds_url}/xrpc/com.atproto.server.createSession",
            json={"identifier": account.did, "password": account.app_password},
        )
    assert r.status_code == 200, r.text
    return Peer(account, r.json()["accessJwt"])


class World:
    def __init__(self, daemon: Daemon, owner: Peer, member: Peer, stranger: Peer) -> None:
        self.daemon = daemon
        self.owner, self.member, self.stranger = owner, member, stranger
        self.did = daemon.cfg.did
        host, port = daemon.tcp_address
        self.base = f"http://{host}:{port}/xrpc"

    async def call(self, nsid: str, token: str | None, body: dict | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient() as http:
            if body is None:
                return await http.get(f"{self.base}/{nsid}", headers=headers)
            return await http.post(f"{self.base}/{nsid}", json=body, headers=headers)


@pytest.fixture
async def world(devnet, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    k = next(_n)
    owner = await devnet.create_account_async(f"xaown{k}", pds=0)
    mesh = await devnet.create_account_async(f"xamesh{k}", pds=0)
    member = await devnet.create_account_async(f"xamem{k}", pds=1)
    stranger = await devnet.create_account_async(f"xastr{k}", pds=1)
    cfg = Config(
        did=mesh.did,
        owner=owner.did,
        pds=mesh.pds_url,
        plc_url=devnet.plc_url,
        clusters=[Cluster(name="home", members=[member.did])],
        listen=Listen(xrpc="127.0.0.1:0", control_socket=tmp_path / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        state_dir=tmp_path / "state",
        backend="memory",
    )
    daemon = Daemon(
        cfg, notifier=RecordingNotifier(), handle_signals=False, environ={}, store=MemoryStore()
    )
    await nursery.start(daemon.run)
    yield World(daemon, await login(owner), await login(member), await login(stranger))
    daemon.request_stop()


def error(resp: httpx.Response) -> str:
    return resp.json().get("error", f"HTTP {resp.status_code}")


async def test_a_valid_token_from_a_member_is_accepted(world: World) -> None:
    resp = await world.call(CAPACITY, await world.member.token(world.did, CAPACITY))
    assert resp.status_code == 200, resp.text
    assert resp.json()["did"] == world.did


async def test_an_expired_token_is_refused(world: World) -> None:
    exp = int(time.time()) + 1
    token = await world.member.token(world.did, CAPACITY, exp=exp)
    await trio.sleep(max(0.0, exp + LEEWAY + 0.5 - time.time()))
    resp = await world.call(CAPACITY, token)
    assert resp.status_code == 401 and error(resp) == "JwtExpired"


async def test_a_token_for_another_meshlet_is_refused(world: World, devnet) -> None:
    other = await devnet.create_account_async(f"xaother{next(_n)}", pds=0)
    resp = await world.call(CAPACITY, await world.member.token(other.did, CAPACITY))
    assert resp.status_code == 401 and error(resp) == "BadJwtAudience"


async def test_a_token_for_another_method_is_refused(world: World) -> None:
    resp = await world.call(CAPACITY, await world.member.token(world.did, "farm.meshlet.ping"))
    assert resp.status_code == 401 and error(resp) == "BadJwtLexiconMethod"


async def test_a_replayed_token_is_refused(world: World) -> None:
    token = await world.member.token(world.did, CAPACITY)
    assert (await world.call(CAPACITY, token)).status_code == 200
    resp = await world.call(CAPACITY, token)
    assert resp.status_code == 401 and error(resp) == "JwtReplayed"


async def test_a_tampered_signature_is_refused(world: World) -> None:
    token = await world.member.token(world.did, CAPACITY)
    head, payload, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    resp = await world.call(CAPACITY, f"{head}.{payload}.{flipped}")
    assert resp.status_code == 401 and error(resp) == "BadJwtSignature"


async def test_a_token_signed_by_someone_else_in_the_members_name_is_refused(
    world: World,
) -> None:
    forged = TokenIssuer(world.member.did).token(world.did, CAPACITY)
    resp = await world.call(CAPACITY, forged)
    assert resp.status_code == 401 and error(resp) == "BadJwtSignature"


async def test_a_verified_stranger_is_forbidden(world: World) -> None:
    resp = await world.call(CAPACITY, await world.stranger.token(world.did, CAPACITY))
    assert resp.status_code == 403 and error(resp) == "Forbidden"


async def test_only_the_workload_owner_may_delete_it(world: World) -> None:
    created = await world.daemon.node.create_workload(
        {
            "name": "web",
            "image": "localhost/busybox",
            "replicas": 1,
            "resources": {"milliCpu": 100, "memoryMiB": 64},
            "kind": "service",
            "cluster": "home",
        }
    )
    uri = created["uri"]
    nsid = "farm.meshlet.deleteWorkload"
    resp = await world.call(nsid, await world.member.token(world.did, nsid), {"uri": uri})
    assert resp.status_code == 403 and error(resp) == "Forbidden"
    resp = await world.call(nsid, await world.owner.token(world.did, nsid), {"uri": uri})
    assert resp.status_code == 200, resp.text
    assert world.daemon.node.workloads() == []


async def test_only_this_meshlets_owner_may_drain_it(world: World) -> None:
    nsid = "farm.meshlet.drain"
    resp = await world.call(nsid, await world.member.token(world.did, nsid), {})
    assert resp.status_code == 403 and error(resp) == "Forbidden"
    resp = await world.call(nsid, await world.owner.token(world.did, nsid), {})
    assert resp.status_code == 200 and resp.json() == {"state": "draining"}
