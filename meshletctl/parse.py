"""Parsing of human inputs to meshletctl (resource sizes, KEY=VALUE, constraints). Pure."""

from __future__ import annotations

import re
from typing import Any

_CPU = re.compile(r"^(?:(\d+)m|(\d+)|(\d*\.\d+))$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*(ki|k|mi|m|gi|g|ti|t)?b?$", re.IGNORECASE)
_NAME = re.compile(r"[^a-z0-9-]+")

MAX_MILLI_CPU = 1_024_000  # the lexicon's bound (commune.scheduler.defs#resources)
MAX_MEMORY_MIB = 16_777_216
# systemd's CPUQuota= counts whole percents of a core: below 10 milli-CPU a bare integer is
# almost surely someone meaning cores ("--cpu 2"), so it is refused rather than guessed.
MIN_BARE_MILLI_CPU = 10
MIN_MEMORY_MIB = 6  # podman refuses a smaller memory limit


class ParseError(ValueError):
    pass


def milli_cpu(text: str) -> int:
    """CPU per replica, Nomad-like: a bare integer is milli-CPU ('200' → 200, like '200m');
    a decimal is cores ('0.5' → 500, '2.0' → 2000)."""
    t = text.strip()
    m = _CPU.match(t)
    if not m:
        raise ParseError(
            f"bad CPU amount {text!r}: give milli-CPU (200 or 200m) or cores (0.5, 2.0)"
        )
    milli, bare, cores = m.groups()
    if cores is not None:
        whole, _, frac = cores.partition(".")
        if len(frac) > 3:
            raise ParseError(f"bad CPU amount {text!r}: finer than one milli-CPU (0.001)")
        value = int(whole or "0") * 1000 + int((frac + "000")[:3])
    elif bare is not None:
        value = int(bare)
        if 0 < value < MIN_BARE_MILLI_CPU:
            raise ParseError(
                f"--cpu {t} would be {value} milli-CPU (a bare integer is milli-CPU); "
                f"for {value} core(s) write {value}.0, or {value}m if you mean it"
            )
    else:
        value = int(milli)
    if value > MAX_MILLI_CPU:
        raise ParseError(f"bad CPU amount {text!r}: more than {MAX_MILLI_CPU // 1000} cores")
    return value


