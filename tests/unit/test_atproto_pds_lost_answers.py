"""A write whose answer is lost may have been applied: the client looks the record up
before it writes it again, and gives up on the request with a reset, so the kernel does
not deliver it later (docs/protocol.md, section 14)."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest
import trio

from meshletd.atproto.pds import PdsClient, PdsUnavailable
from meshletd.atproto.verify import cid_of, cid_str

DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
THING = "x.test.thing"


class AppliesThenTimesOut:
    """A PDS that applies the first applyWrites and times out before it answers."""

    def __init__(self) -> None:
        self.held: dict[str, dict] = {}
        self.applied = 0
        self.lookups = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        nsid = request.url.path.rsplit("/", 1)[1]
        if nsid == "com.atproto.server.createSession":
            return httpx.Response(200, json={"did": DID, "accessJwt": "a", "refreshJwt": "r"})
        if nsid == "com.atproto.repo.getRecord":
            self.lookups += 1
            rkey = request.url.params["rkey"]
            if rkey not in self.held:
                return httpx.Response(400, json={"error": "RecordNotFound"})
            return httpx.Response(200, json={"cid": self.held[rkey]["cid"], "value": {}})
        body = json.loads(request.content)
        for op in body["writes"]:
            if op["$type"].endswith("#create") and op["rkey"] in self.held:
                return httpx.Response(500, json={"error": "InternalServerError"})
            self.held[op["rkey"]] = {"cid": cid_of_value(op["value"])}
        self.applied += 1
        if self.applied == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"results": []})


def cid_of_value(value: dict) -> str:
    return cid_str(cid_of(value))


async def test_a_write_whose_answer_timed_out_is_looked_up_not_written_twice() -> None:
    pds = AppliesThenTimesOut()
    client = PdsClient(
        "http://pds.test", DID, "pw", http=httpx.AsyncClient(transport=httpx.MockTransport(pds))
    )
    client.complete.add(THING)  # listed in full: a key we do not know is absent
    with pytest.raises(PdsUnavailable) as lost:
        await client.put_record(THING, "k1", {"v": 1})
    assert lost.value.maybe_applied
    cid = await client.put_record(THING, "k1", {"v": 1})  # the retry
    assert cid == cid_of_value({"v": 1})
    assert pds.applied == 1 and pds.lookups == 1


async def test_a_write_refused_outright_is_not_looked_up() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("createSession"):
            return httpx.Response(200, json={"did": DID, "accessJwt": "a", "refreshJwt": "r"})
        raise httpx.ConnectError("connection refused", request=request)

    client = PdsClient(
        "http://pds.test", DID, "pw", http=httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    )
    with pytest.raises(PdsUnavailable) as refused:
        await client.put_record(THING, "k1", {"v": 1})
    assert not refused.value.maybe_applied and client.unsure == set()


async def test_the_client_resets_a_connection_it_gives_up_on() -> None:
    """A plain close would leave the unsent request in the kernel, retransmitted until a
    cut link heals; a reset throws it away. Seen from the server: ECONNRESET, not EOF."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                while conn.recv(65536):  # the request; never answered
                    pass
                seen.append("eof")
            except ConnectionResetError:
                seen.append("reset")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = PdsClient(f"http://127.0.0.1:{port}", DID, "pw", timeout_s=0.3)
    with pytest.raises(PdsUnavailable) as lost:
        await client.session.login()
    assert lost.value.maybe_applied
    await client.aclose()
    await trio.to_thread.run_sync(t.join, 5)
    server.close()
    assert seen == ["reset"]
