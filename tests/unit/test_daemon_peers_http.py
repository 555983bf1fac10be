"""The peer client's contract (meshletd.daemon.testing) on the real client: `HttpPeers`
calling a meshletd XRPC server on loopback, with real service-auth tokens."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from meshletd.config import Cluster, Config, Control, Listen
from meshletd.daemon.fake_node import InMemoryNode
from meshletd.daemon.http_peers import HttpPeers
from meshletd.daemon.peers import RecordRef
from meshletd.daemon.service import Daemon
from meshletd.daemon.testing import LINES, PEERS_CONTRACT, SEALED, SECRET, PeersHarness
from meshletd.errors import Forbidden, NotFound
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore
from meshletd.xrpc.auth import StaticKeys
from meshletd.xrpc.testing import TokenIssuer

LIVE, OWNER = "did:plc:livemesh", "did:plc:alice"
SLOT_HOLDER, STRANGER = "did:plc:bobmesh", "did:plc:evemesh"


class ServingNode(InMemoryNode):
    """The in-memory node, serving one secret to one slot holder and keeping the hints."""

    def __init__(self) -> None:
        super().__init__(LIVE, OWNER, members=[SLOT_HOLDER])
        self.hints: list[RecordRef] = []

    def notify_records(self, refs: list[dict[str, Any]]) -> int:
        self.hints.extend(RecordRef(r["uri"], r.get("cid"), r.get("proof")) for r in refs)
        return len(refs)

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        if name != SECRET:
            raise NotFound(f"secret {name!r} is not stored on this meshlet")
        if caller_did != SLOT_HOLDER:
            raise Forbidden(f"{caller_did} holds no slot of {workload_uri}")
        return SEALED


class IssuerAuth:
    """`ServiceAuth` signing like a PDS would, with a key the server knows."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.issuer = issuer

    @property
    def did(self) -> str:
        return self.issuer.did

    async def token(self, aud: str, lxm: str) -> str:
        return self.issuer.token(aud, lxm)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpHarness:
    def __init__(self, node: ServingNode, endpoint: str, issuers: dict[str, TokenIssuer]) -> None:
        self.node = node
        self.endpoint = endpoint
        self.live, self.down, self.unknown = LIVE, "did:plc:downmesh", "did:plc:nowhere"
        endpoints = {LIVE: endpoint, self.down: f"http://127.0.0.1:{closed_port()}"}
        self.peers = HttpPeers(endpoints.get)
        self.owner = IssuerAuth(issuers[OWNER])
        self.slot_holder = IssuerAuth(issuers[SLOT_HOLDER])
        self.stranger = IssuerAuth(issuers[STRANGER])
        self.workload = ""

    async def log(self, line: str) -> None:
        self.node.log(self.workload, line)

    def hints(self) -> list[RecordRef]:
        return list(self.node.hints)


@pytest.fixture
async def harness(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[HttpHarness]:
    issuers = {did: TokenIssuer(did) for did in (OWNER, SLOT_HOLDER, STRANGER)}
    node = ServingNode()
    cfg = Config(
        did=LIVE,
        owner=OWNER,
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="home", members=[SLOT_HOLDER])],
        listen=Listen(xrpc="127.0.0.1:0", control_socket=tmp_path / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        state_dir=tmp_path / "state",
        backend="memory",
    )
    daemon = Daemon(
        cfg,
        node=node,
        notifier=RecordingNotifier(),
        key_resolver=StaticKeys({did: i.did_key for did, i in issuers.items()}),
        handle_signals=False,
        environ={},
        store=MemoryStore(),
    )
    await nursery.start(daemon.run)
    assert daemon.tcp_address is not None
    host, port = daemon.tcp_address
    h = HttpHarness(node, f"http://{host}:{port}", issuers)
    created = await node.create_workload(
        {
            "name": "web",
            "image": "localhost/busybox:latest",
            "kind": "service",
            "cluster": "home",
            "replicas": 1,
            "resources": {"milliCpu": 100, "memoryMiB": 64},
        }
    )
    h.workload = created["uri"]
    for line in LINES:
        node.log(h.workload, line)
    yield h
    await h.peers.aclose()
    daemon.request_stop()


@pytest.mark.parametrize(
    "contract", PEERS_CONTRACT, ids=lambda c: c.__name__.removeprefix("contract_")
)
async def test_http_peers_keep_the_peer_contract_against_a_meshletd(
    contract: Callable[[PeersHarness], Awaitable[None]], harness: HttpHarness
) -> None:
    await contract(harness)


async def test_a_hint_whose_proof_is_over_the_bound_is_refused_naming_the_field(
    harness: HttpHarness,
) -> None:
    import base64

    import httpx

    url = f"{harness.endpoint}/xrpc/farm.meshlet.notifyRecords"
    big = base64.b64encode(b"x" * 16385).decode()
    ref = {"uri": f"at://{OWNER}/commune.scheduler.bid/3k1", "proof": {"$bytes": big}}
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json={"records": [ref]})
    assert r.status_code == 400
    assert r.json()["error"] == "InvalidRequest"
    assert "proof" in r.json()["message"] and "16384" in r.json()["message"]
    assert harness.hints() == []
