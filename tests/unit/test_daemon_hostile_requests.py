"""No request ends meshletd: hostile HTTP against a running daemon, on both transports.

The daemon here is the real `Daemon` (in-memory node), served on a loopback port and a
Unix socket as in production. After each hostile request it must still answer
`farm.meshlet.ping` on both transports. The first tests are the requests that ended
meshletd at db8aa19 (`curl -I`, a target of `//[`); the last one is generated (hypothesis,
seeded): methods, targets, versions, headers, bodies, sent in pieces at a slow pace.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from meshletd.config import Cluster, Config, Control, Listen
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore
from meshletd.xrpc.auth import StaticKeys

PING = b"GET /xrpc/farm.meshlet.ping HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


def config(tmp_path: Path) -> Config:
    return Config(
        did="did:plc:hostilemesh",
        owner="did:plc:alice",
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="friends", members=["did:plc:bob"])],
        listen=Listen(xrpc="127.0.0.1:0", control_socket=tmp_path / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        state_dir=tmp_path / "state",
        backend="memory",
    )


class Target:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def connect(self, kind: str) -> trio.SocketStream:
        if kind == "tcp":
            assert self.daemon.tcp_address is not None
            return await trio.open_tcp_stream(*self.daemon.tcp_address)
        return await trio.open_unix_socket(str(self.daemon.cfg.listen.control_socket))

    async def send(self, kind: str, raw: bytes, *, read_for: float = 5.0) -> bytes:
        """Send `raw` while reading what comes back, until the server closes or `read_for`
        ends (reading as we send: a refusal may come before the last byte is out)."""
        stream = await self.connect(kind)
        out = bytearray()

        async def send_all() -> None:
            try:
                await stream.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                with trio.move_on_after(read_for):
                    try:
                        while chunk := await stream.receive_some(65536):
                            out += chunk
                    except trio.BrokenResourceError:
                        pass  # reset after the server's last word: what we read stands
                nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()
        return bytes(out)

    async def assert_alive(self) -> None:
        for kind in ("tcp", "unix"):
            with trio.fail_after(5):
                raw = await self.send(kind, PING)
            assert raw.startswith(b"HTTP/1.1 200"), (kind, raw[:200])
            assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["did"] == "did:plc:hostilemesh"


async def start_daemon(tmp_path: Path, nursery: trio.Nursery) -> Target:
    daemon = Daemon(
        config(tmp_path),
        notifier=RecordingNotifier(),
        key_resolver=StaticKeys({}),
        handle_signals=False,
        environ={},
        store=MemoryStore(),
    )
    await nursery.start(daemon.run)
    return Target(daemon)


@pytest.fixture
async def target(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Target]:
    t = await start_daemon(tmp_path, nursery)
    yield t
    t.daemon.request_stop()


TRANSPORTS = pytest.mark.parametrize("kind", ["tcp", "unix"])


@TRANSPORTS
async def test_curl_head_is_answered_and_meshletd_lives_on(target: Target, kind: str) -> None:
    raw = await target.send(
        kind, b"HEAD /xrpc/farm.meshlet.ping HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    await target.assert_alive()


@TRANSPORTS
@pytest.mark.parametrize("path", [b"//[", b"//[::1/xrpc/farm.meshlet.ping", b"http://[x"])
async def test_a_target_that_is_no_url_gets_an_answer_and_meshletd_lives_on(
    target: Target, kind: str, path: bytes
) -> None:
    raw = await target.send(
        kind, b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert raw == b"" or raw.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5"))
    await target.assert_alive()


@TRANSPORTS
async def test_garbage_huge_headers_and_huge_bodies_cost_only_their_connection(
    target: Target, kind: str
) -> None:
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 50
    assert (await target.send(kind, tls_hello))[:12] in (b"", b"HTTP/1.1 400")
    assert (await target.send(kind, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 200_000 + b"\r\n\r\n"))[
        :12
    ] == b"HTTP/1.1 431"
    big = (
        b"POST /xrpc/farm.meshlet.notifyRecords HTTP/1.1\r\n"
        b"Host: h\r\nContent-Length: 4000000\r\n\r\n"
    )
    raw = await target.send(kind, big + b"{" * 4_000_000)
    assert raw.startswith(b"HTTP/1.1 413")
    await target.assert_alive()


@TRANSPORTS
async def test_a_slow_sender_does_not_stop_others(target: Target, kind: str) -> None:
    slow = await target.connect(kind)
    await slow.send_all(b"POST /xrpc/farm.meshlet.notifyRecords HTTP/1.1\r\nHost: h\r\n")
    for _ in range(5):
        await slow.send_all(b"X-Slow: 1\r\n")
        await target.assert_alive()
        await trio.sleep(0.05)
    await slow.aclose()


# -- generated requests --------------------------------------------------------------------

METHODS = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE", b"PRI"]
    ),
    st.binary(min_size=0, max_size=8),
)
TARGETS = st.one_of(
    st.sampled_from(
        [
            b"/xrpc/farm.meshlet.ping",
            b"/xrpc/farm.meshlet.ping?x=1&x=2",
            b"/xrpc/farm.meshlet.ctl.getStatus",
            b"/xrpc/farm.meshlet.notifyRecords",
            b"/xrpc/farm.meshlet.getSecret?uri=%00%ff",
            b"/xrpc/farm.meshlet.shutdown",
            b"//[",
            b"*",
            b"http://[::1]:1/xrpc/farm.meshlet.ping",
            b"/%zz%",
            b"/" + b"a" * 20_000,
        ]
    ),
    st.binary(min_size=0, max_size=40),
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b"", b"HTTP/1.1 x"])
HEADER_LINES = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"Host: h",
                b"Content-Length: 5",
                b"Content-Length: -1",
                b"Content-Length: 99999999999999999999",
                b"Content-Length: 3\r\nContent-Length: 4",
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: gzip, chunked",
                b"Expect: 100-continue",
                b"Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x",
                b"Connection: close",
                b"Connection: keep-alive",
                b"Content-Type: application/json",
                b"Content-Type: text/plain",
                b"Authorization: Bearer a.b.c",
                b"Authorization: Basic",
                b" folded: header",
                b"X-Long: " + b"v" * 9000,
            ]
        ),
        st.binary(min_size=0, max_size=30).map(lambda b: b"X-" + b),
    ),
    max_size=6,
)
BODIES = st.one_of(
    st.sampled_from([b"", b"{}", b'{"uri": 1}', b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"[]"]),
    st.binary(max_size=1024),
)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, list[int], float, bool]:
    if draw(st.integers(0, 9)) == 0:
        raw = H2_PREFACE + draw(st.binary(max_size=200))
    else:
        head = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS) + b"\r\n"
        head += b"".join(line + b"\r\n" for line in draw(HEADER_LINES))
        raw = head + (b"\r\n" if draw(st.booleans()) else b"") + draw(BODIES)
        raw = raw * draw(st.sampled_from([1, 1, 1, 2, 3]))  # pipelined repeats
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    pace = draw(st.sampled_from([0.0, 0.0, 0.01, 0.05]))
    keep_reading = draw(st.booleans())
    return raw, cuts, pace, keep_reading


async def send_in_pieces(
    stream: trio.SocketStream, raw: bytes, cuts: list[int], pace: float
) -> None:
    start = 0
    for cut in [*cuts, len(raw)]:
        await stream.send_all(raw[start:cut])
        start = cut
        await trio.sleep(pace)


@TRANSPORTS
@seed(20261204)
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=raw_requests())
async def test_generated_requests_never_end_meshletd(
    tmp_path: Path, kind: str, request: tuple[bytes, list[int], float, bool]
) -> None:
    raw, cuts, pace, keep_reading = request
    async with trio.open_nursery() as nursery:
        target = await start_daemon(tmp_path, nursery)
        stream = await target.connect(kind)
        try:
            await send_in_pieces(stream, raw, cuts, pace)
            if keep_reading:
                with trio.move_on_after(0.2):
                    while await stream.receive_some(65536):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server refused and closed: fine
        finally:
            await stream.aclose()
        await target.assert_alive()
        target.daemon.request_stop()
