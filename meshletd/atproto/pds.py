"""Writing to our own repo on a PDS, under trio: session, records, batching, write budget.

- `PdsSession`: app-password session (createSession); the access token is refreshed once
  even when many tasks hit its expiry together (a trio.Lock plus a token generation).
- `PdsClient`: get/list/put/delete and `apply_writes` (≤ 200 ops per commit). Every record
  of our own collections is validated against its lexicon before it leaves the process.
  `put` is idempotent: an identical value to what the repo already holds is not written
  (the PDS would create no commit anyway, but would still count points).
- `WriteLedger`: rate-limit points (create 3, update 2, delete 1) per hour and day.

A write whose answer never came (a read timeout, a dropped connection, a gateway's 502/504)
may have been applied: `PdsUnavailable.maybe_applied` says so, and the client looks such
records up before writing them again. Its connections close with a reset (`SO_LINGER` 0):
a request still unsent in the kernel when we give up on it is thrown away, not delivered
when a cut link heals (docs/protocol.md, section 14).

The write queue that sends our writes through a `PdsClient` is in `writequeue.py`.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio

from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.verify import cid_of, cid_str
from meshletd.errors import AuthRequired, InvalidRecord, MeshletError, UpstreamFailure
from meshletd.trace import enabled as trace_enabled
from meshletd.trace import trace

log = logging.getLogger("meshletd.pds")

MAX_BATCH = 200
POINTS = {"create": 3, "update": 2, "delete": 1}


class PdsUnavailable(UpstreamFailure):
    """The PDS could not be reached or failed (5xx, 429): retry later. Answered to clients
    as `UpstreamFailure` (a stable name; `meshletctl stop` during the owner's PDS outage
    used to print InternalError, as the name "PdsUnavailable" is not one of them)."""

    def __init__(
        self, message: str, retry_after_s: float = 0.0, *, maybe_applied: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # The request may have reached the PDS and been applied: only its answer is missing.
        self.maybe_applied = maybe_applied


# The request was sent whole, or in part, when these happened: the PDS may have applied it.
_ANSWER_LOST = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)
# A gateway in front of the PDS gave up waiting for it: the PDS may still apply the request.
_GATEWAY_GAVE_UP = (502, 504)


def _unavailable(what: str, e: httpx.HTTPError) -> PdsUnavailable:
    return PdsUnavailable(
        f"{what}: {type(e).__name__}: {e}", maybe_applied=isinstance(e, _ANSWER_LOST)
    )


def resetting_transport() -> httpx.AsyncHTTPTransport:
    """Connections that close with a reset (`SO_LINGER` on, 0 s). A plain close leaves what
    the kernel has not yet delivered in its send queue, retransmitted for minutes: a write
    we gave up on (its answer timed out while a link was cut) reached the PDS 54 s later,
    when the cut healed, and was applied after its round's deadline (chaos seed 3)."""
    return httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))]
    )


def _retry_after(resp: httpx.Response) -> float:
    """Seconds the PDS asks us to wait (429: `ratelimit-reset` epoch or `retry-after`)."""
    try:
        if "retry-after" in resp.headers:
            return max(0.0, float(resp.headers["retry-after"]))
        if "ratelimit-reset" in resp.headers:
            return max(0.0, float(resp.headers["ratelimit-reset"]) - time.time())
    except ValueError:
        pass
    return 0.0


class PdsRejected(MeshletError):
    """The PDS refused a request as invalid (4xx other than auth and rate limits)."""

    name = "PdsRejected"
    exit_code = 3


