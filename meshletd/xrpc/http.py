"""A small HTTP/1.1 server over trio streams (h11), for both XRPC transports.

Why not hypercorn: its trio worker can bind a Unix socket, but the ASGI scope only carries
`getpeername()`, so the control socket could not learn the caller's uid/gid (SO_PEERCRED)
without patching it. XRPC needs little of HTTP: GET and POST, JSON bodies, keep-alive.
h11 (already a dependency of httpx and hypercorn) does the parsing; this module only moves
bytes and enforces limits.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

MAX_BODY = 1 << 20
IDLE_TIMEOUT = 30.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


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


async def _send(stream: trio.abc.Stream, conn: h11.Connection, *events: h11.Event) -> None:
    for ev in events:
        data = conn.send(ev)
        if data:
            await stream.send_all(data)


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, resp: Response) -> None:
    headers = [
        ("content-type", resp.content_type),
        ("content-length", str(len(resp.body))),
        *resp.headers,
    ]
    await _send(
        stream,
        conn,
        h11.Response(status_code=resp.status, headers=headers),
        h11.Data(data=resp.body),
        h11.EndOfMessage(),
    )


async def serve_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    peercred: PeerCred | None = None,
    remote: str = "",
    idle_timeout: float = IDLE_TIMEOUT,
    max_body: int = MAX_BODY,
) -> None:
    """Serve HTTP/1.1 requests on one connection until it closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            head: h11.Request | None = None
            body = bytearray()
            with trio.move_on_after(idle_timeout) as idle:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        head = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > max_body:
                            await _respond(
                                stream,
                                conn,
                                Response.json(
                                    413, {"error": "InvalidRequest", "message": "body too large"}
                                ),
                            )
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
            if idle.cancelled_caught or head is None:
                return
            url = urlsplit(head.target.decode("latin-1"))
            request = Request(
                method=head.method.decode("ascii"),
                path=url.path,
                query=parse_qsl(url.query, keep_blank_values=True),
                headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
                body=bytes(body),
                peercred=peercred,
                remote=remote,
            )
            response = await handler(request)
            await _respond(stream, conn, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError:
        with contextlib.suppress(Exception):
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _respond(
                    stream,
                    conn,
                    Response.json(400, {"error": "InvalidRequest", "message": "bad HTTP"}),
                )
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def serve_tcp(
    handler: Handler,
    host: str,
    port: int,
    *,
    sockets: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on TCP; `task_status.started` gets the listeners (port 0 picks a free port).
    With `sockets` (already listening, e.g. kept by systemd across a restart), serve those
    instead of binding new ones."""
    if sockets:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)

    async def one(stream: trio.SocketStream) -> None:
        try:
            addr = stream.socket.getpeername()
            remote = f"{addr[0]}:{addr[1]}"
        except OSError:
            remote = "?"
        await serve_stream(stream, handler, remote=remote)

    await trio.serve_listeners(one, listeners, task_status=task_status)


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
    sock.listen(128)
    return trio.SocketListener(sock)


async def serve_unix(
    handler: Handler,
    path: Path,
    *,
    mode: int = 0o660,
    group: str | None = None,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on a Unix socket; every request carries the caller's `PeerCred`."""
    listener = await open_unix_listener(path, mode=mode, group=group)

    async def one(stream: trio.SocketStream) -> None:
        try:
            cred = peercred_of(stream.socket)
        except OSError:
            await stream.aclose()
            return
        await serve_stream(stream, handler, peercred=cred, remote=f"uid={cred.uid}")

    try:
        async with trio.open_nursery() as nursery:
            task_status.started(listener)
            await nursery.start(trio.serve_listeners, one, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
