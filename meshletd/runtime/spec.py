"""What the runtime is asked to run: a replica of a workload, validated before anything starts.

Validation is pure and strict on purpose: the image name and arguments end up in a podman
argv (never a shell), and a value that is not a plain image reference, a bounded resource or
a well-formed name is refused here with an error that names the field, before any image
check, secret, unit or container exists.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from meshletd.atproto.validity import image_problem
from meshletd.errors import InvalidRequest, RuntimeFailure


class InvalidReplicaSpec(InvalidRequest):
    """A replica spec the runtime refuses (bad image name, resource value, secret, ...)."""

    name = "InvalidReplicaSpec"


class ImageNotFound(RuntimeFailure):
    """The image is neither present locally nor pullable."""

    name = "ImageNotFound"


class ImageUnauthorized(RuntimeFailure):
    """The registry refused the image: no pull secret, or a wrong one."""

    name = "ImageUnauthorized"


class ImageTooLarge(RuntimeFailure):
    """The image is bigger than this meshlet pulls (`RuntimeConfig.pull_max_bytes`)."""

    name = "ImageTooLarge"


class PullTimedOut(RuntimeFailure):
    """The pull took longer than this meshlet allows (`RuntimeConfig.pull_timeout_s`)."""

    name = "PullTimedOut"


class UnitStartFailed(RuntimeFailure):
    """systemd refused the unit or the container did not reach "running"."""

    name = "UnitStartFailed"


@dataclass(frozen=True, order=True)
class ReplicaId:
    """One replica of one workload: the workload is `at://<owner_did>/…workload/<workload>`."""

    owner_did: str
    workload: str
    index: int

    def __str__(self) -> str:
        return f"{self.owner_did}/{self.workload}#{self.index}"


@dataclass(frozen=True)
class Resources:
    """What one replica may use. Integers only (records carry no floats)."""

    milli_cpu: int
    memory_mib: int
    tasks: int = 64


@dataclass(frozen=True)
class Secret:
    """A secret for the container: mounted at /run/secrets/<name>, or exported as `env`."""

    name: str
    data: bytes = field(repr=False)
    env: str | None = None


Network = Literal["private", "none"]


@dataclass(frozen=True)
class PortBinding:
    """A container port published on the host: `address:host_port` → `container_port`."""

    name: str
    address: str
    host_port: int
    container_port: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class HealthCheck:
    """podman's health check of the container: `command` run inside it (exec form)."""

    command: tuple[str, ...]
    interval_s: int = 30
    timeout_s: int = 30
    retries: int = 3
    start_period_s: int = 0


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to start one replica.

    `owner_handle` only makes the unit name readable; identity is `replica`.
    `revision` is opaque to the runtime (e.g. the workload record's CID): it is stored with
    the unit and handed back on adoption so the daemon can tell a stale replica.
    """

    replica: ReplicaId
    owner_handle: str
    image: str
    resources: Resources
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[Secret, ...] = ()
    network: Network = "private"
    writable_root: bool = False
    stop_timeout_s: int = 10
    revision: str | None = ""
    # The owner's registry credentials for this pull only (a containers-auth.json), given
    # to podman as a file that is removed once the pull ended; never in a unit or argv.
    pull_auth: bytes | None = field(default=None, repr=False)
    ports: tuple[PortBinding, ...] = ()
    health: HealthCheck | None = None


# Limits a spec must stay within. Memory and tasks are per replica; the slice caps the sum.
MAX_MILLI_CPU = 1024 * 1000
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MIN_MEMORY_MIB = 4
MAX_TASKS = 1 << 15
MAX_SECRET_BYTES = 512 * 1024  # podman's own limit
MAX_ARGS_BYTES = 128 * 1024
MAX_STOP_TIMEOUT_S = 600


DID_RE = re.compile(r"^did:[a-z]+:[A-Za-z0-9._:%-]{1,2000}$")
RKEY_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9._:+/=-]{0,256}$")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(field_name: str, value: object, low: int, high: int) -> None:
    if not _is_int(value) or not (low <= value <= high):  # type: ignore[operator]
        raise InvalidReplicaSpec(
            f"{field_name} must be an integer from {low} to {high}, got {value!r}"
        )


def validate_image(image: object) -> str:
    """The image reference, or `InvalidReplicaSpec` naming what is wrong with it: the same
    rule every meshlet applies at intake (`atproto.validity.image_problem`), so a workload
    the commune admits is one the runtime can start (docs/protocol.md, section 19)."""
    problem = image_problem(image)
    if problem is not None:
        raise InvalidReplicaSpec(f"image {image!r} {problem}")
    assert isinstance(image, str)
    return image


def validate_resources(resources: object) -> Resources:
    """The resources, or `InvalidReplicaSpec` naming the bad value."""
    if not isinstance(resources, Resources):
        raise InvalidReplicaSpec(f"resources must be Resources, got {type(resources).__name__}")
    _check_range("resources.milli_cpu", resources.milli_cpu, 1, MAX_MILLI_CPU)
    _check_range("resources.memory_mib", resources.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    _check_range("resources.tasks", resources.tasks, 1, MAX_TASKS)
    return resources


def validate_ports(spec: ReplicaSpec) -> None:
    """The published ports: IP literals, ports in range, each host port once, a network."""
    seen: set[tuple[str, int, str]] = set()
    for p in spec.ports:
        try:
            ipaddress.ip_address(p.address)
        except ValueError:
            raise InvalidReplicaSpec(f"port {p.name}: address {p.address!r} is not an IP") from None
        _check_range(f"port {p.name}: host_port", p.host_port, 1, 65535)
        _check_range(f"port {p.name}: container_port", p.container_port, 1, 65535)
        if p.protocol not in ("tcp", "udp"):
            raise InvalidReplicaSpec(f"port {p.name}: protocol must be tcp or udp")
        if (p.address, p.host_port, p.protocol) in seen:
            raise InvalidReplicaSpec(f"port {p.name}: {p.address}:{p.host_port} given twice")
        seen.add((p.address, p.host_port, p.protocol))
    if spec.ports and spec.network == "none":
        raise InvalidReplicaSpec("ports cannot be published without a network")


def validate_health(health: HealthCheck | None) -> None:
    """The health check: a command without NUL bytes, bounded times (as the lexicon)."""
    if health is None:
        return
    if not health.command or any("\0" in a for a in health.command):
        raise InvalidReplicaSpec("health.command must be a program, without NUL bytes")
    if health.command[0].upper() in ("CMD", "CMD-SHELL", "NONE"):
        raise InvalidReplicaSpec("health.command may not start with CMD, CMD-SHELL or NONE")
    _check_range("health.interval_s", health.interval_s, 1, 3600)
    _check_range("health.timeout_s", health.timeout_s, 1, 3600)
    _check_range("health.retries", health.retries, 1, 100)
    _check_range("health.start_period_s", health.start_period_s, 0, 3600)


def validate_spec(spec: ReplicaSpec) -> ReplicaSpec:
    """Check every field of `spec`; raise `InvalidReplicaSpec` for the first bad one."""
    rid = spec.replica
    if not isinstance(rid.owner_did, str) or not DID_RE.match(rid.owner_did):
        raise InvalidReplicaSpec(f"replica.owner_did {rid.owner_did!r} is not a DID")
    if not isinstance(rid.workload, str) or not RKEY_RE.match(rid.workload):
        raise InvalidReplicaSpec(f"replica.workload {rid.workload!r} is not a record key")
    if rid.workload in (".", ".."):
        raise InvalidReplicaSpec(f"replica.workload {rid.workload!r} is not a record key")
    _check_range("replica.index", rid.index, 0, 9999)
    # The handle only makes the unit name readable (naming.py reduces it to safe
    # characters), so anything printable will do: a DID's tail when no handle is known.
    handle = spec.owner_handle
    if not isinstance(handle, str) or not handle.isprintable() or not 0 < len(handle) <= 253:
        raise InvalidReplicaSpec(f"owner_handle {handle!r} must be 1-253 printable characters")
    validate_image(spec.image)
    validate_resources(spec.resources)

    total = 0
    for i, arg in enumerate(spec.args):
        if not isinstance(arg, str) or "\0" in arg:
            raise InvalidReplicaSpec(f"args[{i}] must be a string without NUL bytes")
        total += len(arg.encode())
    if total > MAX_ARGS_BYTES:
        raise InvalidReplicaSpec(f"args are {total} bytes, more than {MAX_ARGS_BYTES}")

    seen_env: set[str] = set()
    for name, value in spec.env:
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            raise InvalidReplicaSpec(f"env name {name!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidReplicaSpec(f"env {name} must be a string without NUL bytes")
        if name in seen_env:
            raise InvalidReplicaSpec(f"env {name} is given twice")
        seen_env.add(name)

    seen_secrets: set[str] = set()
    for secret in spec.secrets:
        if not isinstance(secret.name, str) or not SECRET_NAME_RE.match(secret.name):
            raise InvalidReplicaSpec(
                f"secret name {secret.name!r} must be 1-63 of [A-Za-z0-9_.-], "
                "starting with a letter or digit"
            )
        if secret.name in seen_secrets:
            raise InvalidReplicaSpec(f"secret {secret.name} is given twice")
        seen_secrets.add(secret.name)
        if not isinstance(secret.data, bytes) or not 0 < len(secret.data) <= MAX_SECRET_BYTES:
            raise InvalidReplicaSpec(f"secret {secret.name} must be 1 to {MAX_SECRET_BYTES} bytes")
        if secret.env is not None:
            if not ENV_NAME_RE.match(secret.env):
                raise InvalidReplicaSpec(f"secret {secret.name}: env {secret.env!r} is invalid")
            if secret.env in seen_env:
                raise InvalidReplicaSpec(f"secret {secret.name}: env {secret.env} also in env")

    if spec.network not in ("private", "none"):
        raise InvalidReplicaSpec(f"network must be 'private' or 'none', got {spec.network!r}")
    if not isinstance(spec.writable_root, bool):
        raise InvalidReplicaSpec("writable_root must be a boolean")
    _check_range("stop_timeout_s", spec.stop_timeout_s, 0, MAX_STOP_TIMEOUT_S)
    validate_ports(spec)
    validate_health(spec.health)
    if spec.revision is not None and (
        not isinstance(spec.revision, str) or not REVISION_RE.match(spec.revision)
    ):
        raise InvalidReplicaSpec(f"revision {spec.revision!r} has characters outside the set")
    return spec
