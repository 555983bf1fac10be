"""One PDS's `subscribeRepos` websocket, and the cursor stores and backoff it resumes with.

`PdsSubscription` resumes from the persisted cursor, reconnects with backoff, and handles
each frame in a scope that turns any failure into a logged refusal of that one frame. The
pure frame handling is `meshletd.atproto.frames`; `meshletd.atproto.firehose.Firehose` owns
one subscription per PDS and the anti-entropy pass.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from meshletd import metrics
from meshletd.atproto.frames import FrameDecoder, FrameOutcome, RecordEvent
from meshletd.atproto.identity import IdentityResolverProtocol

log = logging.getLogger("meshletd.firehose")


class CursorStore(Protocol):
    """Where each PDS's firehose cursor survives restarts (the daemon's state dir)."""

    def load(self, pds_url: str) -> int | None: ...
    def save(self, pds_url: str, seq: int) -> None: ...


class MemoryCursorStore:
    def __init__(self) -> None:
        self.cursors: dict[str, int] = {}

    def load(self, pds_url: str) -> int | None:
        return self.cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        self.cursors[pds_url] = seq


class FileCursorStore:
    """Cursors in one small JSON file, replaced atomically."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.cursors: dict[str, int] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self.cursors = {}

    def load(self, pds_url: str) -> int | None:
        return self.cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        self.cursors[pds_url] = seq
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cursors))
        os.replace(tmp, self.path)


EventSink = Callable[[RecordEvent], Awaitable[None]]


