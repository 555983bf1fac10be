"""The XRPC app over HTTP, served by hypercorn's trio worker on both transports.

hypercorn (h11 and h2 underneath) speaks HTTP: parsing, keep-alive, `HEAD`, bad requests
answered with their 4xx. This module adds the three things hypercorn has no setting for:

- **A connection budget**, checked at accept: at most `max_connections` in all and
  `max_per_peer` per peer (the IP address on TCP, the uid on the Unix socket). One over
  the budget gets a canned `503` and is closed at once, so a flood of sockets costs us a
  file descriptor for a moment, never for the flood's duration (hypercorn has no such cap:
  pgjones/hypercorn#81). Each transport has its own budget: a TCP flood cannot take the
  control socket with it.
- **The caller's kernel credentials** on the Unix socket (SO_PEERCRED), read once per
  connection at accept. hypercorn's ASGI scope only carries `getpeername()`, so they travel
  in a context variable: trio copies the accepting task's context into the tasks hypercorn
  spawns for each request, so a request sees exactly its own connection's credentials.
- **One scope per connection**: whatever escapes hypercorn's handling of one connection is
  logged and ends that connection only; the listener and the daemon go on. (Serving
  hypercorn's own way, `worker_serve`, runs every connection in one nursery: one exception
  there would end the server.)

Limits of one request: headers up to `max_header_bytes` (`431`), a body up to `max_body`
(`413`) read within `body_timeout` (`408`); a connection idle (or still sending its
headers) for `idle_timeout` is closed, and so is one that does not take our bytes within
`send_timeout` (hypercorn shields its writes from cancellation, so the deadline lives in the
stream we hand it).
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import json
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from meshletd.errors import RateLimited

log = logging.getLogger("meshletd.xrpc.http")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


@dataclass(frozen=True)
class Limits:
    """What one transport accepts: connections, and the size and pace of one request."""

    max_connections: int = 512
    max_per_peer: int = 32
    idle_timeout: float = 20.0
    read_timeout: float = 30.0
    send_timeout: float = 30.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_body: int = 1 << 20
    # The kernel's queue of connections not yet accepted. A flood beyond the caps waits
    # there, ahead of everyone else: a short queue keeps that wait short (the kernel drops
    # the surplus SYNs, and their senders back off), where the system's default (4096)
    # would line a newcomer up behind every surplus socket of the flood.
    backlog: int = 128


# Peers: a commune of a few hundred meshlets, a handful of connections each (httpx pools);
# several meshlets may share one NAT address. The control socket: meshletctl and scripts.
TCP_LIMITS = Limits()
UNIX_LIMITS = Limits(max_connections=64, max_per_peer=32)


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end of a Unix socket (from the kernel, not from the client)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    peercred: PeerCred | None = None
    remote: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(status, json.dumps(payload, separators=(",", ":")).encode())

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json(status, {"error": "InvalidRequest", "message": message})


Handler = Callable[[Request], Awaitable[Response]]


def peercred_of(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    """The kernel's view of the peer of a connected AF_UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: set[int] = {gid}
    try:
        graw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups.update(struct.unpack(f"{len(graw) // 4}I", graw))
    except OSError:
        groups.update(_groups_from_proc(pid))
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=frozenset(groups))


