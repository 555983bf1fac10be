"""The peer client's contract (meshletd.daemon.testing) on the in-memory peers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from meshletd.daemon.testing import PEERS_CONTRACT, FakePeersHarness, PeersHarness


@pytest.mark.parametrize(
    "contract", PEERS_CONTRACT, ids=lambda c: c.__name__.removeprefix("contract_")
)
async def test_fake_peers_keep_the_peer_contract(
    contract: Callable[[PeersHarness], Awaitable[None]],
) -> None:
    await contract(FakePeersHarness())
