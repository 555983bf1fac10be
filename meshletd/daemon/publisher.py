"""This meshlet's own records: the owner link, `meshletOwner` and one membership per cluster.

The publisher is the one writer of these records: every value of them is shaped here, from
the configuration (docs/protocol.md, section 4, "One writer of meshletOwner"). It publishes
them at start, after a reload, and on drain/undrain when this meshlet does not schedule.
When it schedules, the scheduler core decides drain and undrain and the state history every
observer judges by (state, stateSince, drains): its `PutRecord(meshletOwner)` is that
decision, which the engine hands to `owner_record` to shape the record, then queues with
the core's other writes, in order.

`OwnRecords` is the Protocol; `PdsPublisher` writes through the PDS clients the root
sets after logging in; `FakePublisher` records what would be published.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Protocol

from meshletd import __version__
from meshletd.atproto.cluster import publish_own_records
from meshletd.atproto.hostpolicy import host_policy_from_json, host_policy_to_json
from meshletd.atproto.pds import PdsClient, PdsRejected, PdsUnavailable
from meshletd.atproto.records import now_datetime
from meshletd.config import Config
from meshletd.core.nsid import NSID_HOST_POLICY, NSID_MESHLET_OWNER
from meshletd.core.records import HostPolicy, MeshletOwner, at_uri, parse_datetime_ms
from meshletd.daemon.local import Local, State
from meshletd.daemon.secrets import EncryptionKey
from meshletd.errors import AuthRequired, Forbidden
from meshletd.policy_settings import same_rules, to_policy
from meshletd.runtime.network import NetworkGrant, grant_of

log = logging.getLogger("meshletd.node")


def membership_lists(cfg: Config) -> dict[str, list[str]]:
    """Cluster name -> the owners our membership record names. Our own owner is listed in
    every one: the scheduler core counts a bid only from meshlets whose membership names
    the workload's owner."""
    return {c.name: list(dict.fromkeys([*c.members, cfg.owner])) for c in cfg.clusters}


def machine_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def self_description(local: Local, encryption_key: str) -> MeshletOwner:
    """The meshletOwner record of this meshlet, from its configuration and state."""
    cfg = local.cfg
    c = cfg.contribution
    return MeshletOwner(
        uri=at_uri(cfg.did, NSID_MESHLET_OWNER, "self"),
        meshlet=cfg.did,
        owner=cfg.owner,
        milli_cpu=c.milli_cpu,
        memory_mib=c.memory_mib,
        storage_mib=c.storage_mib,
        state=local.state,
        arch=cfg.arch or machine_arch(),
        endpoint=cfg.public_endpoint or "",
        labels=frozenset(cfg.labels),
        encryption_key=encryption_key,
        version=__version__,
    )


def decided_state(description: MeshletOwner, decided: MeshletOwner) -> MeshletOwner:
    """`description` in the state the core decided, with the core's state history."""
    return replace(
        description,
        state=decided.state,
        state_since=decided.state_since,
        drains=decided.drains,
        extra=decided.extra,
    )


class OwnRecords(Protocol):
    async def publish(self) -> int:
        """Publish every own record as `Local` says now (idempotent); the number of writes.
        Raises `Forbidden` without a meshlet credential."""
        ...

    async def published_state(self) -> State | None:
        """The state our published meshletOwner record has (None: no record, no login)."""
        ...

    def owner_record(self, decided: MeshletOwner) -> MeshletOwner:
        """The meshletOwner record to write for the core's decision `decided`: this
        meshlet's self-description (configuration, key, version) in the decided state,
        with the decided state history (stateSince, drains)."""
        ...

    async def published_policy(self) -> HostPolicy | None:
        """Our hostPolicy record as published (None: none, or no login)."""
        ...

    async def publish_policy(self, wanted: HostPolicy) -> HostPolicy:
        """Publish `wanted` as our host policy unless the published one says the same
        (then that one stays, with its createdAt); returns the policy in force. Raises
        `Forbidden` without a meshlet credential."""
        ...


def configured_policy(local: Local, now_ms: int) -> HostPolicy | None:
    """The host policy meshlet.toml [policy] asks for (None: no [policy] section)."""
    cfg = local.cfg
    return None if cfg.policy is None else to_policy(cfg.policy, cfg.did, now_ms)