def _groups_from_proc(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


# -- the connection budget --------------------------------------------------------------


class Ticket:
    """One admitted connection: its peer, whether it was ever answered, how to end it."""

    __slots__ = ("answered", "done", "peer")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.answered = False  # set once a request of it was answered by the handler
        self.done = trio.CancelScope()


class ConnectionBudget:
    """Open connections in all and per peer.

    Over the per-peer cap, a newcomer is refused: that peer is the one holding too many.
    Over the total cap, the oldest connection that was never answered (one that connected
    and sent nothing, or never finished its request: what a flood of idle or slow sockets
    looks like) is ended to make room; only when every open connection has been answered
    at least once is the newcomer refused. So a flood from many addresses churns its own
    sockets, and peers that speak HTTP get in.
    """

    def __init__(self, max_connections: int, max_per_peer: int) -> None:
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.refused = 0
        self.evicted = 0
        self._open: dict[Ticket, None] = {}  # insertion order: oldest first
        self._per_peer: dict[str, int] = {}

    @property
    def held(self) -> int:
        return len(self._open)

    def acquire(self, peer: str) -> Ticket | None:
        if self._per_peer.get(peer, 0) >= self.max_per_peer:
            self.refused += 1
            return None
        if len(self._open) >= self.max_connections:
            victim = next((t for t in self._open if not t.answered), None)
            if victim is None:
                self.refused += 1
                return None
            self.evicted += 1
            victim.done.cancel()
            self.release(victim)
        ticket = Ticket(peer)
        self._open[ticket] = None
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give the ticket's place back (a second time has no effect)."""
        if ticket not in self._open:
            return
        del self._open[ticket]
        n = self._per_peer[ticket.peer] - 1
        if n:
            self._per_peer[ticket.peer] = n
        else:
            del self._per_peer[ticket.peer]  # the table holds only peers with open connections

    def held_by(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)


# A stable error name (meshletctl exits 13, "rate limited"), sent without parsing anything.
_REFUSAL_BODY = json.dumps(
    RateLimited("too many connections to this meshlet; retry later").to_xrpc()
).encode()
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


class _RefusalLog:
    """One journal line per burst of refusals, not one per refused socket."""

    def __init__(self, transport: str, every: float = 10.0) -> None:
        self.transport = transport
        self.every = every
        self.since = 0
        self.last = -math.inf

    def note(self, peer: str, budget: ConnectionBudget) -> None:
        self.since += 1
        now = trio.current_time()
        if now - self.last >= self.every:
            log.warning(
                "%s: connection budget full (%d open, %d from %s): refused %d connection(s)",
                self.transport,
                budget.held,
                budget.held_by(peer),
                peer,
                self.since,
            )
            self.last = now
            self.since = 0


# -- the stream hypercorn drives ----------------------------------------------------------


class _GuardedStream(trio.abc.HalfCloseableStream):
    """The socket stream hypercorn drives, with the ends hypercorn leaves open.

    - Writes give up after `send_timeout`: a client that stops reading would otherwise hold
      hypercorn's write (shielded from cancellation), and its connection, forever.
    - When hypercorn closes the stream (an error answered, `connection: close`, a write that
      failed), or the client hangs up between requests, the connection is done: `done` is
      cancelled at once. hypercorn would otherwise keep the task, and the socket, until its
      keep-alive timer ran out (`idle_timeout`). The client's end of stream ends the
      connection too: hypercorn drops the answer to a request whose client half-closed, so
      there is nothing left to wait for.
    """

    def __init__(self, inner: trio.SocketStream, ticket: Ticket, limits: Limits) -> None:
        self._inner = inner
        self._done = ticket.done
        self._send_timeout = limits.send_timeout
        self.socket = inner.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            with trio.fail_after(self._send_timeout):
                await self._inner.send_all(data)
        except trio.TooSlowError:
            await trio.aclose_forcefully(self._inner)
            self._done.cancel()
            raise trio.BrokenResourceError("the client does not read its answer") from None

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        if not data:
            self._done.cancel()
        return data

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._done.cancel()


@dataclass(frozen=True)
class _Connection:
    remote: str
    peercred: PeerCred | None
    ticket: Ticket


_CONNECTION: contextvars.ContextVar[_Connection] = contextvars.ContextVar("xrpc_connection")


# -- the ASGI side -------------------------------------------------------------------------


def asgi_app(handler: Handler, limits: Limits) -> Callable[..., Awaitable[None]]:
    """An ASGI 3 app that reads one bounded request and answers with `handler`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return  # nothing to start or stop; hypercorn's TCPServer sends no lifespan
        if scope["type"] != "http":
            return  # websocket: hypercorn refuses the handshake when the app returns
        body, refusal = await _read_body(receive, limits)
        if refusal is not None:
            # Answer, and keep draining what the client still sends until hypercorn closes
            # the stream: its queue to us is bounded, and a full one would stall the close.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, receive)
                await _send(send, refusal)
            return
        conn = _CONNECTION.get(None)
        client = scope.get("client")
        query: bytes = scope.get("query_string") or b""
        request = Request(
            method=scope["method"],
            path=scope["path"],
            query=parse_qsl(query.decode("latin-1"), keep_blank_values=True),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            body=body,
            peercred=conn.peercred if conn else None,
            remote=conn.remote if conn else (f"{client[0]}:{client[1]}" if client else "?"),
        )
        await _send(send, await handler(request))
        if conn is not None:
            # A request read whole and answered: this connection speaks HTTP to us. (Not
            # hypercorn's own answers: a `100 Continue` or a `400` proves nothing.)
            conn.ticket.answered = True

    return app


async def _read_body(receive: Any, limits: Limits) -> tuple[bytes, Response | None]:
    body = bytearray()
    with trio.move_on_after(limits.body_timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None  # nobody to answer; hypercorn drops a late answer
            body += message.get("body", b"")
            if len(body) > limits.max_body:
                return b"", Response(413, b'{"error":"InvalidRequest","message":"body too large"}')
            if not message.get("more_body", False):
                return bytes(body), None
    return b"", Response.error(408, "request body too slow")


async def _drain(receive: Any) -> None:
    with trio.move_on_after(2):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _send(send: Any, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode()),
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def hypercorn_config(limits: Limits) -> HypercornConfig:
    config = HypercornConfig()
    config.keep_alive_timeout = limits.idle_timeout
    config.read_timeout = math.ceil(limits.read_timeout)
    config.h11_max_incomplete_size = limits.max_header_bytes
    config.h2_max_header_list_size = limits.max_header_bytes
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("meshletd.xrpc.hypercorn")
    return config


# -- serving -------------------------------------------------------------------------------


class XrpcServer:
    """Serves one `handler` on listeners of one transport, within one `ConnectionBudget`.

    `peer_of(stream)` names the connection for the budget and the logs and, on the Unix
    socket, returns the caller's credentials; it may raise `OSError` to refuse.
    """

    def __init__(
        self,
        handler: Handler,
        transport: str,
        limits: Limits,
        peer_of: Callable[[trio.SocketStream], tuple[str, str, PeerCred | None]],
        *,
        asgi: Callable[..., Awaitable[None]] | None = None,
    ) -> None:
        self.transport = transport
        self.limits = limits
        self.budget = ConnectionBudget(limits.max_connections, limits.max_per_peer)
        self.failures = 0
        self._peer_of = peer_of
        self._config = hypercorn_config(limits)
        # `asgi`: another ASGI app behind the same budget and limits (the web page, whose
        # event stream is a response that does not end at once); `handler` is then unused.
        app = asgi if asgi is not None else asgi_app(handler, limits)
        self._app = wrap_app(app, self._config.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)
        self._refusals = _RefusalLog(transport)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on `listeners` until cancelled; `task_status.started` gets them."""
        await trio.serve_listeners(self.connection, listeners, task_status=task_status)

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection; nothing raised here reaches the listener."""
        peer = "?"
        ticket: Ticket | None = None
        try:
            try:
                peer, remote, cred = self._peer_of(stream)
            except OSError as e:
                log.warning("%s: connection refused: no peer identity (%s)", self.transport, e)
                return
            ticket = self.budget.acquire(peer)
            if ticket is None:
                self._refusals.note(peer, self.budget)
                with trio.move_on_after(1):
                    await stream.send_all(_REFUSAL)
                return
            _CONNECTION.set(_Connection(remote, cred, ticket))
            with ticket.done:
                guarded = _GuardedStream(stream, ticket, self.limits)
                # TCPServer is typed for TLS streams; it uses a plain stream's `socket`
                # when the stream has no handshake (as hypercorn's own listener does).
                await TCPServer(
                    self._app,
                    self._config,
                    self._context,
                    ConnectionState({}),
                    guarded,  # type: ignore[arg-type]
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception as e:
            self.failures += 1
            log.warning(
                "%s: connection from %s refused after an error: %s: %s",
                self.transport,
                peer,
                type(e).__name__,
                e,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        finally:
            if ticket is not None:
                self.budget.release(ticket)
            await trio.aclose_forcefully(stream)


def _tcp_peer(stream: trio.SocketStream) -> tuple[str, str, PeerCred | None]:
    addr = stream.socket.getpeername()
    return str(addr[0]), f"{addr[0]}:{addr[1]}", None


def _unix_peer(stream: trio.SocketStream) -> tuple[str, str, PeerCred | None]:
    cred = peercred_of(stream.socket)
    return f"uid={cred.uid}", f"uid={cred.uid}", cred


async def serve_tcp(
    handler: Handler,
    host: str,
    port: int,
    *,
    sockets: list[socket.socket] | None = None,
    limits: Limits = TCP_LIMITS,
    server: list[XrpcServer] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on TCP; `task_status.started` gets the listeners (port 0 picks a free port).
    With `sockets` (already listening, e.g. kept by systemd across a restart), serve those
    instead of binding new ones.

    `server`, when given, receives the `XrpcServer` (tests and benches read its budget).
    """
    if sockets:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=limits.backlog)
    xrpc = XrpcServer(handler, "xrpc", limits, _tcp_peer)
    if server is not None:
        server.append(xrpc)
    await xrpc.serve(listeners, task_status=task_status)


