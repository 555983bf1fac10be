"""The start-up batch waits until every watched repo was read once (docs/protocol.md section
13): a repo whose PDS is unreachable is read again with backoff, and a DID that resolves to
no repo holds nothing back."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from meshletd.atproto.cluster import ClusterFormation, ConfiguredClusters
from meshletd.atproto.identity import IdentityError, IdentityUnreachable

ME, OWNER, BOB, GONE = "did:plc:me", "did:plc:owner", "did:plc:bob", "did:plc:gone"


class FakeFirehose:
    """The formation's view of a firehose: watch, resync, and which repos were read."""

    def __init__(self, unreachable_reads: dict[str, int], absent: set[str]) -> None:
        self.interest = SimpleNamespace(dids=set())
        self.read_once: set[str] = set()
        self.unreachable_reads = dict(unreachable_reads)  # did -> failed reads to come
        self.absent = absent
        self.reads: list[tuple[float, str]] = []

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def watch(self, did: str) -> None:
        if did in self.absent:
            raise IdentityError(f"{did}: unknown DID")
        if did == "did:plc:plcdown":
            raise IdentityUnreachable(f"{did}: resolution failed")
        self.interest.dids.add(did)
        await self.resync_logged(did)

    def unwatch(self, did: str) -> None:
        self.interest.dids.discard(did)

    async def resync_logged(self, did: str) -> None:
        self.reads.append((trio.current_time(), did))
        if self.unreachable_reads.get(did, 0) > 0:
            self.unreachable_reads[did] -= 1
            return  # (logged by the real one)
        self.read_once.add(did)


async def test_the_start_up_batch_waits_for_every_repo_and_retries_with_backoff(
    autojump_clock: Any,
) -> None:
    view = ConfiguredClusters.create(ME, OWNER, {"c": [BOB, GONE]})
    fake = FakeFirehose(unreachable_reads={ME: 3}, absent={GONE})
    formation = ClusterFormation(view, lambda sink: fake)  # type: ignore[arg-type,return-value]
    batches: list[list[Any]] = []
    formation.add_batch_listener(batches.append)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(formation.run)
        done = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert len(batches) == 1
    # Our own repo failed three times: read again after 1, 2 and 4 s (then it answered).
    mine = [round(t - t0) for t, d in fake.reads if d == ME]
    assert mine == [0, 1, 3, 7], mine
    assert 7 <= done < 8
    # The DID that resolves to nothing did not hold the view back.
    assert GONE in formation.absent and formation.unread() == set()


async def test_a_plc_outage_holds_the_view_back(autojump_clock: Any) -> None:
    view = ConfiguredClusters.create(ME, OWNER, {"c": ["did:plc:plcdown"]})
    fake = FakeFirehose(unreachable_reads={}, absent=set())
    formation = ClusterFormation(view, lambda sink: fake)  # type: ignore[arg-type,return-value]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(formation.run)
        await trio.sleep(120)
        assert formation.unread() == {"did:plc:plcdown"}
        assert formation.waiting_for == {"did:plc:plcdown"}
        nursery.cancel_scope.cancel()
