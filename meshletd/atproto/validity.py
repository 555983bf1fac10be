"""The protocol's validity rules beyond the lexicon schemas (docs/protocol.md, section 19).

A workload record the lexicon admits may still describe something no meshlet's runtime can
run: an image string podman would read as an option or a transport, an environment name
holding `=`, a replica with no CPU. Judged on one meshlet and not another, such a record
would be bid on, placed, and fail in a loop. So the judgement is part of the protocol: every
meshlet applies the same pure rule at intake (`Lexicons.validate_record` runs it after the
schema), a record it refuses is ignored by every scheduler and shown to its owner with the
field and the reason, and the runtime's own checks (meshletd/runtime/spec.py) are never
stricter than this rule (a unit test generates records to show it).

Pure: no I/O, no clock; only `re` and the error type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from meshletd.atproto.services import check_services
from meshletd.core.nsid import NSID_WORKLOAD
from meshletd.errors import InvalidRecord

# Image references as the distribution spec defines them (registry[:port]/path[:tag][@digest]).
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = re.compile(rf"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$")
# Names podman reads as a transport when they come before the first ':' of a reference
# (`oci-archive:/tmp/x` reads a file, `docker-daemon:img` asks another daemon): the
# registry-less reference `oci-archive:latest` looks like an image with a tag to the
# distribution grammar, so these are refused by name.
IMAGE_TRANSPORTS = frozenset(
    {
        "containers-storage",
        "dir",
        "docker",
        "docker-archive",
        "docker-daemon",
        "oci",
        "oci-archive",
        "ostree",
        "sif",
        "tarball",
    }
)
IMAGE_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
SECRET_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

MIN_MILLI_CPU = 1
MAX_MILLI_CPU = 1024 * 1000
MIN_MEMORY_MIB = 4
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MAX_ARGS_BYTES = 128 * 1024  # command + args, UTF-8
KINDS = ("service", "job")
RESTART_POLICIES = ("always", "on-failure", "never")


def _refuse(field: str, reason: str) -> InvalidRecord:
    return InvalidRecord(f"{NSID_WORKLOAD}: {field}: {reason}", field=field, reason=reason)


def image_problem(image: Any) -> str | None:
    """Why `image` is not an image reference every meshlet can pull, or None."""
    if not isinstance(image, str) or not image:
        return "must be a non-empty image reference"
    if len(image) > 512 or not IMAGE_RE.match(image):
        return "is not an image reference (registry/name[:tag][@digest])"
    prefix = image.split(":", 1)[0]
    if ":" in image and "/" not in prefix and prefix in IMAGE_TRANSPORTS:
        return f"starts with the podman transport {prefix + ':'!r}, not an image name"
    return None


def check_workload(value: Mapping[str, Any]) -> None:
    """Raise `InvalidRecord` (with `field` and `reason`) unless a lexicon-valid workload
    record is one every meshlet's runtime can run. Checked in order; the first problem is
    the one reported."""
    if (why := image_problem(value.get("image"))) is not None:
        raise _refuse("image", why)
    digest = value.get("imageDigest")
    if digest is not None:
        if not isinstance(digest, str) or not IMAGE_DIGEST_RE.match(digest):
            raise _refuse("imageDigest", "must be sha256: and 64 lowercase hex digits")
        pinned = str(value.get("image")).partition("@")[2]
        if pinned and pinned != digest:
            raise _refuse("imageDigest", "differs from the digest the image names")
    pull_secret = value.get("imagePullSecret")
    if pull_secret is not None and (
        not isinstance(pull_secret, str) or not SECRET_TARGET_RE.match(pull_secret)
    ):
        raise _refuse("imagePullSecret", "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
    kind = value.get("kind")
    if kind not in KINDS:
        raise _refuse("kind", f"must be one of {', '.join(KINDS)}")
    policy = value.get("restartPolicy", "on-failure")
    if policy not in RESTART_POLICIES:
        raise _refuse("restartPolicy", f"must be one of {', '.join(RESTART_POLICIES)}")
    res = value.get("resources") or {}
    cpu, mem = res.get("milliCpu"), res.get("memoryMiB")
    if not isinstance(cpu, int) or not MIN_MILLI_CPU <= cpu <= MAX_MILLI_CPU:
        raise _refuse("resources.milliCpu", f"must be from {MIN_MILLI_CPU} to {MAX_MILLI_CPU}")
    if not isinstance(mem, int) or not MIN_MEMORY_MIB <= mem <= MAX_MEMORY_MIB:
        raise _refuse("resources.memoryMiB", f"must be from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}")
    total = 0
    for key in ("command", "args"):
        for i, arg in enumerate(value.get(key) or ()):
            if "\0" in arg:
                raise _refuse(f"{key}[{i}]", "holds a NUL character")
            total += len(arg.encode("utf-8"))
    if total > MAX_ARGS_BYTES:
        raise _refuse("args", f"command and args are over {MAX_ARGS_BYTES} bytes")
    names: set[str] = set()
    for i, env in enumerate(value.get("env") or ()):
        name = env.get("name")
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            raise _refuse(f"env[{i}].name", "must be a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if name in names:
            raise _refuse(f"env[{i}].name", f"{name} is given twice")
        names.add(name)
        if "\0" in env.get("value", ""):
            raise _refuse(f"env[{i}].value", "holds a NUL character")
    targets: set[str] = set()
    for i, ref in enumerate(value.get("secrets") or ()):
        target = ref.get("target") or ref.get("name")
        where = f"secrets[{i}].target" if ref.get("target") else f"secrets[{i}].name"
        if not isinstance(target, str) or not SECRET_TARGET_RE.match(target):
            raise _refuse(where, "must be 1-63 of [A-Za-z0-9_.-], starting with a letter or digit")
        if target in targets:
            raise _refuse(where, f"{target} is given twice")
        targets.add(target)
        env_name = ref.get("env")
        if env_name is not None:
            if not ENV_NAME_RE.match(env_name):
                raise _refuse(
                    f"secrets[{i}].env", "must be a variable name ([A-Za-z_][A-Za-z0-9_]*)"
                )
            if env_name in names:
                raise _refuse(f"secrets[{i}].env", f"{env_name} is also set by env or a secret")
            names.add(env_name)
    check_services(value, _refuse)


RULES: dict[str, Callable[[Mapping[str, Any]], None]] = {NSID_WORKLOAD: check_workload}
