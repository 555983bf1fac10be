"""A liveness probe connects anew every time (docs/protocol.md section 8): on a pooled
keep-alive connection, a probe of a host that was powered off never meets the 1 s connect
timeout and waits out the 5 s answer timeout instead, which made failovers a probe interval
slower on hosts with their own addresses."""

from __future__ import annotations

import trio

from meshletd.daemon.http_peers import HttpPeers

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_each_probe_opens_its_own_connection_even_when_the_peer_keeps_it_alive() -> None:
    accepted = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        buf = b""
        while True:  # answer every request on this connection, keeping it open
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                await stream.send_all(ANSWER)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: trio.serve_tcp(serve, 0, host="127.0.0.1", task_status=task_status)
        )
        port = listeners[0].socket.getsockname()[1]
        peers = HttpPeers(lambda _did: f"http://127.0.0.1:{port}")
        try:
            assert [await peers.ping("did:plc:peer") for _ in range(3)] == [True] * 3
        finally:
            await peers.aclose()
        assert accepted == 3
        nursery.cancel_scope.cancel()
