"""The hostile workload records of issue #15 (points 1, 2 and 6), shared by the end-to-end
tests that write them straight to a PDS: against meshletd processes on the devnet
(tests/devnet/test_hostile_records_commune.py) and against the three booted hosts
(tests/system/test_hostile_records_hosts.py).

Each set maps a record key to (record value, the field its refusal must name). A field of
None marks a valid record: it must run exactly once (or, created decades ago, be pending
with its reason), never on two meshlets.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

WORKLOAD = "commune.scheduler.workload"


def nested(depth: int) -> dict[str, Any]:
    """A value nested `depth` levels deep (point 6: 200, 500 and 990 levels)."""
    v: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        v = {"x": v}
    return v


def workload(name: str, cluster: str = "home", **changes: Any) -> dict[str, Any]:
    """A valid one-replica busybox service record, with `changes` applied."""
    value: dict[str, Any] = {
        "$type": WORKLOAD,
        "name": name,
        "image": "localhost/busybox:latest",
        "args": ["sleep", "600"],
        "resources": {"milliCpu": 100, "memoryMiB": 32},
        "replicas": 1,
        "kind": "service",
        "cluster": cluster,
        "bidWindowMs": 1000,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    }
    value.update(changes)
    return value


def hostile(cluster: str = "home") -> dict[str, tuple[dict[str, Any], str | None]]:
    """Points 2 and 6: specs the runtime refuses and records nested too deep; one valid."""
    w = lambda name, **kw: workload(name, cluster, **kw)  # noqa: E731
    return {
        "deep200": (w("deep200", extra=nested(200)), "extra."),
        "deep500": (w("deep500", extra=nested(500)), "extra."),
        "deep990": (w("deep990", extra=nested(990)), "extra."),
        "privileged": (w("privileged", image="--privileged"), "image"),
        "ociarchive": (w("ociarchive", image="oci-archive:/tmp/x.tar"), "image"),
        "dockerdaemon": (w("dockerdaemon", image="docker-daemon:busybox"), "image"),
        "envequals": (w("envequals", env=[{"name": "A=B", "value": "1"}]), "env[0].name"),
        "envnul": (w("envnul", env=[{"name": "A\u0000B", "value": "1"}]), "env[0].name"),
        "nocpu": (w("nocpu", resources={"milliCpu": 0, "memoryMiB": 32}), "resources."),
        "daemonset": (w("daemonset", kind="daemonset"), "kind"),
        "sometimes": (w("sometimes", restartPolicy="sometimes"), "restartPolicy"),
        "fine": (w("fine"), None),
    }


def ancient(cluster: str = "home") -> dict[str, tuple[dict[str, Any], str | None]]:
    """Point 1: lexicon-valid, created decades ago (at db8aa19 it ran on every meshlet)."""
    return {
        "ancient": (workload("ancient", cluster, createdAt="1990-01-01T00:00:00.000Z"), None),
        "fine": (workload("fine", cluster), None),
    }


def deep_json(value: Any) -> bytes:
    """JSON of a record nested up to ~1000 levels: the encoder recurses once per level, and
    pytest and trio already hold part of the default stack budget."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        return json.dumps(value).encode()
    finally:
        sys.setrecursionlimit(limit)


def put_record(account: Any, collection: str, rkey: str, value: Any) -> None:
    """Write `value` as it is to the account's own repo (no validation: the reference PDS
    stores records of collections it does not know)."""
    with httpx.Client(timeout=30) as http:
        r = http.post(
            f"{account.pds_url}/xrpc/com.atproto.server.createSession",
            json={"identifier": account.did, "password": account.app_password},
        )
        assert r.status_code == 200, r.text
        jwt = r.json()["accessJwt"]
        body = {"repo": account.did, "collection": collection, "rkey": rkey, "record": value}
        r = http.post(
            f"{account.pds_url}/xrpc/com.atproto.repo.putRecord",
            content=deep_json(body),
            headers={"authorization": f"Bearer {jwt}", "content-type": "application/json"},
        )
        assert r.status_code == 200, r.text  # the PDS stores what it does not know
