"""What the runtime keeps in order on the host beside the replicas: the network rules of
the host's grant and the image store's size (docs/runtime.md, "Tenants apart").

A mixin of `ReplicaRuntime` (runtime.py), which calls these from `serve()` and `start()`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from meshletd.runtime.machine import Machine, MachineError
from meshletd.runtime.network import NetworkGrant
from meshletd.runtime.units import RuntimeConfig

log = logging.getLogger("meshletd.runtime")


class HostUpkeep:
    """The network rules and the image store, kept by the runtime."""

    machine: Machine
    config: RuntimeConfig
    _rules_in_force: bool
    _image_seen: dict[str, float]

    async def apply_network_rules(self, *, quiet: bool = False) -> bool:
        """Write and load the network rules for `config.network_grant` (when
        `config.network_rules`); True when they are in force. Until they are, no replica
        with a network starts (`start` tries once more, then fails it)."""
        if not self.config.network_rules:
            return False
        try:
            await self.machine.apply_network_rules(self.config)
        except MachineError as err:
            if self._rules_in_force or not quiet:
                log.error(
                    "network rules (grant %r) not loaded: %s; replicas with a network will "
                    "not start until they are",
                    self.config.network_grant,
                    err,
                )
            self._rules_in_force = False
            return False
        if not quiet or not self._rules_in_force:
            log.info("network rules in force: grant %r", self.config.network_grant)
        self._rules_in_force = True
        return True

    async def keep_image_store_in_bounds(self) -> bool:
        """Past `config.image_store_max_mib`, remove every image no container uses.
        True when it pruned."""
        cap = self.config.image_store_max_mib
        if cap is None:
            return False
        try:
            used = await self.machine.image_store_bytes()
            if used <= cap * 1024 * 1024:
                return False
            await self.machine.prune_images()
            after = await self.machine.image_store_bytes()
        except MachineError as err:
            log.error("could not check or prune the image store: %s", err)
            return False
        self._image_seen.clear()
        log.info(
            "image store at %d MiB, over its %d MiB: unused images removed (%d MiB left)",
            used >> 20,
            cap,
            after >> 20,
        )
        return True

    async def set_network_grant(self, grant: NetworkGrant) -> bool:
        """The host policy's `network` grant changed: new replicas get it (running ones
        keep their podman network; the rules apply to all of them at once)."""
        self.config = replace(self.config, network_grant=grant)
        return await self.apply_network_rules()
