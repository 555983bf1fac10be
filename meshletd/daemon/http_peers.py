"""`Peers` over HTTP: the real client of other meshlets' XRPC servers (httpx)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from meshletd.core.nsid import GET_LOGS, GET_SECRET, NOTIFY_RECORDS, PING
from meshletd.daemon.peers import LogPage, LogQuery, RecordRef, ServiceAuth
from meshletd.errors import UpstreamFailure, from_xrpc
from meshletd.xrpc.app import from_json

log = logging.getLogger("meshletd.peers")

# Seconds: a probe that takes longer counts as failed; a hint is worth little once late;
# secrets and logs may wait on the peer's journal or PDS.
# A liveness probe fails when the peer's XRPC port cannot be connected to within
# PING_CONNECT_S, or does not answer within PING_ANSWER_S once connected.
# - Connect: 1 s. A powered-off host on a real network answers nothing (no RST as on
#   loopback), so its 5th failure (probe_failures) lands 4 probe intervals (0.5 s) + this
#   timeout after its first started: 3 s of silence; at 2 s the failover took p50 5.6 s on
#   hosts with their own addresses (docs/benchmarks.md).
# - Answer: a peer whose meshletd restarts keeps its listening socket (systemd's file
#   descriptor store), so its probes connect and wait for the new process. Every probe
#   started less than PING_ANSWER_S before the new process answers succeeds; probes
#   overlap, so a restart is suspected once it takes PING_ANSWER_S + 4 probe intervals
#   (7 s); a host that accepts connections but never answers is suspected ~4 s later
#   than one that is gone (docs/protocol.md, sections 8, 9 and 13).
# - A new connection for every probe: a probe sent on a pooled keep-alive connection to a
#   host that was powered off never meets the connect timeout; it waits out PING_ANSWER_S,
#   so the peer's last failure came one probe interval late (chaos on hosts with their own
#   addresses: every watcher held one connection per peer; docs/benchmarks.md).
PING_CONNECT_S = 1.0
PING_ANSWER_S = 5.0
PING_TIMEOUT = httpx.Timeout(PING_ANSWER_S, connect=PING_CONNECT_S)
PROBE_TIMEOUT_S = PING_CONNECT_S + PING_ANSWER_S  # the longest a probe can take
HINT_TIMEOUT_S = 1.0
CALL_TIMEOUT_S = 10.0


class HttpPeers:
    """Calls peers at the endpoint `endpoint_of(meshlet DID)` gives (their meshletOwner
    record's); one connection pool for all of them. `aclose()` when done."""

    def __init__(self, endpoint_of: Callable[[str], str | None]) -> None:
        self._endpoint_of = endpoint_of
        self._http: httpx.AsyncClient | None = None
        self._ping_http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        # Made on first use, inside the trio run that uses it.
        if self._http is None:
            self._http = httpx.AsyncClient()
        return self._http

    @property
    def ping_http(self) -> httpx.AsyncClient:
        """The probes' client: keeps no connection, so each probe connects anew."""
        if self._ping_http is None:
            self._ping_http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
        return self._ping_http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._ping_http is not None:
            await self._ping_http.aclose()
            self._ping_http = None

    def _url(self, meshlet: str, nsid: str) -> str | None:
        endpoint = self._endpoint_of(meshlet)
        return f"{endpoint.rstrip('/')}/xrpc/{nsid}" if endpoint else None

    async def ping(self, meshlet: str) -> bool:
        url = self._url(meshlet, PING)
        if url is None:
            return False
        try:
            r = await self.ping_http.get(url, timeout=PING_TIMEOUT)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def notify_records(self, meshlet: str, refs: Sequence[RecordRef]) -> None:
        url = self._url(meshlet, NOTIFY_RECORDS)
        if url is None:
            return
        body = {"records": [ref.to_json() for ref in refs]}
        try:
            await self.http.post(url, json=body, timeout=HINT_TIMEOUT_S)
        except httpx.HTTPError as e:  # a hint is best effort: the firehose brings it anyway
            log.debug("hint to %s not sent: %s", meshlet, e)

    async def _query(
        self, meshlet: str, nsid: str, params: Mapping[str, str | int], auth: ServiceAuth
    ) -> dict[str, Any]:
        url = self._url(meshlet, nsid)
        if url is None:
            raise UpstreamFailure(f"{meshlet} publishes no XRPC endpoint")
        token = await auth.token(meshlet, nsid)
        try:
            r = await self.http.get(
                url,
                params=dict(params),
                headers={"authorization": f"Bearer {token}"},
                timeout=CALL_TIMEOUT_S,
            )
        except httpx.HTTPError as e:
            raise UpstreamFailure(f"{meshlet} unreachable: {e}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 200:
            raise from_xrpc(body, r.status_code)
        if not isinstance(body, dict):
            raise UpstreamFailure(f"{meshlet} answered {nsid} with no JSON object")
        return body

    async def get_secret(
        self, meshlet: str, workload_uri: str, name: str, *, auth: ServiceAuth
    ) -> bytes:
        body = await self._query(
            meshlet, GET_SECRET, {"workload": workload_uri, "name": name}, auth
        )
        sealed = from_json(body).get("sealed")
        if not isinstance(sealed, bytes):
            raise UpstreamFailure(f"{meshlet} answered getSecret without a sealed value")
        return sealed

    async def get_logs(self, meshlet: str, query: LogQuery, *, auth: ServiceAuth) -> LogPage:
        params: dict[str, str | int] = {
            "uri": query.workload_uri,
            "slot": query.slot,
            "lines": query.lines,
        }
        if query.cursor:
            params["cursor"] = query.cursor
        body = await self._query(meshlet, GET_LOGS, params, auth)
        # A meshlet from before entries and cursors answers `lines` only: no times, and no
        # cursor (a follower then cannot resume; it sees the last lines again).
        raw = body.get("entries") or [{"line": str(x)} for x in body.get("lines", [])]
        entries = tuple(
            {k: str(v) for k, v in e.items() if k in ("line", "time")}
            for e in raw
            if isinstance(e, dict)
        )
        got = body.get("cursor")
        return LogPage(entries, got if isinstance(got, str) else None)
