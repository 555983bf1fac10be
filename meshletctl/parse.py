"""Parsing of human inputs to meshletctl (resource sizes, KEY=VALUE, constraints). Pure."""

from __future__ import annotations

import re
from typing import Any

_CPU = re.compile(r"^(\d+(?:\.\d{1,3})?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*(ki|k|mi|m|gi|g|ti|t)?b?$", re.IGNORECASE)
_NAME = re.compile(r"[^a-z0-9-]+")


class ParseError(ValueError):
    pass


def milli_cpu(text: str) -> int:
    """'0.5' or '500m' → 500; '2' → 2000."""
    m = _CPU.match(text.strip())
    if not m:
        raise ParseError(f"bad CPU amount {text!r} (examples: 0.5, 2, 250m)")
    number, milli = m.groups()
    if milli:
        if "." in number:
            raise ParseError(f"bad CPU amount {text!r}: milli-CPU is a whole number")
        return int(number)
    whole, _, frac = number.partition(".")
    return int(whole) * 1000 + int((frac + "000")[:3])


def memory_mib(text: str) -> int:
    """'256' or '256Mi' → 256; '1G'/'1Gi' → 1024; '512Ki' → 1 (rounded up)."""
    m = _MEM.match(text.strip())
    if not m:
        raise ParseError(f"bad memory amount {text!r} (examples: 256Mi, 1Gi)")
    value, unit = float(m.group(1)), (m.group(2) or "mi").lower()
    factor = {"k": 1 / 1024, "ki": 1 / 1024, "m": 1, "mi": 1, "g": 1024, "gi": 1024}
    factor |= {"t": 1024 * 1024, "ti": 1024 * 1024}
    mib = value * factor[unit]
    return max(1, int(-(-mib // 1))) if mib > 0 else 0


def key_value(text: str, what: str = "--env") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ParseError(f"{what} expects KEY=VALUE, got {text!r}")
    return key, value


def name_from_image(image: str) -> str:
    """'docker.io/library/nginx:1.25' → 'nginx'."""
    base = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0].lower()
    name = _NAME.sub("-", base).strip("-")[:64]
    return name or "workload"


def constraints(items: list[str]) -> dict[str, Any]:
    """`arch=amd64`, `label=gpu` / `label=zone=eu`, `prefer=DID`, `avoid=DID`, `packing`."""
    out: dict[str, Any] = {}
    for item in items:
        if item in ("packing", "allow-packing"):
            out["allowPacking"] = True
            continue
        key, value = key_value(item, "--constraint")
        field = {"arch": "arch", "label": "labels", "prefer": "preferMeshlets"}.get(key)
        field = field or {"avoid": "avoidMeshlets"}.get(key)
        if field is None:
            raise ParseError(
                f"unknown constraint {key!r} (use arch=, label=, prefer=, avoid= or packing)"
            )
        out.setdefault(field, []).append(value)
    return out


def workload_record(
    image: str,
    args: list[str],
    *,
    name: str | None = None,
    cpu: str = "0.1",
    memory: str = "128Mi",
    replicas: int = 1,
    env: list[str] = (),  # type: ignore[assignment]
    secret: list[str] = (),  # type: ignore[assignment]
    kind: str = "service",
    restart: str = "on-failure",
    constraint: list[str] = (),  # type: ignore[assignment]
    cluster: str | None = None,
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The workload record `meshletctl run` publishes, and the secrets (name, value) it
    stores first on the local meshlet (values read from @FILE, never from the command line)."""
    from pathlib import Path

    if kind not in ("service", "job"):
        raise ParseError("--kind must be service or job")
    if restart not in ("always", "on-failure", "never"):
        raise ParseError("--restart must be always, on-failure or never")
    record: dict[str, Any] = {
        "name": name or name_from_image(image),
        "image": image,
        "resources": {"milliCpu": milli_cpu(cpu), "memoryMiB": memory_mib(memory)},
        "replicas": replicas,
        "kind": kind,
        "restartPolicy": restart,
    }
    if args:
        record["args"] = list(args)
    if env:
        record["env"] = [{"name": k, "value": v} for k, v in (key_value(e, "--env") for e in env)]
    if constraint:
        record["constraints"] = constraints(list(constraint))
    secrets: list[tuple[str, bytes]] = []
    for item in secret:
        sname, spec = key_value(item, "--secret")
        if not spec.startswith("@"):
            raise ParseError(
                f"--secret {sname}: give the value as @FILE, never on the command line"
            )
        try:
            secrets.append((sname, Path(spec[1:]).read_bytes()))
        except OSError as e:
            raise ParseError(f"--secret {sname}: cannot read {spec[1:]}: {e.strerror}") from None
    if secrets:
        record["secrets"] = [{"name": s} for s, _ in secrets]
    if cluster:
        record["cluster"] = cluster
    return record, secrets
