"""The small HTTP/1.1 server under both XRPC transports: keep-alive, limits, bad clients."""

from __future__ import annotations

import json

import trio
import trio.testing

from meshletd.xrpc.http import Request, Response, serve_stream


async def echo(request: Request) -> Response:
    return Response.json(
        200, {"path": request.path, "query": request.query, "n": len(request.body)}
    )


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def test_keep_alive_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_stream, server, echo)
    await client.send_all(
        b"GET /xrpc/a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /xrpc/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    )
    raw = await read_all(client)
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [
        {"path": "/xrpc/a", "query": [["x", "1"]], "n": 0},
        {"path": "/xrpc/b", "query": [], "n": 3},
    ]


async def test_a_silent_half_request_is_dropped_after_the_idle_timeout(
    nursery: trio.Nursery, autojump_clock
) -> None:
    client, server = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await serve_stream(server, echo, idle_timeout=5)
        done.set()

    nursery.start_soon(serve)
    await client.send_all(b"GET /xrpc/a HTTP/1.1\r\nHo")
    with trio.fail_after(10):
        await done.wait()
    assert await read_all(client) == b""


async def test_garbage_gets_a_400_with_an_error_name(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_stream, server, echo)
    await client.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    raw = await read_all(client)
    assert raw.startswith(b"HTTP/1.1 400")
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"] == "InvalidRequest"


async def test_a_body_over_the_limit_gets_413(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: serve_stream(server, echo, max_body=10))
    await client.send_all(
        b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    )
    raw = await read_all(client)
    assert raw.startswith(b"HTTP/1.1 413")


async def test_a_client_that_hangs_up_mid_request_does_not_disturb_the_server(
    nursery: trio.Nursery,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    finished = trio.Event()

    async def serve() -> None:
        await serve_stream(server, echo)
        finished.set()

    nursery.start_soon(serve)
    await client.send_all(b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\nabc")
    await client.aclose()
    with trio.fail_after(5):
        await finished.wait()


async def test_cancelling_the_server_mid_request_closes_the_connection() -> None:
    client, server = trio.testing.memory_stream_pair()
    entered = trio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, server, slow)
        await client.send_all(b"GET /xrpc/a HTTP/1.1\r\nHost: h\r\n\r\n")
        await entered.wait()
        nursery.cancel_scope.cancel()
    assert await read_all(client) == b""
