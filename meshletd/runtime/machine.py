"""The machine under the runtime: the few systemd and podman operations it needs.

`ReplicaRuntime` (runtime.py) holds the replica lifecycle and talks only to a `Machine`.
`SystemdPodmanMachine` (systemd.py) is the real one (pystemd over D-Bus, podman CLI as the
replica user, each call in a transient unit of its own); `FakeMachine` (fake.py) is an
in-memory model of the same behaviour, so the same lifecycle code and the same contract
tests run on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from meshletd.runtime.events import ReplicaUsage
from meshletd.runtime.outcome import ContainerSnapshot, UnitSnapshot
from meshletd.runtime.registry import RemoteImage
from meshletd.runtime.units import RuntimeConfig


class MachineError(Exception):
    """An operation on systemd or podman failed; the message says which and why."""


class Machine(Protocol):
    # images
    async def image_present(self, image: str) -> bool: ...

    async def remote_image(self, image: str, auth: bytes | None = None) -> RemoteImage:
        """What `image` means in its registry now (digest, size); `RegistryError` if not."""
        ...

    async def pull_image(
        self,
        image: str,
        *,
        auth: bytes | None = None,
        scratch: str = "",
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """Pull `image` (with `auth` as an auth file only for this pull, kept in the state
        dir of unit `scratch`); `on_line` gets podman's progress lines."""
        ...

    async def image_store_bytes(self) -> int:
        """What the images in the replica user's store take (each image's size)."""
        ...

    async def prune_images(self) -> None:
        """Remove every image no container uses (`podman image prune --all --force`)."""
        ...

    # podman secrets (data goes through stdin, never a command line)
    async def create_secret(self, name: str, data: bytes) -> None: ...
    async def remove_secret(self, name: str) -> None: ...
    async def list_secrets(self, prefix: str) -> list[str]: ...

    # containers
    async def inspect_container(self, name: str) -> ContainerSnapshot | None: ...
    async def remove_container(self, name: str) -> None: ...
    async def prepare_user_namespaces(self, image: str, size: int, count: int) -> None:
        """Have storage copy `image` for the `count` user-namespace ranges
        (`--userns=auto:size=SIZE`) the next containers would get: that many containers
        of it are created (never started, labelled `WARM_LABEL`), then removed."""
        ...

    async def list_containers(self, label: str) -> list[str]: ...

    # the per-replica state dir (memory counters saved by ExecStopPost)
    async def prepare_state_dir(self, unit: str, *, keep: bool = False) -> None:
        """Create the replica's state dir; empty it first unless `keep`."""
        ...

    async def read_saved_counters(self, unit: str) -> dict[str, str]: ...
    async def remove_state_dir(self, unit: str) -> None: ...
    async def list_state_dirs(self) -> list[str]: ...

    # systemd
    async def ensure_slice(self, config: RuntimeConfig) -> frozenset[str]:
        """Start (or update) the replicas' slice with `slice_properties`, at run time.

        Leaves out every limit an administrator's drop-in for the slice sets, and returns
        those unit-file keys (e.g. {"MemoryMax"}).
        """
        ...

    async def apply_network_rules(self, config: RuntimeConfig) -> None:
        """Write meshlet's nftables rules for `config.network_grant` where each replica's
        unit loads them (`config.network_rules_file`), and load them now, as root."""
        ...

    async def start_unit(self, unit: str, properties: dict[str, object]) -> None: ...

    async def wait_started(self, unit: str, timeout_s: float) -> None:
        """Return once the unit's start job is over (active, or failed), or after
        `timeout_s`, or at once when the machine cannot tell: the caller then looks at
        the unit (`unit_snapshot`) as it would anyway. Never raises."""
        ...

    async def unit_snapshot(self, unit: str) -> UnitSnapshot: ...
    async def list_units(self, pattern: str) -> list[str]: ...
    async def stop_unit(self, unit: str) -> None: ...
    async def reset_failed(self, unit: str) -> None: ...
    async def sample_usage(self, unit: str) -> ReplicaUsage: ...

    async def cpu_quota_usec(self, unit: str) -> int | None:
        """The unit's CPUQuotaPerSecUSec (None: no such unit; 2**64-1: no quota)."""
        ...

    async def set_cpu_quota_usec(self, unit: str, usec: int) -> None:
        """Set the unit's CPU quota now, for as long as the unit lives (runtime, not persistent)."""
        ...
