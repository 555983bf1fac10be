"""How replicas are named on the machine, so an operator can find them.

Scheme (documented in docs/runtime.md)::

    meshlet-<owner-handle>-<workload>-<replica>-<tag>.service

- `<owner-handle>` is the owner's handle (`alice.example.com`), `<workload>` the workload
  record key, each reduced to the characters a unit name allows ([A-Za-z0-9.:_-]; anything
  else becomes `_`) and shortened to 40 characters;
- `<replica>` the replica index (0, 1, ...), followed by `.1` for a replica in lane 1 (a
  rolling update runs a slot's new version beside the old one, in the other lane; lane 0
  names are those of before lanes existed);
- `<tag>` the first 32 hex digits (128 bits) of sha256(owner DID + "/" + workload), so two
  workloads whose readable parts collide (handles change, `a-b`+`c` vs `a`+`b-c`, or a
  member who picks a handle and record key to match someone else's) get distinct units.
  (It was 6 digits: a colliding name was found by brute force in about a minute.)

The podman container has the unit's name without `.service`; podman secrets are named
`meshlet-<16 hex digits of sha256(container)>.<secret name>` (podman allows 64 characters;
a secret name that does not fit is replaced by 16 hex digits of its own hash).
Identity is never parsed back from a name: it is stored in the
unit (`MESHLET_*` environment entries, see `units.py`), read back and checked against the
name before a unit is adopted or taken as an already started replica (`unit_belongs`).
"""

from __future__ import annotations

import hashlib
import re

from meshletd.runtime.spec import ReplicaId

UNIT_PREFIX = "meshlet-"
UNIT_SUFFIX = ".service"
UNIT_PATTERN = "meshlet-*.service"
_PART_MAX = 40  # with the 32-digit tag a name stays under 140 characters
TAG_HEX = 32
LEGACY_TAG_HEX = 6  # units started before the tag was widened; still recognised on adoption
_UNSAFE = re.compile(r"[^A-Za-z0-9.:_-]")


def _part(text: str) -> str:
    cleaned = _UNSAFE.sub("_", text).strip(".-") or "_"
    return cleaned[:_PART_MAX]


def workload_tag(owner_did: str, workload: str, digits: int = TAG_HEX) -> str:
    """Hex digits of a hash that tell workloads apart whatever their readable names."""
    return hashlib.sha256(f"{owner_did}/{workload}".encode()).hexdigest()[:digits]


def _index(replica: ReplicaId) -> str:
    return f"{replica.index}.{replica.lane}" if replica.lane else str(replica.index)


def container_name(replica: ReplicaId, owner_handle: str) -> str:
    """The podman container name (also the unit's name without `.service`)."""
    return (
        f"{UNIT_PREFIX}{_part(owner_handle)}-{_part(replica.workload)}-{_index(replica)}-"
        f"{workload_tag(replica.owner_did, replica.workload)}"
    )


def unit_name(replica: ReplicaId, owner_handle: str) -> str:
    """The transient systemd unit for one replica: `journalctl -u <this>` shows its output."""
    return container_name(replica, owner_handle) + UNIT_SUFFIX


def unit_belongs(unit: str, replica: ReplicaId, container: str | None) -> bool:
    """Whether a unit's name fits the replica its environment names (and the container it
    names is the unit's own): the name ends with the replica's index and tag (current or
    legacy width). A unit whose stored identity does not fit its name was not started by us
    for that replica: it is neither adopted nor taken as started."""
    if not unit.endswith(UNIT_SUFFIX):
        return False
    base = unit[: -len(UNIT_SUFFIX)]
    if container is not None and container != base:
        return False
    for digits in (TAG_HEX, LEGACY_TAG_HEX):
        tag = workload_tag(replica.owner_did, replica.workload, digits)
        if base.endswith(f"-{_index(replica)}-{tag}"):
            return True
    return False


SECRET_NAME_MAX = 64  # podman: "only 64 [a-zA-Z0-9-_.] characters allowed"


def secret_prefix(container: str) -> str:
    """What every podman secret of the replica in `container` starts with."""
    return f"{UNIT_PREFIX}{hashlib.sha256(container.encode()).hexdigest()[:16]}."


def legacy_secret_prefix(container: str) -> str:
    """The prefix of secrets made before names were shortened (`<container>.`)."""
    return f"{container}."


def secret_name(container: str, secret: str) -> str:
    """The podman secret holding `secret` for the replica in `container` (<= 64 chars)."""
    name = secret_prefix(container) + secret
    if len(name) > SECRET_NAME_MAX:
        name = secret_prefix(container) + hashlib.sha256(secret.encode()).hexdigest()[:16]
    return name


# meshletd's own podman calls (image, secret, inspect, rm, ps) each run in a short transient
# unit named like this. "meshletd-" does not match UNIT_PATTERN: they are never replicas.
PODMAN_CALL_PREFIX = "meshletd-podman-"
PODMAN_CALL_PATTERN = "meshletd-podman-*.service"


def podman_call_unit(token: str) -> str:
    """The unit of one podman call; `token` makes it unique (random hex from the caller)."""
    return f"{PODMAN_CALL_PREFIX}{token}{UNIT_SUFFIX}"


def is_replica_unit(name: str) -> bool:
    """Whether a unit name follows the replica scheme (used when listing units)."""
    return name.startswith(UNIT_PREFIX) and name.endswith(UNIT_SUFFIX)
