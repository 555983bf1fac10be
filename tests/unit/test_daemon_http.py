"""The HTTP server under both XRPC transports: bad clients cost only their own connection.

Each test serves a small handler on a loopback TCP port and on a Unix socket (the same
`serve_tcp`/`serve_unix` the daemon uses) and speaks raw bytes to it. The requests that
ended meshletd at db8aa19 (`HEAD`, a target of `//[`) are here with the rest.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshletd.xrpc import http as xhttp
from meshletd.xrpc.http import Limits, Request, Response, XrpcServer, serve_tcp, serve_unix


async def echo(request: Request) -> Response:
    cred = request.peercred
    return Response.json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "n": len(request.body),
            "uid": cred.uid if cred else None,
        },
    )


@dataclass
class Served:
    """One handler served on both transports; `connect(kind)` opens a raw stream."""

    tcp_port: int
    unix_path: Path
    servers: dict[str, XrpcServer]

    async def connect(self, kind: str) -> trio.SocketStream:
        if kind == "tcp":
            return await trio.open_tcp_stream("127.0.0.1", self.tcp_port)
        return await trio.open_unix_socket(str(self.unix_path))

    async def exchange(self, kind: str, raw: bytes, *, timeout: float = 5) -> bytes:
        """Send `raw`, read until the server closes (no half-close: hypercorn, like many
        servers, drops the answer to a client that has shut down its sending side)."""
        stream = await self.connect(kind)
        with trio.fail_after(timeout):
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass
            return await read_all(stream)

    async def ping(self, kind: str) -> dict:
        raw = await self.exchange(
            kind, b"GET /xrpc/ping?x=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])

    async def drained(self, kind: str, timeout: float = 5) -> None:
        """Every connection of this transport was closed and given back to the budget."""
        budget = self.servers[kind].budget
        with trio.fail_after(timeout):
            while budget.held:
                await trio.sleep(0.01)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    try:
        while chunk := await stream.receive_some(65536):
            out += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()
    return out


async def serve_both(
    nursery: trio.Nursery,
    tmp_path: Path,
    handler: Callable[[Request], Awaitable[Response]] = echo,
    limits: Limits | None = None,
) -> Served:
    tcp: list[XrpcServer] = []
    unix: list[XrpcServer] = []
    tcp_limits = limits or xhttp.TCP_LIMITS
    unix_limits = limits or xhttp.UNIX_LIMITS
    listeners = await nursery.start(
        lambda task_status: serve_tcp(
            handler, "127.0.0.1", 0, limits=tcp_limits, server=tcp, task_status=task_status
        )
    )
    path = tmp_path / "control.sock"
    await nursery.start(
        lambda task_status: serve_unix(
            handler, path, limits=unix_limits, server=unix, task_status=task_status
        )
    )
    port = listeners[0].socket.getsockname()[1]
    return Served(port, path, {"tcp": tcp[0], "unix": unix[0]})


@pytest.fixture
async def served(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Served]:
    yield await serve_both(nursery, tmp_path)


TRANSPORTS = pytest.mark.parametrize("kind", ["tcp", "unix"])


async def read_response(stream: trio.SocketStream) -> bytes:
    """One whole answer (headers and a Content-Length body) from a keep-alive stream."""
    raw = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in raw:
            raw += await stream.receive_some(65536)
        head, _, body = raw.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@TRANSPORTS
async def test_keep_alive_requests_are_answered_in_order(served: Served, kind: str) -> None:
    raw = await served.exchange(
        kind,
        b"GET /xrpc/a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /xrpc/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert [(b["method"], b["path"], b["query"], b["n"]) for b in bodies] == [
        ("GET", "/xrpc/a", [["x", "1"]], 0),
        ("POST", "/xrpc/b", [], 3),
    ]


async def test_the_control_socket_knows_the_callers_uid(served: Served) -> None:
    assert (await served.ping("unix"))["uid"] == os.getuid()
    assert (await served.ping("tcp"))["uid"] is None


@TRANSPORTS
async def test_a_head_request_is_answered_without_a_body_and_the_server_lives_on(
    served: Served, kind: str
) -> None:
    # db8aa19: h11 refused to send the body of a HEAD answer (LocalProtocolError), the error
    # left the connection's task and ended meshletd (`curl -I`).
    raw = await served.exchange(
        kind, b"HEAD /xrpc/ping HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    assert b"content-length:" in head.lower()
    assert (await served.ping(kind))["path"] == "/xrpc/ping"


@TRANSPORTS
@pytest.mark.parametrize(
    "target",
    [b"//[", b"http://[::1", b"/xrpc/\xff\xfe", b"/%ff%00", b"*", b"/x?%zz=%"],
    ids=["bracket", "absolute-bracket", "non-ascii", "bad-escapes", "asterisk", "bad-query"],
)
async def test_odd_targets_cost_only_their_own_connection(
    served: Served, kind: str, target: bytes
) -> None:
    # db8aa19: urlsplit("//[") raised ValueError out of the server and ended meshletd.
    raw = await served.exchange(
        kind, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert raw == b"" or status_of(raw) in (200, 400)
    assert (await served.ping(kind))["path"] == "/xrpc/ping"
    await served.drained(kind)


@TRANSPORTS
async def test_garbage_gets_a_400_and_the_server_lives_on(served: Served, kind: str) -> None:
    raw = await served.exchange(kind, b"NOT HTTP AT ALL\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    stream = await served.connect(kind)
    await stream.send_all(os.urandom(4096))
    await stream.aclose()
    await served.drained(kind)
    assert (await served.ping(kind))["n"] == 0


@TRANSPORTS
async def test_headers_over_the_limit_get_431(served: Served, kind: str) -> None:
    big = b"X-Big: " + b"a" * (64 * 1024) + b"\r\n"
    raw = await served.exchange(kind, b"GET /xrpc/a HTTP/1.1\r\nHost: h\r\n" + big + b"\r\n")
    assert status_of(raw) == 431
    assert (await served.ping(kind))["n"] == 0


@TRANSPORTS
async def test_a_body_over_the_limit_gets_413_without_being_read_whole(
    served: Served, kind: str
) -> None:
    size = 8 << 20
    stream = await served.connect(kind)
    head = b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                try:
                    await stream.send_all(head)
                    for _ in range(size // 65536):
                        await stream.send_all(b"x" * 65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # refused before the end, as it should be

            nursery.start_soon(send)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += await stream.receive_some(65536)
            nursery.cancel_scope.cancel()
    await stream.aclose()
    assert raw.startswith(b"HTTP/1.1 413")
    assert (await served.ping(kind))["n"] == 0
    await served.drained(kind)


@TRANSPORTS
async def test_slow_senders_are_cut_off(nursery: trio.Nursery, tmp_path: Path, kind: str) -> None:
    limits = Limits(idle_timeout=0.5, read_timeout=1, body_timeout=0.5)
    served = await serve_both(nursery, tmp_path, limits=limits)
    # Headers one byte at a time: closed once the connection has been "idle" (no complete
    # request yet) for idle_timeout, however steadily the bytes come.
    header_trickle = await served.connect(kind)
    # A body that never ends: answered 408 after body_timeout.
    body_trickle = await served.connect(kind)
    await body_trickle.send_all(b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
    with trio.fail_after(5):
        try:
            for byte in b"GET /xrpc/a HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 100:
                await header_trickle.send_all(bytes([byte]))
                await body_trickle.send_all(b"y")
                await trio.sleep(0.05)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        assert await read_all(header_trickle) == b""
        assert (await read_all(body_trickle)).startswith(b"HTTP/1.1 408")
    assert (await served.ping(kind))["n"] == 0
    await served.drained(kind)


@TRANSPORTS
async def test_a_client_that_never_reads_its_answer_is_dropped(
    nursery: trio.Nursery, tmp_path: Path, kind: str
) -> None:
    async def huge(request: Request) -> Response:
        return Response(200, b"z" * (32 << 20))

    served = await serve_both(nursery, tmp_path, huge, Limits(send_timeout=0.5))
    stream = await served.connect(kind)
    await stream.send_all(b"GET /xrpc/a HTTP/1.1\r\nHost: h\r\n\r\n")
    # Never read: the server gives up on the write and frees the connection.
    await served.drained(kind, timeout=5)
    await stream.aclose()


@TRANSPORTS
async def test_a_client_that_hangs_up_mid_request_frees_its_connection(
    served: Served, kind: str
) -> None:
    stream = await served.connect(kind)
    await stream.send_all(b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\nabc")
    await stream.aclose()
    await served.drained(kind)
    assert (await served.ping(kind))["n"] == 0


async def test_a_handler_that_raises_costs_only_its_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async def broken(request: Request) -> Response:
        if request.path == "/xrpc/ping":
            return await echo(request)
        raise RuntimeError("boom")

    served = await serve_both(nursery, tmp_path, broken)
    for kind in ("tcp", "unix"):
        raw = await served.exchange(
            kind, b"GET /xrpc/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 500")
        assert (await served.ping(kind))["n"] == 0


@TRANSPORTS
async def test_connections_beyond_the_per_peer_cap_are_refused_with_503(
    nursery: trio.Nursery, tmp_path: Path, kind: str
) -> None:
    served = await serve_both(
        nursery, tmp_path, limits=Limits(max_connections=100, max_per_peer=5, idle_timeout=60)
    )
    idle = [await served.connect(kind) for _ in range(5)]
    await wait_held(served, kind, 5)
    raw = await served.exchange(kind, b"GET /xrpc/ping HTTP/1.1\r\nHost: h\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 503")
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"] == "RateLimited"
    await idle.pop().aclose()
    await wait_held(served, kind, 4)
    assert (await served.ping(kind))["n"] == 0
    for s in idle:
        await s.aclose()


async def test_at_the_total_cap_idle_sockets_make_room_for_peers_that_speak(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limits = Limits(max_connections=20, max_per_peer=1000, idle_timeout=60)
    served = await serve_both(nursery, tmp_path, limits=limits)
    budget = served.servers["tcp"].budget
    # A keep-alive peer that was answered once keeps its place through the flood.
    peer = await served.connect("tcp")
    ask = b"GET /xrpc/ping HTTP/1.1\r\nHost: h\r\n\r\n"
    await peer.send_all(ask)
    assert (await read_response(peer)).startswith(b"HTTP/1.1 200")
    flood = [await served.connect("tcp") for _ in range(60)]  # three times the cap
    with trio.fail_after(5):
        while budget.evicted < 41:
            await trio.sleep(0.01)
    assert budget.held == 20
    # Newcomers that speak HTTP get in (an idle socket makes room), on both transports.
    assert (await served.ping("tcp"))["n"] == 0
    assert (await served.ping("unix"))["uid"] == os.getuid()
    await peer.send_all(ask)
    assert (await read_response(peer)).startswith(b"HTTP/1.1 200")
    for s in [peer, *flood]:
        await s.aclose()
    await served.drained("tcp")


async def test_a_peer_that_fails_before_its_request_is_refused_quietly(
    served: Served,
) -> None:
    # A reset right after connect (RST, no FIN): nothing to answer, nothing to log.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.connect(("127.0.0.1", served.tcp_port))
    sock.close()
    await served.drained("tcp")
    assert (await served.ping("tcp"))["n"] == 0


async def wait_held(served: Served, kind: str, n: int) -> None:
    with trio.fail_after(5):
        while served.servers[kind].budget.held != n:
            await trio.sleep(0.01)


async def test_a_100_continue_does_not_make_a_slow_sender_a_peer_that_keeps_its_place(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limits = Limits(max_connections=5, max_per_peer=100, idle_timeout=60, body_timeout=60)
    served = await serve_both(nursery, tmp_path, limits=limits)
    slow = []
    for _ in range(5):
        s = await served.connect("tcp")
        await s.send_all(
            b"POST /xrpc/a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        assert (await s.receive_some(65536)).startswith(b"HTTP/1.1 100")
        slow.append(s)
    await wait_held(served, "tcp", 5)
    assert (await served.ping("tcp"))["n"] == 0  # one of the slow senders made room
    assert served.servers["tcp"].budget.evicted >= 1
    for s in slow:
        await s.aclose()
