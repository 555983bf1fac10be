"""The JSON form of what a workload serves (ports, health check) and of where a replica
serves it (endpoints, health): conversions for `meshletd.atproto.records`, and the validity
rules of section 19 for these fields (docs/protocol.md, section 22).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from meshletd.core.records import Endpoint, PortSpec, Workload, WorkloadStatus

JsonObject = dict[str, Any]

PORT_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?$")
PROTOCOLS = ("tcp", "udp")
MAX_HEALTH_COMMAND_BYTES = 4096
# First words podman reads as the form of a health check, not as the program to run.
HEALTH_KEYWORDS = frozenset({"CMD", "CMD-SHELL", "NONE"})


def ports_from_json(value: Mapping[str, Any]) -> tuple[PortSpec, ...]:
    """The `ports` of a workload record value."""
    return tuple(
        PortSpec(str(p["name"]), int(p["containerPort"]), str(p.get("protocol", "tcp")))
        for p in value.get("ports", ())
    )


def health_from_json(value: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The `Workload` keyword arguments of a record's `healthCheck` (none: no check).
    `defaults`: the lexicon's, by dotted path."""
    hc = value.get("healthCheck")
    if not isinstance(hc, Mapping):
        return {}

    def get(key: str) -> int:
        got = hc.get(key)
        return int(defaults[f"healthCheck.{key}"] if got is None else got)

    return {
        "health_command": tuple(str(a) for a in hc.get("command", ())),
        "health_interval_s": get("intervalS"),
        "health_timeout_s": get("timeoutS"),
        "health_retries": get("retries"),
        "health_start_period_s": get("startPeriodS"),
    }


def workload_services_json(wl: Workload) -> JsonObject:
    """The `ports` and `healthCheck` fields of a workload's JSON value (those it has)."""
    out: JsonObject = {}
    if wl.ports:
        out["ports"] = [
            {"name": p.name, "containerPort": p.container_port, "protocol": p.protocol}
            for p in wl.ports
        ]
    if wl.health_command:
        out["healthCheck"] = {
            "command": list(wl.health_command),
            "intervalS": wl.health_interval_s,
            "timeoutS": wl.health_timeout_s,
            "retries": wl.health_retries,
            "startPeriodS": wl.health_start_period_s,
        }
    return out


def endpoints_from_json(value: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    """The `endpoints` of a status record value."""
    return tuple(
        Endpoint(str(e["name"]), str(e["address"]), int(e["port"]), str(e.get("protocol", "tcp")))
        for e in value.get("endpoints", ())
    )


def status_services_json(st: WorkloadStatus) -> JsonObject:
    """The `health` and `endpoints` fields of a status's JSON value (those it has)."""
    out: JsonObject = {}
    if st.health is not None:
        out["health"] = st.health
    if st.endpoints:
        out["endpoints"] = [
            {"name": e.name, "address": e.address, "port": e.port, "protocol": e.protocol}
            for e in st.endpoints
        ]
    return out


def check_services(value: Mapping[str, Any], refuse: Callable[[str, str], Exception]) -> None:
    """Raise `refuse(field, reason)` unless the ports and health check of a lexicon-valid
    workload record are ones every meshlet can publish and run (section 19)."""
    names: set[str] = set()
    bound: set[tuple[int, str]] = set()
    for i, p in enumerate(value.get("ports") or ()):
        name = p.get("name")
        if not isinstance(name, str) or not PORT_NAME_RE.match(name):
            raise refuse(
                f"ports[{i}].name",
                "must be 1-15 of [a-z0-9-], starting and ending with a letter or digit",
            )
        if name in names:
            raise refuse(f"ports[{i}].name", f"{name} is given twice")
        names.add(name)
        proto = p.get("protocol", "tcp")
        if proto not in PROTOCOLS:
            raise refuse(f"ports[{i}].protocol", f"must be one of {', '.join(PROTOCOLS)}")
        key = (p.get("containerPort"), proto)
        if key in bound:
            raise refuse(f"ports[{i}].containerPort", f"{key[0]}/{proto} is given twice")
        bound.add(key)
    if names and value.get("network") == "none":
        raise refuse("ports", "cannot be published by a workload whose network is none")
    hc = value.get("healthCheck")
    if isinstance(hc, Mapping):
        total = 0
        for i, arg in enumerate(hc.get("command") or ()):
            if "\0" in arg:
                raise refuse(f"healthCheck.command[{i}]", "holds a NUL character")
            total += len(arg.encode("utf-8"))
        if not hc.get("command"):
            raise refuse("healthCheck.command", "must name a program")
        if str(hc["command"][0]).upper() in HEALTH_KEYWORDS:
            raise refuse(
                "healthCheck.command[0]", "is a keyword podman reads (CMD, CMD-SHELL, NONE)"
            )
        if total > MAX_HEALTH_COMMAND_BYTES:
            raise refuse("healthCheck.command", f"is over {MAX_HEALTH_COMMAND_BYTES} bytes in all")


__all__ = [
    "PORT_NAME_RE",
    "PROTOCOLS",
    "check_services",
    "endpoints_from_json",
    "health_from_json",
    "ports_from_json",
    "status_services_json",
    "workload_services_json",
]
