"""The peer client's contract: one suite of behaviours, run on `FakePeers` and `HttpPeers`.

tests/unit/test_daemon_peers.py runs it on the fake; tests/unit/test_daemon_peers_http.py
on the real client against a meshletd XRPC server on loopback. A `PeersHarness` names a
peer that is up and serves one workload (owned by `owner`) with a replica 0 that logged
`LINES` and a secret `SECRET` sealed for `slot_holder`; a peer that is down; a meshlet with
no endpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from meshletd.daemon.fake_peers import FakePeer, FakePeers
from meshletd.daemon.peers import LogQuery, Peers, RecordRef, ServiceAuth
from meshletd.daemon.repo import FakeRepo
from meshletd.errors import Forbidden, MeshletError, NotFound, UpstreamFailure

LINES = ("one", "two", "three")
SECRET = "db"
SEALED = b"sealed for the slot holder"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


@contextmanager
def raises(kind: type[MeshletError]) -> Iterator[None]:
    """The block raises `kind` (pytest is not a dependency of the product)."""
    try:
        yield
    except kind:
        return
    raise AssertionError(f"{kind.__name__} was not raised")


class PeersHarness(Protocol):
    peers: Peers
    live: str
    down: str
    unknown: str
    workload: str
    owner: ServiceAuth  # the workload's owner (may read its logs)
    slot_holder: ServiceAuth  # may have SECRET
    stranger: ServiceAuth  # holds no slot

    async def log(self, line: str) -> None:
        """Replica 0 of `workload` on `live` prints a line."""
        ...

    def hints(self) -> list[RecordRef]:
        """The delivery hints `live` received so far."""
        ...


async def contract_ping_tells_a_live_peer_from_a_down_or_unknown_one(h: PeersHarness) -> None:
    assert await h.peers.ping(h.live)
    assert not await h.peers.ping(h.down)
    assert not await h.peers.ping(h.unknown)


async def contract_hints_reach_a_live_peer_and_never_raise(h: PeersHarness) -> None:
    refs = [
        RecordRef(f"at://{h.owner.did}/commune.scheduler.bid/3k1", CID),
        RecordRef(h.workload),
        # With the proof the writer read (docs/protocol.md section 17): it arrives as sent.
        RecordRef(f"at://{h.owner.did}/commune.scheduler.bid/3k2", CID, bytes(range(256)) * 4),
    ]
    await h.peers.notify_records(h.live, refs)
    await h.peers.notify_records(h.down, refs)
    await h.peers.notify_records(h.unknown, refs)
    assert h.hints() == refs


async def contract_the_slot_holder_gets_the_sealed_secret_others_the_peers_refusal(
    h: PeersHarness,
) -> None:
    got = await h.peers.get_secret(h.live, h.workload, SECRET, auth=h.slot_holder)
    assert got == SEALED
    with raises(Forbidden):
        await h.peers.get_secret(h.live, h.workload, SECRET, auth=h.stranger)
    with raises(NotFound):
        await h.peers.get_secret(h.live, h.workload, "nope", auth=h.slot_holder)


async def contract_unreachable_peers_raise_upstream_failure(h: PeersHarness) -> None:
    for meshlet in (h.down, h.unknown):
        with raises(UpstreamFailure):
            await h.peers.get_secret(meshlet, h.workload, SECRET, auth=h.slot_holder)
        with raises(UpstreamFailure):
            await h.peers.get_logs(meshlet, LogQuery(h.workload, 0, 10), auth=h.owner)


async def contract_logs_page_forward_from_a_cursor(h: PeersHarness) -> None:
    last = await h.peers.get_logs(h.live, LogQuery(h.workload, 0, 2), auth=h.owner)
    assert [e["line"] for e in last.entries] == list(LINES[-2:])
    assert last.cursor is not None
    after = LogQuery(h.workload, 0, 10, last.cursor)
    quiet = await h.peers.get_logs(h.live, after, auth=h.owner)
    assert quiet.entries == () and quiet.cursor == last.cursor
    await h.log("four")
    more = await h.peers.get_logs(h.live, after, auth=h.owner)
    assert [e["line"] for e in more.entries] == ["four"]
    with raises(NotFound):
        await h.peers.get_logs(h.live, LogQuery(h.workload, 7, 10), auth=h.owner)


PEERS_CONTRACT: list[Callable[[PeersHarness], Awaitable[None]]] = [
    contract_ping_tells_a_live_peer_from_a_down_or_unknown_one,
    contract_hints_reach_a_live_peer_and_never_raise,
    contract_the_slot_holder_gets_the_sealed_secret_others_the_peers_refusal,
    contract_unreachable_peers_raise_upstream_failure,
    contract_logs_page_forward_from_a_cursor,
]


class FakePeersHarness:
    """The contract's world in memory."""

    def __init__(self) -> None:
        self.live, self.down, self.unknown = "did:plc:livemesh", "did:plc:downmesh", "did:plc:x"
        self.owner = FakeRepo("did:plc:alice")
        self.slot_holder = FakeRepo("did:plc:bobmesh")
        self.stranger = FakeRepo("did:plc:evemesh")
        self.workload = f"at://{self.owner.did}/commune.scheduler.workload/3kweb"
        self._peer = FakePeer(
            secrets={(self.workload, SECRET): (self.slot_holder.did, SEALED)},
            logs={(self.workload, 0): [{"line": line} for line in LINES]},
        )
        self.peers = FakePeers({self.live: self._peer, self.down: FakePeer(up=False)})

    async def log(self, line: str) -> None:
        self._peer.logs[(self.workload, 0)].append({"line": line})

    def hints(self) -> list[RecordRef]:
        return list(self._peer.hints)
