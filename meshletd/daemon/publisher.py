"""This meshlet's own records: the owner link, `meshletOwner` and one membership per cluster.

The publisher is the one place that shapes them. It publishes them at start, after a
reload, and on drain/undrain when this meshlet does not schedule. When it schedules, the
scheduler core rewrites `meshletOwner` itself on drain/undrain (it knows the state and
capacity it acts on); those writes pass through `complete`, which adds the fields only the
daemon holds (encryption key, version, storage), so no write ever drops them.

`OwnRecords` is the Protocol; `PdsPublisher` writes through the PDS clients the root
sets after logging in; `FakePublisher` records what would be published.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from meshletd import __version__
from meshletd.atproto.cluster import publish_own_records
from meshletd.atproto.pds import PdsClient
from meshletd.atproto.records import MeshletOwner, Resources
from meshletd.config import Config
from meshletd.core.records import NSID_MESHLET_OWNER
from meshletd.daemon.local import Local, State
from meshletd.daemon.secrets import EncryptionKey
from meshletd.errors import Forbidden

log = logging.getLogger("meshletd.node")


def membership_lists(cfg: Config) -> dict[str, list[str]]:
    """Cluster name -> the owners our membership record names. Our own owner is listed in
    every one: the scheduler core counts a bid only from meshlets whose membership names
    the workload's owner."""
    return {c.name: list(dict.fromkeys([*c.members, cfg.owner])) for c in cfg.clusters}


def machine_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def complete_owner_record(
    value: dict[str, Any], *, encryption_key: str, storage_mib: int, version: str
) -> dict[str, Any]:
    """A meshletOwner value written by the scheduler core, with the daemon's own fields
    (`encryptionKey`, `version`, `capacity.storageMiB`) that the core does not model."""
    out = dict(value)
    out["encryptionKey"] = encryption_key
    out["version"] = version
    out["capacity"] = {**(out.get("capacity") or {}), "storageMiB": storage_mib}
    if not out.get("endpoint"):
        out.pop("endpoint", None)  # the lexicon wants a URI or nothing
    return out


class OwnRecords(Protocol):
    async def publish(self) -> int:
        """Publish every own record as `Local` says now (idempotent); the number of writes.
        Raises `Forbidden` without a meshlet credential."""
        ...

    async def published_state(self) -> State | None:
        """The state our published meshletOwner record has (None: no record, no login)."""
        ...

    def complete(self, value: dict[str, Any]) -> dict[str, Any]:
        """The core's meshletOwner value with the fields only the daemon knows."""
        ...


class PdsPublisher:
    def __init__(self, local: Local, key: EncryptionKey) -> None:
        self.local = local
        self.key = key
        # The logged-in clients of this meshlet's repo and of its owner's (set by the root).
        self.meshlet: PdsClient | None = None
        self.owner: PdsClient | None = None

    def record(self) -> MeshletOwner:
        cfg = self.local.cfg
        c = cfg.contribution
        return MeshletOwner(
            owner_did=cfg.owner,
            state=self.local.state,
            capacity=Resources(
                milli_cpu=c.milli_cpu, memory_mib=c.memory_mib, storage_mib=c.storage_mib
            ),
            arch=cfg.arch or machine_arch(),
            endpoint=cfg.public_endpoint,
            labels=tuple(cfg.labels),
            encryption_key=self.key.public_b64,
            version=__version__,
        )

    async def publish(self) -> int:
        if self.meshlet is None:
            raise Forbidden("no meshlet-app-password credential: cannot publish the new state")
        writes = await publish_own_records(
            self.meshlet, self.owner, self.record(), membership_lists(self.local.cfg)
        )
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

    def complete(self, value: dict[str, Any]) -> dict[str, Any]:
        return complete_owner_record(
            value,
            encryption_key=self.key.public_b64,
            storage_mib=self.local.cfg.contribution.storage_mib,
            version=__version__,
        )


class FakePublisher:
    """`OwnRecords` in memory: `published` lists the state of each publication."""

    def __init__(self, local: Local, *, can_publish: bool = True) -> None:
        self.local = local
        self.can_publish = can_publish
        self.published: list[State] = []
        self.stored: State | None = None

    async def publish(self) -> int:
        if not self.can_publish:
            raise Forbidden("no meshlet-app-password credential: cannot publish the new state")
        self.published.append(self.local.state)
        self.stored = self.local.state
        return 1

    async def published_state(self) -> State | None:
        return self.stored

    def complete(self, value: dict[str, Any]) -> dict[str, Any]:
        return dict(value)
