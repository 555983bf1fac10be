"""What the runtime keeps in order on the host beside the replicas: the network rules of
the host's grant, the image store's size (docs/runtime.md, "Tenants apart") and the copies
of images the next replicas' user namespaces need (docs/runtime.md, "User namespaces").

A mixin of `ReplicaRuntime` (runtime.py), which calls these from `serve()` and `start()`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

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
    # Starts between their image step and their container (which then uses the image):
    # the store is not pruned meanwhile, and a start waits for a prune under way. Else a
    # prune could remove the image a start has just found or pulled (`--pull=never`).
    _images_in_use: int
    _prune_lock: trio.Lock
    # Images a replica of which started, whose copies for the next ranges are yet to make.
    _warm_send: trio.MemorySendChannel[str]
    _warm_queue: trio.MemoryReceiveChannel[str]
    _warm_pending: set[str]
    # image -> how many replicas the host held at its last warm-up: until it holds more,
    # the ranges a next replica can get have their copy already (a new range is only
    # needed past the most replicas held at once; replicas of other images can free
    # ranges without this image's copy, so this is a good guess, not a proof).
    _warm_held: dict[str, int]
    namespaces_warmed: int  # warm-ups done (or tried): tests wait on it

    @asynccontextmanager
    async def _image_in_use(self) -> AsyncIterator[None]:
        """Around a start's image step and unit start: no prune until it is over."""
        async with self._prune_lock:  # a prune under way ends first
            self._images_in_use += 1
        try:
            yield
        finally:
            self._images_in_use -= 1

    def _prune_may_run(self) -> bool:
        return self._images_in_use == 0 and not self._prune_lock.locked()

    def _warm_after_start(self, image: str, held: int) -> None:
        """A replica of `image` runs, one of `held` on the host: have the next ranges'
        copies of it made, later, unless a warm-up made them at as many replicas."""
        if not (self.config.userns_size and self.config.userns_warm):
            return
        if held <= self._warm_held.get(image, 0):
            return
        self._warm_held[image] = held
        if image not in self._warm_pending:
            self._warm_pending.add(image)
            self._warm_send.send_nowait(image)

    async def keep_user_namespaces_warm(self) -> None:
        """serve()'s task: after a replica of an image starts, storage copies the image for
        the `userns_warm` ranges the next containers would get, while no start is under
        way, so a replica started next (a second replica, a failover's replacement) finds
        its copy made instead of waiting for it: with native overlay and no idmapped
        mounts for rootless, the copy is the whole image chowned (docs/runtime.md)."""
        async for image in self._warm_queue:
            while self._images_in_use:  # a start under way goes first
                await trio.sleep(0.05)
            self._warm_pending.discard(image)
            try:
                await self.machine.prepare_user_namespaces(
                    image, self.config.userns_size, self.config.userns_warm
                )
            except MachineError as err:
                log.info("%s not made ready for the next user namespaces: %s", image, err)
            self.namespaces_warmed += 1

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
        True when it pruned; False also while a start uses the store (the caller tries
        again at its next look)."""
        cap = self.config.image_store_max_mib
        if cap is None or not self._prune_may_run():
            return False
        async with self._prune_lock:
            if self._images_in_use:  # a start came in while the lock was taken
                return False
            return await self._prune_past(cap)

    async def _prune_past(self, cap: int) -> bool:
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
        self._warm_held.clear()  # an image removed takes its copies with it
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