@dataclass
class Backoff:
    initial_s: float = 0.2
    max_s: float = 30.0
    current_s: float = 0.0

    def next(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.initial_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


class PdsSubscription:
    """One subscribeRepos connection to one PDS, kept alive for as long as `run` runs."""

    def __init__(
        self,
        pds_url: str,
        decoder: FrameDecoder,
        resolver: IdentityResolverProtocol,
        cursors: CursorStore,
        deliver: Callable[[FrameOutcome], Awaitable[None]],
        *,
        backoff: Backoff | None = None,
        save_every_s: float = 1.0,
        connect: Callable[[str], Any] | None = None,
    ) -> None:
        self.pds_url = pds_url.rstrip("/")
        self.connect = connect or (
            lambda url: open_websocket_url(
                url, max_message_size=8 * 2**20, connect_timeout=10, disconnect_timeout=1
            )
        )
        self.decoder = decoder
        self.resolver = resolver
        self.cursors = cursors
        self.deliver = deliver
        self.backoff = backoff or Backoff()
        self.save_every_s = save_every_s
        self.cursor: int | None = cursors.load(self.pds_url)
        self.connected = trio.Event()
        self.started = trio.Event()  # set after the first connection attempt
        # Pings also tell how current this PDS's stream is (`heard_at`, `Firehose.behind`):
        # a cut path shows as silence within a few pings, long before the timeout.
        self.ping_every_s = 5.0
        self.ping_timeout_s = 15.0
        self.heard_at: float | None = None  # trio time of the last frame or pong; None: down
        self.connections = 0
        self._unsaved = False
        self._ws: Any = None
        self._scope: trio.CancelScope | None = None

    def url(self) -> str:
        base = self.pds_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        url = f"{base}/xrpc/com.atproto.sync.subscribeRepos"
        return url if self.cursor is None else f"{url}?cursor={self.cursor}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            while True:
                reason = "closed"
                self._scope = trio.CancelScope()
                with self._scope:
                    try:
                        async with self.connect(self.url()) as ws:
                            self._ws = ws
                            self.heard_at = trio.current_time()
                            self.connections += 1
                            self.connected.set()
                            log.info(
                                "firehose %s: connected (cursor %s)", self.pds_url, self.cursor
                            )
                            if not started:
                                started = True
                                self.started.set()
                                task_status.started()
                            async with trio.open_nursery() as conn:
                                if hasattr(ws, "ping"):
                                    conn.start_soon(self._heartbeat, ws)
                                await self._read(ws)
                                conn.cancel_scope.cancel()
                    except* (
                        ConnectionClosed,
                        HandshakeError,
                        OSError,
                        trio.BrokenResourceError,
                    ) as group:
                        e = group.exceptions[0]
                        reason = f"{type(e).__name__}: {e}"
                    except* Exception as group:
                        # Anything else (a bad URL, a bug on one frame's path): this
                        # subscription restarts with backoff; the others and the daemon go on.
                        failure: Exception = group.exceptions[0]
                        reason = f"failed: {type(failure).__name__}: {failure}"
                        log.warning(
                            "firehose %s: subscription failed", self.pds_url, exc_info=group
                        )
                    finally:
                        self._ws = None
                        self.heard_at = None
                        self._save(force=True)
                if self._scope.cancelled_caught:
                    reason = "connection dropped"
                self.connected = trio.Event()
                if not started:
                    started = True
                    self.started.set()
                    task_status.started()
                metrics.FIREHOSE_RECONNECTS.inc()
                delay = self.backoff.next()
                log.warning(
                    "firehose %s: disconnected (%s); retry in %.1fs", self.pds_url, reason, delay
                )
                await trio.sleep(delay)
        finally:
            self._save(force=True)

    async def _heartbeat(self, ws: Any) -> None:
        """A quiet PDS sends nothing for minutes; a dead TCP path looks the same. Ping it."""
        while True:
            await trio.sleep(self.ping_every_s)
            with trio.move_on_after(self.ping_timeout_s) as timeout:
                await ws.ping()
                self.heard_at = trio.current_time()
            if timeout.cancelled_caught:
                log.warning("firehose %s: no pong in %.0fs", self.pds_url, self.ping_timeout_s)
                await self.kick()
                return

    async def kick(self) -> None:
        """Drop the current connection abruptly (tests; a stall): `run` reconnects."""
        if self._scope is not None:
            self._scope.cancel()

    async def _read(self, ws: Any) -> None:
        last_save = trio.current_time()
        while True:
            raw = await ws.get_message()
            self.heard_at = trio.current_time()
            if not isinstance(raw, bytes | bytearray):
                continue
            try:
                outcome = await self._process(bytes(raw))
                metrics.firehose_frame(self.pds_url, outcome.time)
                self.backoff.reset()
                await self.deliver(outcome)
            except Exception as e:
                # One frame's failure is that frame's refusal; the stream goes on (and its
                # repo is healed by anti-entropy at the next pass).
                log.warning("firehose %s: frame refused (%s)", self.pds_url, e, exc_info=True)
                continue
            if outcome.seq is not None:
                self.cursor = outcome.seq
                self._unsaved = True
            now = trio.current_time()
            if now - last_save >= self.save_every_s:
                self._save()
                last_save = now

    async def _process(self, raw: bytes) -> FrameOutcome:
        outcome = self.decoder.process(raw)
        if outcome.need_key is not None:
            await self._learn_key(outcome.need_key, fresh=False)
            outcome = self.decoder.process(raw)
        if outcome.bad_signature and outcome.did is not None:
            old = self.decoder.keys.get(outcome.did)
            if await self._learn_key(outcome.did, fresh=True) != old:
                outcome = self.decoder.process(raw)  # the key had rotated
        if outcome.identity_changed is not None:
            await self._learn_key(outcome.identity_changed, fresh=True)
        return outcome

    async def _learn_key(self, did: str, *, fresh: bool) -> str | None:
        try:
            ident = await self.resolver.resolve(did, fresh=fresh)
            key = ident.signing_key
        except Exception as e:
            log.warning("firehose %s: cannot resolve %s: %s", self.pds_url, did, e)
            key = None
        self.decoder.keys[did] = key
        return key

    def _save(self, force: bool = False) -> None:
        if self._unsaved and self.cursor is not None:
            try:
                self.cursors.save(self.pds_url, self.cursor)
            except OSError as e:  # kept unsaved: the next save tries again
                log.warning("firehose %s: cursor not saved: %s", self.pds_url, e)
                return
            self._unsaved = False