def mark_answered() -> None:
    """For an ASGI app served by `XrpcServer(asgi=...)`: this connection was answered once,
    so the budget keeps it over connections that never spoke HTTP."""
    conn = _CONNECTION.get(None)
    if conn is not None:
        conn.ticket.answered = True


async def serve_asgi_tcp(
    app: Callable[..., Awaitable[None]],
    host: str,
    port: int,
    *,
    transport: str,
    limits: Limits,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app on TCP with the same connection budget and limits as XRPC."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=limits.backlog)

    async def unused(request: Request) -> Response:  # pragma: no cover - asgi= replaces it
        raise AssertionError("served by the ASGI app")

    server = XrpcServer(unused, transport, limits, _tcp_peer, asgi=app)
    await server.serve(listeners, task_status=task_status)


async def open_unix_listener(
    path: Path, *, mode: int = 0o660, group: str | None = None
) -> trio.SocketListener:
    """Bind a Unix stream socket at `path` (replacing a stale one) with mode and group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a restrictive umask, then widen to `mode`: no window where others could
    # connect with permissions we did not intend.
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
        except KeyError:
            pass  # no such group on this host: the socket stays root-only (0600 + owner)
        except PermissionError:
            pass
    os.chmod(path, mode)
    sock.listen(UNIX_LIMITS.backlog)
    return trio.SocketListener(sock)


async def serve_unix(
    handler: Handler,
    path: Path,
    *,
    mode: int = 0o660,
    group: str | None = None,
    limits: Limits = UNIX_LIMITS,
    server: list[XrpcServer] | None = None,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on a Unix socket; every request carries the caller's `PeerCred`."""
    listener = await open_unix_listener(path, mode=mode, group=group)
    xrpc = XrpcServer(handler, "control", limits, _unix_peer)
    if server is not None:
        server.append(xrpc)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(xrpc.serve, [listener])
            task_status.started(listener)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
