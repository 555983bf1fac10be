"""What replicas may reach at start: the published host policy's grant, else meshlet.toml's
(also while the PDS cannot be read, so that meshletd starts during an outage)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshletd.atproto.pds import PdsUnavailable
from meshletd.core.records import HostPolicy
from meshletd.daemon.local import Local
from meshletd.daemon.publisher import FakePublisher, configured_policy, network_grant
from meshletd.policy_settings import PolicySettings
from tests.unit.daemon_parts import config

pytestmark = pytest.mark.unit


class PdsDown(FakePublisher):
    async def published_policy(self) -> HostPolicy | None:
        raise PdsUnavailable("http://127.0.0.1:1 com.atproto.repo.getRecord: ConnectError")


async def test_without_any_policy_replicas_get_the_internet_only() -> None:
    assert await network_grant(FakePublisher(Local(config())), Local(config())) == "internet"


async def test_the_published_policy_rules_over_meshlet_toml() -> None:
    local = Local(config(policy=PolicySettings(network="lan")))
    publisher = FakePublisher(local)
    configured = configured_policy(local, 1_700_000_000_000)
    assert configured is not None
    await publisher.publish_policy(replace(configured, network="none"))
    assert await network_grant(publisher, local) == "none"


async def test_a_pds_outage_at_start_falls_back_to_meshlet_toml_and_meshletd_runs() -> None:
    local = Local(config(policy=PolicySettings(network="lan")))
    assert await network_grant(PdsDown(local), local) == "lan"
    bare = Local(config())
    assert await network_grant(PdsDown(bare), bare) == "internet"