def memory_mib(text: str) -> int:
    """Memory per replica: a bare number is MiB ('64' → 64); units Ki, Mi, Gi, Ti (or K, M,
    G, T, also binary): '1G'/'1Gi' → 1024, '1.5Gi' → 1536; rounded up to whole MiB."""
    m = _MEM.match(text.strip())
    if not m:
        raise ParseError(f"bad memory amount {text!r}: give MiB (64) or a unit (64Mi, 1Gi)")
    value, unit = float(m.group(1)), (m.group(2) or "mi").lower()
    factor = {"k": 1 / 1024, "ki": 1 / 1024, "m": 1, "mi": 1, "g": 1024, "gi": 1024}
    factor |= {"t": 1024 * 1024, "ti": 1024 * 1024}
    mib = value * factor[unit]
    out = int(-(-mib // 1))
    if out < MIN_MEMORY_MIB:
        raise ParseError(
            f"bad memory amount {text!r}: at least {MIN_MEMORY_MIB} MiB (podman's smallest limit)"
        )
    if out > MAX_MEMORY_MIB:
        raise ParseError(f"bad memory amount {text!r}: more than 16 TiB")
    return out


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


def ports(items: list[str]) -> list[dict[str, Any]]:
    """`--port NAME:PORT[/tcp|udp]` (repeatable) as the record's `ports`."""
    out = []
    for item in items:
        name, sep, rest = item.partition(":")
        number, _, proto = rest.partition("/")
        if not sep or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise ParseError(f"--port {item!r}: give NAME:PORT[/tcp|/udp], e.g. http:8080")
        if proto not in ("", "tcp", "udp"):
            raise ParseError(f"--port {item!r}: the protocol is tcp or udp")
        out.append({"name": name, "containerPort": int(number), "protocol": proto or "tcp"})
    return out


def seconds(text: str, what: str) -> int:
    """A duration in whole seconds: 30, 30s, 2m."""
    t = text.strip().lower()
    scale = 60 if t.endswith("m") else 1
    t = t.removesuffix("m").removesuffix("s")
    if not t.isdigit():
        raise ParseError(f"{what} {text!r}: give seconds (30, 30s) or minutes (2m)")
    return int(t) * scale


def health_check(
    cmd: str, interval: str | None, timeout: str | None, retries: int | None, start: str | None
) -> dict[str, Any]:
    """`--health-cmd` (split like a shell would, here, once: the check itself runs without
    a shell) and its timings as the record's `healthCheck`."""
    import shlex

    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise ParseError(f"--health-cmd: {e}") from None
    if not argv:
        raise ParseError("--health-cmd: give the program to run, e.g. 'wget -q -O- http://…'")
    out: dict[str, Any] = {"command": argv}
    for key, given, what in (
        ("intervalS", interval, "--health-interval"),
        ("timeoutS", timeout, "--health-timeout"),
        ("startPeriodS", start, "--health-start-period"),
    ):
        if given is not None:
            out[key] = seconds(given, what)
    if retries is not None:
        out["retries"] = retries
    return out


def workload_record(
    image: str,
    args: list[str],
    *,
    name: str | None = None,
    cpu: str = "100m",
    memory: str = "128Mi",
    replicas: int | None = None,
    env: list[str] = (),  # type: ignore[assignment]
    secret: list[str] = (),  # type: ignore[assignment]
    kind: str | None = None,
    restart: str | None = None,
    constraint: list[str] = (),  # type: ignore[assignment]
    cluster: str | None = None,
    pull_secret: str | None = None,
    port: list[str] = (),  # type: ignore[assignment]
    health: dict[str, Any] | None = None,
    network: str | None = None,
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The workload record `meshletctl run` publishes, and the secrets (name, value) it
    stores first on the local meshlet (values read from @FILE, never from the command line).
    Only what the user gave goes in: meshletd fills what is left out, once
    (farm.meshlet.ctl.createWorkload: replicas, kind, cluster; restartPolicy is the lexicon's
    default)."""
    from pathlib import Path

    if kind is not None and kind not in ("service", "job"):
        raise ParseError("--kind must be service or job")
    if restart is not None and restart not in ("always", "on-failure", "never"):
        raise ParseError("--restart must be always, on-failure or never")
    if network is not None and network not in ("none", "internet", "lan"):
        raise ParseError("--network must be none, internet or lan")
    record: dict[str, Any] = {
        "name": name or name_from_image(image),
        "image": image,
        "resources": {"milliCpu": milli_cpu(cpu), "memoryMiB": memory_mib(memory)},
    }
    for key, given in (
        ("replicas", replicas),
        ("kind", kind),
        ("restartPolicy", restart),
        ("network", network),
    ):
        if given is not None:
            record[key] = given
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
    if pull_secret is not None:
        # Registry credentials: stored like a secret, named in imagePullSecret, used only
        # for the pull (never mounted into the container).
        pname, spec = key_value(pull_secret, "--pull-secret")
        if not spec.startswith("@"):
            raise ParseError(f"--pull-secret {pname}: give the value as @FILE")
        try:
            secrets.append((pname, Path(spec[1:]).read_bytes()))
        except OSError as e:
            raise ParseError(
                f"--pull-secret {pname}: cannot read {spec[1:]}: {e.strerror}"
            ) from None
        record["imagePullSecret"] = pname
    if cluster:
        record["cluster"] = cluster
    if port:
        record["ports"] = ports(list(port))
    if health:
        record["healthCheck"] = health
    return record, secrets
