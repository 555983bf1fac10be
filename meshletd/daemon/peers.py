"""What this meshlet asks of its peers over XRPC: a small Protocol and its value types.

Four calls, each a `farm.meshlet.*` method of the peer (lexicons/farm/meshlet/):

- `ping`: is the peer up (the scheduler's liveness probes);
- `notify_records`: a delivery hint, "I just wrote these records" (docs/protocol.md
  section 17), best effort;
- `get_secret`: a secret of the peer's owner, sealed to this meshlet (service auth);
- `get_logs`: a replica's log lines from the meshlet that hosts it (service auth, as the
  workload's owner).

Peers are named by meshlet DID; the implementation finds their endpoint. `HttpPeers`
(http_peers.py) is the real one over httpx; `FakePeers` (fake_peers.py) keeps peers in
memory for unit tests. One contract suite (daemon/testing.py) runs on both.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A record a peer just wrote: its at:// URI, unless it was deleted its CID, and the
    signed proof its PDS serves for it (`sync.getRecord`'s CAR), if the writer read it."""

    uri: str
    cid: str | None = None
    proof: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri}
        if self.cid:
            out["cid"] = self.cid
        if self.proof is not None:
            out["proof"] = {"$bytes": base64.b64encode(self.proof).decode().rstrip("=")}
        return out


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which of a replica's log entries: the last `lines`, or at most `lines` of the oldest
    after `cursor` (opaque: the hosting meshlet's, from an earlier `LogPage`)."""

    workload_uri: str
    slot: int
    lines: int
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class LogPage:
    """Some of a replica's log entries (`{line, time?}` as in the getLogs lexicon) and the
    cursor to ask for the entries after them (None from peers that predate cursors)."""

    entries: tuple[dict[str, str], ...]
    cursor: str | None


class ServiceAuth(Protocol):
    """Who signs our calls: a service-auth token for one method of one peer."""

    @property
    def did(self) -> str:
        """The issuer: this meshlet's DID, or its owner's."""
        ...

    async def token(self, aud: str, lxm: str) -> str: ...


class Peers(Protocol):
    async def ping(self, meshlet: str) -> bool:
        """True if the meshlet answers its ping now (False when unknown or unreachable)."""
        ...

    async def notify_records(self, meshlet: str, refs: Sequence[RecordRef]) -> None:
        """Hint the records to the meshlet; never raises (the firehose brings them anyway)."""
        ...

    async def get_secret(
        self, meshlet: str, workload_uri: str, name: str, *, auth: ServiceAuth
    ) -> bytes:
        """The secret `name` of the workload, sealed to `auth.did`'s encryption key.

        Raises the peer's own error (`Forbidden`, `NotFound`, …) when it refuses, and
        `UpstreamFailure` when it cannot be reached."""
        ...

    async def get_logs(self, meshlet: str, query: LogQuery, *, auth: ServiceAuth) -> LogPage:
        """The entries of a replica the meshlet hosts. Errors as `get_secret`."""
        ...
