"""The appview: a read-only web page of the commune, served by meshletd from its own view.

An ASGI app served by hypercorn's trio worker behind the same connection budget and limits
as XRPC (`meshletd.xrpc.http.serve_asgi_tcp`), on its own `[web] listen` socket. Pages are
rendered on the server (jinja2, autoescaping on), work without JavaScript, and a small
script (static/live.js, served from here: no CDN, no build step) replaces the page's main
part when `/events` (server-sent events) says the view changed.

Every string on the page may come from another person's records: jinja2 escapes HTML, and
`shown` (the finalize hook) turns control and bidi characters into visible escapes, as
meshletctl does in a terminal.

The change signal is a digest of what the pages show, computed every `poll_s` (0.5 s) by
one task, and only while someone listens to `/events`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import trio

from meshletd.errors import MeshletError, NotFound
from meshletd.web import pages
from meshletd.web.metrics import render_metrics
from meshletd.xrpc.http import Limits, mark_answered

if TYPE_CHECKING:
    from jinja2 import Environment

log = logging.getLogger("meshletd.web")

# A browser opens a few connections and keeps one for the event stream; a handful of people
# may look at one machine's page. The event stream ends before hypercorn's read timeout (a
# client sends nothing while it listens) and the browser reconnects (`retry`).
WEB_LIMITS = Limits(max_connections=64, max_per_peer=16, read_timeout=60.0, max_body=4096)
STREAM_S = 45.0

# C0, DEL, C1 controls, bidi embeddings/overrides/isolates and marks, line separators.
_ESCAPED = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x0A,)},
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
    **{c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x061C, 0x2028, 0x2029)},
    0x0A: "\\n",
    0x09: "\\t",
}


def shown(value: Any) -> Any:
    """Every value printed on a page: strings get their control and bidi characters as
    visible escapes (`\\u202e`), so a name cannot reorder or hide what follows it."""
    if isinstance(value, str):
        return value.translate(_ESCAPED)
    if value is None:
        return ""
    return value


def _short(did: Any) -> str:
    s = str(did)
    return s if len(s) <= 28 else s[:20] + "…" + s[-6:]


def _environment() -> Environment:
    """jinja2 is imported here, on the first page asked for: an idle meshlet whose page
    nobody opens does not carry it (about 2.5 MB of its idle footprint, docs/benchmarks.md)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    here = resources.files("meshletd.web")
    env = Environment(
        loader=FileSystemLoader(str(here / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        finalize=shown,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = lambda v: shown(_short(v))
    env.filters["q"] = lambda v: quote(str(v), safe="")
    return env


_STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_SECURITY_HEADERS = [
    # Only our own script and style; nothing from elsewhere, no frames.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ChangeSignal:
    """A version number that moves when what the pages show changes: one task recomputes a
    digest of the read model every `poll_s` while anyone listens."""

    def __init__(self, digest: Callable[[], bytes], poll_s: float = 0.5) -> None:
        self.digest = digest
        self.poll_s = poll_s
        self.version = 0
        self.listeners = 0
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._last: bytes | None = None

    def check(self) -> bool:
        try:
            d = self.digest()
        except Exception:  # a display aid: never let one bad view stop the stream
            log.exception("web: digest of the view failed")
            return False
        if d != self._last:
            first = self._last is None
            self._last = d
            if not first:
                self.version += 1
                old, self._changed = self._changed, trio.Event()
                old.set()
                return True
        return False

    async def run(self) -> None:
        while True:
            if self.listeners == 0:
                await self._wake.wait()
                self._wake = trio.Event()
            self.check()
            await trio.sleep(self.poll_s)

    async def wait_past(self, version: int) -> int:
        while self.version <= version:
            await self._changed.wait()
        return self.version

    def listen(self) -> None:
        if self.listeners == 0:
            self.check()  # a fresh baseline: changes while nobody listened are not events
        self.listeners += 1
        self._wake.set()

    def unlisten(self) -> None:
        self.listeners -= 1


Send = Callable[[dict[str, Any]], Awaitable[None]]


class WebApp:
    """The ASGI app of the page; `run()` (in the daemon's nursery) drives the change signal."""

    def __init__(self, node: pages.Source, *, poll_s: float = 0.5) -> None:
        self.node = node
        self._env: Environment | None = None
        self.signal = ChangeSignal(self._digest, poll_s)
        self.static: dict[str, bytes] = {}
        base = resources.files("meshletd.web") / "static"
        for name in ("style.css", "live.js", "icon.svg"):
            self.static[name] = (base / name).read_bytes()

    @property
    def env(self) -> Environment:
        if self._env is None:
            self._env = _environment()
        return self._env

    async def run(self) -> None:
        await self.signal.run()

    def _digest(self) -> bytes:
        """What the pages show, reduced to what changes: each slot's host, round and state,
        each meshlet's state and use, each person's verification."""
        slots = [
            (
                w["uri"],
                w.get("paused"),
                [
                    (r.get("slot"), r.get("round"), r.get("meshletDid"), r.get("state"))
                    for r in w.get("running", ())
                ],
            )
            for w in self.node.workloads(None, True)
        ]
        meshlets = [
            (m["meshletDid"], m["state"], m.get("verified"), str(m.get("allocated")))
            for m in pages.meshlets_of(self.node)
        ]
        people = [(p["ownerDid"], p.get("verified"), p.get("reason")) for p in self.node.members()]
        return hashlib.blake2b(repr((slots, meshlets, people)).encode(), digest_size=16).digest()

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = scope["path"]
        query = dict(parse_qsl((scope.get("query_string") or b"").decode("latin-1")))
        mark_answered()
        if method not in ("GET", "HEAD"):
            await self._send(
                send,
                405,
                b"read-only page\n",
                "text/plain; charset=utf-8",
                [(b"allow", b"GET, HEAD")],
            )
            return
        try:
            if path == "/events":
                await self._events(scope, send)
                return
            if path == "/metrics":
                body, ctype = render_metrics(self.node)
                await self._send(send, 200, body, ctype)
                return
            if path == "/favicon.ico":
                path = "/static/icon.svg"
            if path.startswith("/static/"):
                name = path[len("/static/") :]
                data = self.static.get(name)
                if data is None:
                    raise NotFound(f"no static file {name}")
                ctype = _STATIC_TYPES.get(name[name.rfind(".") :], "application/octet-stream")
                await self._send(send, 200, data, ctype, [(b"cache-control", b"max-age=300")])
                return
            html = self.render(path, query)
            await self._send(send, 200, html.encode(), "text/html; charset=utf-8")
        except NotFound as e:
            await self._send(
                send, 404, self._error(404, e.message).encode(), "text/html; charset=utf-8"
            )
        except MeshletError as e:
            await self._send(
                send, 400, self._error(400, e.message).encode(), "text/html; charset=utf-8"
            )

    def render(self, path: str, query: dict[str, str]) -> str:
        """One page's HTML (tests and the bench call this directly)."""
        n = self.node
        state = getattr(n, "state", None)
        common = {
            "me": n.did,
            "owner": n.owner,
            # The header needs only the state: summary() walks every replica.
            "summary": {"state": state() if state is not None else n.summary().get("state")},
            "path": path,
            "version": self.signal.version,
        }
        if path in ("/", "/members"):
            return self._page("members.html", common, pages.members_page(n), "members")
        if path == "/workloads":
            page = query.get("page", "1")
            ctx = pages.workloads_page(
                n,
                query.get("owner", ""),
                query.get("state", ""),
                query.get("meshlet", ""),
                page=int(page) if page.isdigit() and len(page) < 6 else 1,
            )
            return self._page("workloads.html", common, ctx, "workloads")
        if path == "/workload":
            return self._page(
                "workload.html", common, pages.workload_page(n, self._uri(query)), "workloads"
            )
        if path == "/rounds":
            slot = query.get("slot", "")
            s = int(slot) if slot.isdigit() and len(slot) < 5 else None
            ctx = pages.rounds_page(n, self._uri(query), s)
            return self._page("rounds.html", common, ctx, "workloads")
        if path == "/fairshare":
            return self._page("fairshare.html", common, pages.fairshare_page(n), "fairshare")
        raise NotFound(f"no page {path}")

    @staticmethod
    def _uri(query: dict[str, str]) -> str:
        uri = query.get("uri", "")
        if not uri.startswith("at://") or len(uri) > 2048:
            raise NotFound("which workload? (?uri=at://…)")
        return uri

    def _page(self, template: str, common: dict[str, Any], ctx: dict[str, Any], tab: str) -> str:
        return self.env.get_template(template).render(**common, **ctx, tab=tab)

    def _error(self, status: int, message: str) -> str:
        n = self.node
        return self.env.get_template("error.html").render(
            me=n.did,
            owner=n.owner,
            summary={},
            path="",
            version=self.signal.version,
            status=status,
            message=message,
            tab="",
        )

    async def _send(
        self,
        send: Send,
        status: int,
        body: bytes,
        ctype: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            *_SECURITY_HEADERS,
            *(extra or []),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _events(self, scope: dict[str, Any], send: Send) -> None:
        """Server-sent events: `change` with the new version whenever the view changes. The
        stream ends after `STREAM_S` and the browser reconnects with `Last-Event-ID`; a change
        it missed meanwhile is sent at once."""
        last = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"last-event-id" and v.isdigit() and len(v) < 12:
                last = int(v)
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            *_SECURITY_HEADERS,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.signal.listen()
        try:
            seen = self.signal.version
            first = f"retry: 500\nid: {seen}\nevent: hello\ndata: {seen}\n\n"
            if last is not None and last != seen:
                first += f"id: {seen}\nevent: change\ndata: {seen}\n\n"
            await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
            with trio.move_on_after(STREAM_S):
                while True:
                    with trio.move_on_after(15) as idle:
                        seen = await self.signal.wait_past(seen)
                    msg = (
                        ": keep-alive\n\n"
                        if idle.cancelled_caught
                        else (f"id: {seen}\nevent: change\ndata: {seen}\n\n")
                    )
                    await send(
                        {"type": "http.response.body", "body": msg.encode(), "more_body": True}
                    )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.signal.unlisten()


__all__ = ["STREAM_S", "WEB_LIMITS", "ChangeSignal", "WebApp", "shown"]