@dataclass
class WriteLedger:
    """Counts PDS rate-limit points by hour and by day (UTC, from `clock`)."""

    clock: Callable[[], float] = time.time
    by_hour: dict[int, int] = field(default_factory=dict)
    by_day: dict[int, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=lambda: {"create": 0, "update": 0, "delete": 0})
    commits: int = 0

    def record(self, actions: Sequence[str]) -> int:
        """Count one commit made of `actions`; returns its points."""
        now = self.clock()
        pts = sum(POINTS[a] for a in actions)
        h, d = int(now // 3600), int(now // 86400)
        self.by_hour[h] = self.by_hour.get(h, 0) + pts
        self.by_day[d] = self.by_day.get(d, 0) + pts
        for a in actions:
            self.ops[a] += 1
        self.commits += 1
        for old in [k for k in self.by_hour if k < h - 48]:
            del self.by_hour[old]
        return pts

    def points_this_hour(self) -> int:
        return self.by_hour.get(int(self.clock() // 3600), 0)

    def points_today(self) -> int:
        return self.by_day.get(int(self.clock() // 86400), 0)

    @property
    def total_points(self) -> int:
        return sum(POINTS[a] * n for a, n in self.ops.items())

    def summary(self) -> dict[str, int]:
        return {
            "points_total": self.total_points,
            "points_this_hour": self.points_this_hour(),
            "points_today": self.points_today(),
            "commits": self.commits,
            **{f"{a}s": n for a, n in self.ops.items()},
        }


class PdsSession:
    """An app-password session on one PDS."""

    def __init__(self, pds_url: str, identifier: str, password: str, http: httpx.AsyncClient):
        self.pds_url = pds_url.rstrip("/")
        self.identifier = identifier
        self.password = password
        self.http = http
        self.did: str | None = None
        self.access: str | None = None
        self.refresh_token: str | None = None
        self.generation = 0
        self.refreshes = 0
        self._lock = trio.Lock()

    async def login(self) -> None:
        body = await self._post_raw(
            "com.atproto.server.createSession",
            {"identifier": self.identifier, "password": self.password},
        )
        self._take(body)

    def _take(self, body: dict[str, Any]) -> None:
        self.did = body["did"]
        self.access = body["accessJwt"]
        self.refresh_token = body["refreshJwt"]
        self.generation += 1

    async def _post_raw(
        self, nsid: str, body: dict[str, Any], token: str | None = None
    ) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            r = await self.http.post(f"{self.pds_url}/xrpc/{nsid}", json=body, headers=headers)
        except httpx.HTTPError as e:
            raise _unavailable(f"{self.pds_url} {nsid}", e) from e
        if r.status_code >= 500 or r.status_code == 429:
            raise PdsUnavailable(f"{self.pds_url} {nsid}: {r.status_code} {r.text[:200]}")
        if r.status_code != 200:
            raise AuthRequired(f"{self.pds_url} {nsid}: {r.status_code} {r.text[:200]}")
        answer: dict[str, Any] = r.json()
        return answer

    async def renew(self, seen_generation: int) -> None:
        """Refresh the access token unless another task already did since `seen_generation`."""
        async with self._lock:
            if self.generation != seen_generation and self.access is not None:
                return
            self.refreshes += 1
            try:
                if self.refresh_token is None:
                    raise AuthRequired("no session")
                body = await self._post_raw(
                    "com.atproto.server.refreshSession", {}, token=self.refresh_token
                )
                self._take(body)
            except AuthRequired:
                await self.login()

    async def request(
        self, method: str, nsid: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> httpx.Response:
        """An authenticated XRPC call; renews the session once if the token expired."""
        if self.access is None:
            async with self._lock:
                if self.access is None:
                    await self.login()
        for attempt in range(2):
            gen, token = self.generation, self.access
            try:
                r = await self.http.request(
                    method,
                    f"{self.pds_url}/xrpc/{nsid}",
                    params=params,
                    json=json,
                    headers={"authorization": f"Bearer {token}"},
                )
            except httpx.HTTPError as e:
                raise _unavailable(f"{self.pds_url} {nsid}", e) from e
            expired = r.status_code == 401 or (
                r.status_code == 400 and ("ExpiredToken" in r.text or "InvalidToken" in r.text)
            )
            if expired and attempt == 0:
                await self.renew(gen)
                continue
            return r
        return r


@dataclass(frozen=True)
class Write:
    """One write to our own repo. `put` means create-or-update."""

    action: Literal["put", "create", "update", "delete"]
    collection: str
    rkey: str
    value: dict[str, Any] | None = None
    # Wall-clock ms after which this write must not be made (a bid whose round's deadline
    # passed while the PDS was unreachable: docs/protocol.md, section 14). None: always.
    not_after: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.collection, self.rkey)


def _check(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.status_code >= 500 or resp.status_code == 429:
        raise PdsUnavailable(
            f"{what}: {resp.status_code} {resp.text[:200]}",
            _retry_after(resp),
            maybe_applied=resp.status_code in _GATEWAY_GAVE_UP,
        )
    if resp.status_code in (401, 403):
        raise AuthRequired(f"{what}: {resp.status_code} {resp.text[:200]}")
    if resp.status_code != 200:
        raise PdsRejected(f"{what}: {resp.status_code} {resp.text[:300]}")
    return resp.json() if resp.content else {}


class PdsClient:
    """Our own repo on our PDS."""

    def __init__(
        self,
        pds_url: str,
        identifier: str,
        app_password: str,
        *,
        ledger: WriteLedger | None = None,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.http = http or httpx.AsyncClient(timeout=timeout_s, transport=resetting_transport())
        self.session = PdsSession(pds_url, identifier, app_password, self.http)
        self.ledger = ledger or WriteLedger()
        self.lexicons = default_lexicons()
        # What we know our repo holds: (collection, rkey) -> cid (None = known absent).
        self.known: dict[tuple[str, str], str | None] = {}
        # Records a commit whose answer was lost may have written: looked up before a write.
        self.unsure: set[tuple[str, str]] = set()
        # Called after each commit with (collection, rkey, cid or None) of its ops (the
        # daemon sends delivery hints to its peers from here).
        self.on_commit: Callable[[list[tuple[str, str, str | None]]], None] | None = None
        # Collections listed in full (`prime`): a record of them we do not know is absent,
        # so a put needs no getRecord first. Sound while this client is the only writer of
        # its repo (one meshletd per meshlet DID); a failed create forgets it.
        self.complete: set[str] = set()

    @property
    def did(self) -> str:
        if self.session.did is None:
            # Before the first login (e.g. the PDS is unreachable): a DID given as the
            # identifier is the repo's DID; requests log in on first use.
            if self.session.identifier.startswith("did:"):
                return self.session.identifier
            raise AuthRequired("not logged in")
        return self.session.did

    async def login(self) -> str:
        await self.session.login()
        return self.did

    @classmethod
    async def logged_in(cls, pds_url: str, identifier: str, app_password: str) -> PdsClient:
        """A client of `identifier`'s repo, logged in (raises as `login` does)."""
        client = cls(pds_url, identifier, app_password)
        await client.login()
        return client

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- reads ----------------------------------------------------------------------------
    async def get_record(
        self, collection: str, rkey: str, repo: str | None = None
    ) -> tuple[str, dict[str, Any]] | None:
        """(cid, value) or None."""
        r = await self.session.request(
            "GET",
            "com.atproto.repo.getRecord",
            params={"repo": repo or self.did, "collection": collection, "rkey": rkey},
        )
        if (r.status_code in (400, 404) and "RecordNotFound" in r.text) or r.status_code == 404:
            if repo in (None, self.did):
                self.known[(collection, rkey)] = None
                self.unsure.discard((collection, rkey))
            return None
        body = _check(r, f"getRecord {collection}/{rkey}")
        if repo in (None, self.did):
            self.known[(collection, rkey)] = body["cid"]
            self.unsure.discard((collection, rkey))
        return body["cid"], body["value"]

    async def record_proof(self, collection: str, rkey: str, max_bytes: int) -> bytes | None:
        """The signed proof of one of our records as our PDS serves it to anyone
        (`com.atproto.sync.getRecord`: commit + MST path + record, a CAR), for a delivery
        hint; None when the PDS does not answer it or it is over `max_bytes`."""
        try:
            r = await self.http.get(
                f"{self.session.pds_url}/xrpc/com.atproto.sync.getRecord",
                params={"did": self.did, "collection": collection, "rkey": rkey},
            )
        except httpx.HTTPError:
            return None
        if r.status_code != 200 or len(r.content) > max_bytes:
            return None
        return r.content

    async def list_records(
        self, collection: str, repo: str | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """[(rkey, cid, value)] of one collection (all pages)."""
        out = []
        cursor = None
        while True:
            params = {"repo": repo or self.did, "collection": collection, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            r = await self.session.request("GET", "com.atproto.repo.listRecords", params=params)
            body = _check(r, f"listRecords {collection}")
            for rec in body.get("records", []):
                rkey = rec["uri"].rsplit("/", 1)[1]
                out.append((rkey, rec["cid"], rec["value"]))
                if repo in (None, self.did):
                    self.known[(collection, rkey)] = rec["cid"]
                    self.unsure.discard((collection, rkey))
            cursor = body.get("cursor")
            if not cursor or not body.get("records"):
                return out

    async def prime(self, collections: Sequence[str]) -> None:
        """Learn what our repo holds, so puts know create from update and skip no-ops
        without asking the PDS record by record."""
        for c in collections:
            await self.list_records(c)
            self.complete.add(c)

    # -- writes ---------------------------------------------------------------------------
    def _validate(self, w: Write) -> None:
        if w.action == "delete":
            return
        if w.value is None:
            raise InvalidRecord(f"{w.collection}/{w.rkey}: a {w.action} needs a value")
        if w.collection in self.lexicons.docs:
            self.lexicons.validate_record(w.collection, w.value, rkey=w.rkey)
            self.lexicons.validate_size(w.collection, w.value)

    async def put_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        """Create or update one record; returns its CID. No write if unchanged."""
        results = await self.apply_writes([Write("put", collection, rkey, value)])
        return results[0] or ""

    async def create_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        """Create a record under a fresh key (e.g. a new TID): no lookup first."""
        results = await self.apply_writes([Write("create", collection, rkey, value)])
        return results[0] or ""

    async def delete_record(self, collection: str, rkey: str) -> None:
        await self.apply_writes([Write("delete", collection, rkey)])

    async def _resolve_puts(self, writes: Sequence[Write]) -> list[Write]:
        """Turn each `put` into create/update (or drop it when unchanged)."""
        out: list[Write] = []
        state = dict(self.known)
        for w in writes:
            self._validate(w)
            if w.key not in state:
                if w.key not in self.unsure and (
                    w.action == "create" or w.collection in self.complete
                ):
                    state[w.key] = None  # a fresh key, or a fully listed collection
                else:
                    got = await self.get_record(w.collection, w.rkey)
                    state[w.key] = got[0] if got else None
            cur = state[w.key]
            if w.action == "delete":
                if cur is None:
                    continue
                out.append(w)
                state[w.key] = None
                continue
            new_cid = cid_str(cid_of(w.value))
            if cur == new_cid:
                continue  # identical: the PDS would not commit it anyway
            action: Literal["create", "update"] = "update" if cur is not None else "create"
            out.append(Write(action, w.collection, w.rkey, w.value))
            state[w.key] = new_cid
        return out

    async def apply_writes(self, writes: Sequence[Write]) -> list[str | None]:
        """Apply writes in order, ≤ MAX_BATCH per commit. Returns the CID per input write
        (None for deletes and for no-op puts)."""
        t0 = time.monotonic()
        resolved = await self._resolve_puts(writes)
        if resolved and trace_enabled():
            trace("resolved", ms=round((time.monotonic() - t0) * 1000))
        for i in range(0, len(resolved), MAX_BATCH):
            await self._commit(resolved[i : i + MAX_BATCH])
        return [None if w.action == "delete" else self.known.get(w.key) for w in writes]

    async def _commit(self, batch: Sequence[Write]) -> None:
        if not batch:
            return
        ops = []
        for w in batch:
            op: dict[str, Any] = {
                "$type": f"com.atproto.repo.applyWrites#{w.action}",
                "collection": w.collection,
                "rkey": w.rkey,
            }
            if w.action != "delete":
                op["value"] = w.value
            ops.append(op)
        try:
            r = await self.session.request(
                "POST", "com.atproto.repo.applyWrites", json={"repo": self.did, "writes": ops}
            )
            body = _check(r, f"applyWrites ({len(ops)} ops)")
        except (PdsUnavailable, PdsRejected) as e:
            if isinstance(e, PdsUnavailable) and e.maybe_applied:
                # Written or not: look each record up before it is written again.
                for w in batch:
                    self.known.pop(w.key, None)
                    self.unsure.add(w.key)
                raise
            # A create may have failed because the record exists after all (knowledge we
            # assumed): look such records up again before the retry.
            for w in batch:
                if w.action == "create":
                    self.known.pop(w.key, None)
                    self.complete.discard(w.collection)
            raise
        self.ledger.record([w.action for w in batch])
        results = body.get("results") or []
        for w, res in zip(batch, results + [{}] * (len(batch) - len(results)), strict=True):
            self.known[w.key] = (
                None if w.action == "delete" else res.get("cid") or cid_str(cid_of(w.value))
            )
        trace("written", key=",".join(f"{w.collection}/{w.rkey}" for w in batch))
        if self.on_commit is not None:
            try:
                self.on_commit([(w.collection, w.rkey, self.known.get(w.key)) for w in batch])
            except Exception as e:  # a hint is never worth failing a write for
                log.warning("pds: after-commit hook failed: %s", e)
