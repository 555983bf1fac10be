"""Resolving the devnet's DIDs: did:plc through its PLC, did:web on a localhost port."""

from __future__ import annotations

import json

import trio

from meshletd.atproto.identity import IdentityResolver
from meshletd.atproto.testing import SigningKey, did_doc


async def test_did_plc_accounts_resolve_to_their_pds_and_signing_key(devnet):
    r = IdentityResolver(devnet.plc_url)
    carol = devnet.accounts["carol"]
    ident = await r.resolve(carol.did)
    assert ident.pds == carol.pds_url.rstrip("/")
    assert ident.signing_key.startswith("did:key:z")
    assert ident.handle == carol.handle


async def _serve_did_json(doc_for, task_status=trio.TASK_STATUS_IGNORED):
    """A minimal HTTP/1.0 server for /.well-known/did.json on a free loopback port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream):
        async with stream:
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                req += chunk
            if req.startswith(b"GET /.well-known/did.json "):
                body = json.dumps(doc_for(port)).encode()
                head = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n"
            else:
                body, head = b"", b"HTTP/1.0 404 Not Found\r\n"
            await stream.send_all(head + f"content-length: {len(body)}\r\n\r\n".encode() + body)

    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


async def test_did_web_on_a_localhost_port_resolves(devnet):
    key = SigningKey()

    def doc_for(port):
        did = f"did:web:localhost%3A{port}"
        doc = did_doc(did, key.multikey, devnet.pds_urls[0])
        doc["service"].append(
            {"id": "#meshlet", "type": "MeshletXrpc", "serviceEndpoint": "http://127.0.0.1:7"}
        )
        return doc

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_did_json, doc_for)
        resolver = IdentityResolver(devnet.plc_url, allow_hosts={f"localhost:{port}"})
        ident = await resolver.resolve(f"did:web:localhost%3A{port}")
        nursery.cancel_scope.cancel()
    assert ident.signing_key == key.did_key
    assert ident.pds == devnet.pds_urls[0].rstrip("/")
    assert ident.meshlet_endpoint == "http://127.0.0.1:7"
