"""`InMemoryNode`: a self-contained `Node` (node.py) with no cluster, PDS or runtime.

It keeps the workloads it was given and "runs" each replica on itself, so every command can
be exercised end to end without a network: `backend = "memory"` (demos, the footprint
benchmark) and the API's unit tests. The real node is `AtprotoNode` (atproto_node.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshletd.config import Config
from meshletd.core.nsid import NSID_WORKLOAD
from meshletd.core.versions import spec_version
from meshletd.daemon.peers import LogPage
from meshletd.daemon.views import invalid_workload_views
from meshletd.errors import Conflict, Forbidden, InvalidRequest, NotFound

if TYPE_CHECKING:  # the footprint of `backend = "memory"` stays without the atproto parts
    from meshletd.atproto.frames import Refusal


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Workload:
    uri: str
    cid: str
    owner: str
    record: dict[str, Any]
    replicas: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, str]] = field(default_factory=list)  # getLogs entries


class InMemoryNode:
    """A self-contained stand-in: one meshlet that wins every slot it has room for."""

    def __init__(
        self,
        did: str,
        owner: str,
        *,
        members: Iterable[str] = (),
        capacity: dict[str, int] | None = None,
        clusters: dict[str, list[str]] | None = None,
    ) -> None:
        self.did = did
        self.owner = owner
        self._state = "active"
        self._policy: Any = None  # the HostPolicy "published" (memory), None: none yet
        self._members = list(members)
        self._clusters = clusters or {"default": list(self._members)}
        self._capacity = dict(capacity or {"milliCpu": 1000, "memoryMiB": 1024})
        self._workloads: dict[str, _Workload] = {}
        self._secrets: dict[str, bytes] = {}
        self._seq = 0
        self._refused: list[Refusal] = []

    # -- reads -------------------------------------------------------------------------

    def state(self) -> str:
        return self._state

    def _local_replicas(self) -> list[dict[str, Any]]:
        return [
            r
            for w in self._workloads.values()
            for r in w.replicas
            if r.get("meshletDid") == self.did and r["state"] in ("running", "starting", "paused")
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "ownerDid": self.owner,
            "state": self._state,
            "members": len(self._members),
            "replicas": len(self._local_replicas()),
            "workloads": len(self._workloads),
            "capacity": self.capacity(),
            "backend": "in-memory",
        }

    def status_line(self) -> str:
        n, r = len(self._members), len(self._local_replicas())
        line = f"{n} member{'s' * (n != 1)}, {r} replica{'s' * (r != 1)}"
        return line + (", draining" if self._state == "draining" else "")

    def capacity(self) -> dict[str, Any]:
        used = {"milliCpu": 0, "memoryMiB": 0}
        for w in self._workloads.values():
            res = w.record.get("resources", {})
            for r in w.replicas:
                if r.get("meshletDid") == self.did and r["state"] in ("running", "starting"):
                    used["milliCpu"] += int(res.get("milliCpu", 0))
                    used["memoryMiB"] += int(res.get("memoryMiB", 0))
        total = {k: int(self._capacity.get(k, 0)) for k in ("milliCpu", "memoryMiB")}
        free = {k: max(0, total[k] - used[k]) for k in total}
        return {"total": total, "allocated": used, "free": free}

    def is_member(self, did: str) -> bool:
        return did in self._members or did == self.owner

    def members(self) -> list[dict[str, Any]]:
        out = []
        for cluster, dids in sorted(self._clusters.items()):
            for did in dids:
                out.append(
                    {
                        "cluster": cluster,
                        "ownerDid": did,
                        "meshletDids": [],
                        "verified": False,
                        "reason": "cluster view not wired yet (in-memory node)",
                    }
                )
        return out

    def _view(self, w: _Workload) -> dict[str, Any]:
        return {
            "uri": w.uri,
            "cid": w.cid,
            "name": w.record.get("name", ""),
            "ownerDid": w.owner,
            "replicas": int(w.record.get("replicas", 1)),
            "paused": bool(w.record.get("paused", False)),
            "running": [dict(r) for r in w.replicas],
        }

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[dict[str, Any]]:
        out = []
        for w in self._workloads.values():
            if owner and w.owner != owner:
                continue
            if not everything and not any(r.get("meshletDid") == self.did for r in w.replicas):
                continue
            out.append(self._view(w))
        return out

    def invalid_workloads(self, owner: str | None = None) -> list[dict[str, Any]]:
        return invalid_workload_views(self._refused, owner)

    def refuse(self, refusal: Refusal) -> None:
        """A record version refused by validation, as the firehose notes one it reads (the
        in-memory node reads no repo: tests hand it what a hostile member would write)."""
        self._refused = [r for r in self._refused if r.uri != refusal.uri] + [refusal]

    def _find(self, uri_or_name: str) -> _Workload:
        if uri_or_name in self._workloads:
            return self._workloads[uri_or_name]
        named = [w for w in self._workloads.values() if w.record.get("name") == uri_or_name]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise InvalidRequest(f"{uri_or_name!r} names several workloads: use the at:// URI")
        raise NotFound(f"no workload {uri_or_name}")

    def workload(self, uri: str) -> dict[str, Any]:
        return self._view(self._find(uri))

    def endpoints(self, uri: str) -> dict[str, Any]:
        # the in-memory node publishes no ports
        return {"workload": self._find(uri).uri, "endpoints": []}

    def bids(self, uri: str) -> dict[str, Any]:
        w = self._find(uri)
        winners = sorted({r["meshletDid"] for r in w.replicas if r.get("meshletDid")})
        return {
            "workload": w.uri,
            "rounds": [
                {
                    "round": 0,
                    "bids": [{"meshletDid": self.did, "priority": 0, "accepted": True}],
                    "winners": winners,
                    "why": "in-memory node: the only bidder wins every slot it has room for",
                }
            ],
        }

    def workload_record(self, uri: str) -> dict[str, Any]:
        return dict(self._find(uri).record)

    def meshlets(self) -> list[dict[str, Any]]:
        """Itself: the only meshlet an in-memory node knows."""
        cap = self.capacity()
        return [
            {
                "meshletDid": self.did,
                "ownerDid": self.owner,
                "self": True,
                "verified": True,
                "ownerClaims": True,
                "namesOwner": True,
                "consentsTo": sorted({self.owner, *self._members}),
                "state": self._state,
                "endpoint": None,
                "labels": [],
                "capacity": cap["total"],
                "allocated": cap["allocated"],
                "slots": len(self._local_replicas()),
                "reason": "",
            }
        ]

    def rounds(self, uri: str) -> dict[str, Any]:
        """Round 0 only, with itself as the only bidder (it wins every slot it has room for)."""
        w = self._find(uri)
        won = {r["slot"]: r["meshletDid"] for r in w.replicas if r.get("meshletDid")}
        bid = {
            "meshletDid": self.did,
            "priority": 0,
            "score": 0,
            "slots": int(w.record.get("replicas", 1)),
            "free": self.capacity()["free"],
            "createdAt": str(w.record.get("createdAt", "")),
            "eligible": True,
        }
        return {
            "workload": w.uri,
            "rounds": [{"round": 0, "slot": -1, "bids": [bid], "winners": won}],
        }

    def balance(self) -> dict[str, Any]:
        return {
            "halfLifeSeconds": 0,
            "owners": [
                {"ownerDid": d, "gaveMilliCpuSeconds": 0, "tookMilliCpuSeconds": 0}
                for d in [self.owner, *self._members]
            ],
        }

    def usage(self, days: int) -> dict[str, Any]:
        return {"meshletDid": self.did, "days": days, "rows": []}  # nothing runs here

    async def handles(self) -> dict[str, str]:
        return {}  # no identities to resolve

    async def logs(self, uri: str, slot: int, lines: int, cursor: str | None = None) -> LogPage:
        w = self._find(uri)
        if not any(r["slot"] == slot for r in w.replicas):
            raise NotFound(f"workload {w.uri} has no replica {slot}")
        # The cursor is how many entries were seen: the log only grows.
        if cursor is None:
            start = max(len(w.logs) - lines, 0)
        elif cursor.isdigit() and int(cursor) <= len(w.logs):
            start = int(cursor)
        else:
            raise InvalidRequest(f"not a log cursor of this meshlet: {cursor!r}")
        got = w.logs[start : start + lines]
        end = start + len(got)
        return LogPage(tuple(got), str(end))

    def log(self, uri: str, line: str) -> None:
        """Append a line to a workload's log (what its replicas "print")."""
        self._find(uri).logs.append({"line": line, "time": _now()})

    # -- mutations ---------------------------------------------------------------------

    async def create_workload(self, record: dict[str, Any]) -> dict[str, Any]:
        name = record.get("name")
        if not name:
            raise InvalidRequest("a workload needs a name")
        if any(w.record.get("name") == name for w in self._workloads.values()):
            raise Conflict(f"a workload named {name!r} exists already")
        for ref in record.get("secrets", []):
            if ref["name"] not in self._secrets:
                raise NotFound(f"secret {ref['name']!r} was not stored on this meshlet")
        self._seq += 1
        rkey = f"3m{self._seq:011d}"
        uri = f"at://{self.owner}/{NSID_WORKLOAD}/{rkey}"
        cid = "bafyrei" + hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()[:52]
        record = {"createdAt": dt.datetime.now(dt.UTC).isoformat(), **record}
        # As the PDS client does before any write (InvalidRecord names the field).
        from meshletd.atproto.lexicon import validate_record

        validate_record(NSID_WORKLOAD, record, rkey=rkey)
        w = _Workload(uri=uri, cid=cid, owner=self.owner, record=record)
        res = record.get("resources", {})
        self._workloads[uri] = w
        for slot in range(int(record.get("replicas", 1))):
            free = self.capacity()["free"]
            fits = self._state == "active" and all(
                int(res.get(k, 0)) <= free[k] for k in ("milliCpu", "memoryMiB")
            )
            replica: dict[str, Any] = {
                "workload": uri,
                "slot": slot,
                "round": 0,
                "state": "pending",
                "restarts": 0,
            }
            if fits:
                replica.update(
                    meshletDid=self.did, state="running", unit=f"meshlet-{name}-{slot}.service"
                )
            w.replicas.append(replica)
        self.log(uri, f"{name}: started {sum(r['state'] == 'running' for r in w.replicas)}")
        return {"uri": uri, "cid": cid}

    async def delete_workload(self, uri: str) -> None:
        w = self._find(uri)
        del self._workloads[w.uri]

    async def set_paused(self, uri: str, paused: bool) -> None:
        w = self._find(uri)
        w.record["paused"] = paused
        for r in w.replicas:
            if r.get("meshletDid"):
                r["state"] = "paused" if paused else "running"
        self.log(w.uri, f"{w.record.get('name')}: {'paused' if paused else 'resumed'}")

    async def update_workload(self, uri: str, image: str) -> dict[str, Any]:
        w = self._find(uri)
        before = spec_version(w.record)
        w.record["image"] = image
        after = spec_version(w.record)
        self.log(w.uri, f"{w.record.get('name')}: updated to {image}")
        return {"uri": w.uri, "version": after, "previousVersion": before}

    async def drain(self) -> str:
        if self._state == "stopping":
            raise Conflict("meshletd is stopping")
        self._state = "draining"
        for w in self._workloads.values():
            for r in w.replicas:
                if r.get("meshletDid") == self.did:
                    r.pop("meshletDid")
                    r.pop("unit", None)
                    r["state"] = "pending"
        return self._state

    async def policy(self) -> dict[str, Any]:
        # Lazy: the record layer is not otherwise loaded by `backend = "memory"`.
        from meshletd.core.records import HostPolicy
        from meshletd.daemon.hostpolicy import policy_view

        current = self._policy or HostPolicy.default(self.did)
        return policy_view(current, self._policy is not None)

    async def set_policy(self, body: dict[str, Any]) -> dict[str, Any]:
        from meshletd.core.records import HostPolicy
        from meshletd.daemon.hostpolicy import now_ms, requested_policy
        from meshletd.policy_settings import record_value, same_rules

        current = self._policy or HostPolicy.default(self.did)
        wanted = requested_policy(body, current, now_ms())
        if self._policy is None or not same_rules(self._policy, wanted):
            self._policy = wanted
        return {"policy": record_value(self._policy)}

    async def undrain(self) -> str:
        if self._state == "stopping":
            raise Conflict("meshletd is stopping")
        self._state = "active"
        return self._state

    async def put_secret(self, name: str, value: bytes) -> None:
        self._secrets[name] = bytes(value)

    def notify_records(self, refs: list[dict[str, Any]]) -> int:
        return 0  # no firehose to overtake

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        raise Forbidden("the in-memory node places every replica itself: no peer holds a slot")

    async def reconfigure(self, cfg: Config) -> None:
        self._members = list(cfg.members)
        self._clusters = {c.name: list(c.members) for c in cfg.clusters}
        c = cfg.contribution
        self._capacity = {"milliCpu": c.milli_cpu, "memoryMiB": c.memory_mib}