async def network_grant(publisher: OwnRecords, local: Local) -> NetworkGrant:
    """The `network` of our host policy: published, else meshlet.toml's, else the default
    (internet only); what the runtime lets replicas reach (docs/runtime.md). While the PDS
    cannot be read (meshletd started during an outage), meshlet.toml's: the caller applies
    the published one again once the PDS answers."""
    try:
        policy = await publisher.published_policy()
    except (PdsUnavailable, PdsRejected, AuthRequired) as e:
        log.warning("our published host policy cannot be read (%s): using meshlet.toml's", e)
        policy = None
    if policy is None:
        policy = configured_policy(local, _now_ms())
    return "internet" if policy is None else grant_of(policy.network)


def _now_ms() -> int:
    return parse_datetime_ms(now_datetime())


class PdsPublisher:
    def __init__(self, local: Local, key: EncryptionKey) -> None:
        self.local = local
        self.key = key
        # The logged-in clients of this meshlet's repo and of its owner's (set by the root).
        self.meshlet: PdsClient | None = None
        self.owner: PdsClient | None = None

    def record(self) -> MeshletOwner:
        """This meshlet's self-description in its current state (the state history is
        added from the record published before, when published)."""
        return self_description(self.local, self.key.public_b64)

    async def publish(self) -> int:
        if self.meshlet is None:
            raise Forbidden("no meshlet-app-password credential: cannot publish the new state")
        writes = await publish_own_records(
            self.meshlet, self.owner, self.record(), membership_lists(self.local.cfg)
        )
        wanted = configured_policy(self.local, _now_ms())
        if wanted is not None:
            if (await self.publish_policy(wanted)).created_at == wanted.created_at:
                writes += 1
        log.info("published this meshlet's records (%d write(s))", writes)
        return writes

    async def published_state(self) -> State | None:
        if self.meshlet is None:
            return None
        got = await self.meshlet.get_record(NSID_MESHLET_OWNER, "self")
        if got is None:
            return None
        state = got[1].get("state")
        return state if state in ("active", "draining") else None

    def owner_record(self, decided: MeshletOwner) -> MeshletOwner:
        return decided_state(self.record(), decided)

    async def published_policy(self) -> HostPolicy | None:
        if self.meshlet is None:
            return None
        got = await self.meshlet.get_record(NSID_HOST_POLICY, "self")
        if got is None:
            return None
        uri = at_uri(self.local.cfg.did, NSID_HOST_POLICY, "self")
        try:
            return host_policy_from_json(uri, got[1])
        except (KeyError, ValueError, TypeError) as e:
            log.warning("our published hostPolicy record is unreadable (%s): rewriting it", e)
            return None

    async def publish_policy(self, wanted: HostPolicy) -> HostPolicy:
        if self.meshlet is None:
            raise Forbidden("no meshlet-app-password credential: cannot publish the policy")
        last = await self.published_policy()
        if last is not None and same_rules(last, wanted):
            return last
        await self.meshlet.put_record(NSID_HOST_POLICY, "self", host_policy_to_json(wanted))
        log.info("published this meshlet's host policy (createdAt %d)", wanted.created_at)
        return wanted


class FakePublisher:
    """`OwnRecords` in memory: `published` lists the state of each publication."""

    def __init__(self, local: Local, *, can_publish: bool = True) -> None:
        self.local = local
        self.can_publish = can_publish
        self.published: list[State] = []
        self.stored: State | None = None
        self.policy: HostPolicy | None = None

    async def publish(self) -> int:
        if not self.can_publish:
            raise Forbidden("no meshlet-app-password credential: cannot publish the new state")
        self.published.append(self.local.state)
        self.stored = self.local.state
        return 1

    async def published_state(self) -> State | None:
        return self.stored

    async def published_policy(self) -> HostPolicy | None:
        return self.policy

    async def publish_policy(self, wanted: HostPolicy) -> HostPolicy:
        if not self.can_publish:
            raise Forbidden("no meshlet-app-password credential: cannot publish the policy")
        if self.policy is None or not same_rules(self.policy, wanted):
            self.policy = wanted
        return self.policy

    def owner_record(self, decided: MeshletOwner) -> MeshletOwner:
        return decided_state(self_description(self.local, "fake-key"), decided)
