"""The runtime contract (meshletd.runtime.testing) on the in-memory machine."""

from __future__ import annotations

import pytest

from meshletd.runtime.fake import FakeMachine
from meshletd.runtime.testing import CONTRACT, FakeHarness


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda c: c.__name__.removeprefix("contract_"))
async def test_fake_runtime_keeps_the_runtime_contract(contract) -> None:
    await contract(FakeHarness(FakeMachine()))
