"""`Peers` in memory: peers that answer as a meshletd would, for unit tests.

Each `FakePeer` is what one meshlet would serve: whether it is up, the secrets it hands to
which caller (already sealed), its replicas' log entries (cursor = how many were seen, as
the in-memory node does), and the hints it received. Errors are the ones the real client
raises: the peer's own (`Forbidden`, `NotFound`, `InvalidRequest`) or `UpstreamFailure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meshletd.daemon.peers import LogPage, LogQuery, RecordRef, ServiceAuth
from meshletd.errors import Forbidden, InvalidRequest, NotFound, UpstreamFailure


@dataclass
class FakePeer:
    up: bool = True
    # (workload uri, secret name) -> (the caller it is sealed for, the sealed value)
    secrets: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    logs: dict[tuple[str, int], list[dict[str, str]]] = field(default_factory=dict)
    hints: list[RecordRef] = field(default_factory=list)
    callers: list[tuple[str, str]] = field(default_factory=list)  # (method, issuer DID)


class FakePeers:
    """Meshlet DID -> `FakePeer`; a DID not in `peers` has no endpoint."""

    def __init__(self, peers: dict[str, FakePeer] | None = None) -> None:
        self.peers: dict[str, FakePeer] = dict(peers or {})

    def _call(self, meshlet: str, method: str, auth: ServiceAuth) -> FakePeer:
        """The peer a call reaches (noting who called), or the client's error."""
        peer = self.peers.get(meshlet)
        if peer is None:
            raise UpstreamFailure(f"{meshlet} publishes no XRPC endpoint")
        if not peer.up:
            raise UpstreamFailure(f"{meshlet} unreachable: connection refused")
        peer.callers.append((method, auth.did))
        return peer

    async def ping(self, meshlet: str) -> bool:
        peer = self.peers.get(meshlet)
        return peer is not None and peer.up

    async def notify_records(self, meshlet: str, refs: Sequence[RecordRef]) -> None:
        peer = self.peers.get(meshlet)
        if peer is not None and peer.up:
            peer.hints.extend(refs)

    async def get_secret(
        self, meshlet: str, workload_uri: str, name: str, *, auth: ServiceAuth
    ) -> bytes:
        peer = self._call(meshlet, "getSecret", auth)
        held = peer.secrets.get((workload_uri, name))
        if held is None:
            raise NotFound(f"secret {name!r} is not stored on this meshlet")
        caller, sealed = held
        if caller != auth.did:
            raise Forbidden(f"{auth.did} holds no slot of {workload_uri}")
        return sealed

    async def get_logs(self, meshlet: str, query: LogQuery, *, auth: ServiceAuth) -> LogPage:
        peer = self._call(meshlet, "getLogs", auth)
        entries = peer.logs.get((query.workload_uri, query.slot))
        if entries is None:
            raise NotFound(f"workload {query.workload_uri} has no replica {query.slot}")
        lines, cursor = query.lines, query.cursor
        if cursor is None:
            start = max(len(entries) - lines, 0)
        elif cursor.isdigit() and int(cursor) <= len(entries):
            start = int(cursor)
        else:
            raise InvalidRequest(f"not a log cursor of this meshlet: {cursor!r}")
        got = entries[start : start + lines]
        return LogPage(tuple(got), str(start + len(got)))
