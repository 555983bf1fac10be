"""The read model: what `meshletctl` and the XRPC methods show, from what this meshlet knows.

Pure: it reads the verified cluster view, the followed records (`Followed`), this
meshlet's own state (`Local`) and, when it schedules, the core's queries (placement, local
replicas, suspects, why-pending); it writes nothing and reads no clock (`balance` takes the
time). Views are plain dicts shaped like the `farm.meshlet.defs` lexicon objects, so a web
page can serve them as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from meshletd.atproto.cluster import ClusterView, Member
from meshletd.atproto.frames import Refusal
from meshletd.core.fairshare import balances, meshlet_priority
from meshletd.core.records import NSID_WORKLOAD, format_datetime_ms
from meshletd.daemon.followed import Followed, owner_of
from meshletd.daemon.local import Local, Scheduling
from meshletd.errors import NotFound

log = logging.getLogger("meshletd.node")

_REPLICA_FIELDS = ("slot", "round", "state", "exitCode", "restarts", "unit")
_LIVE_STATES = ("pulling", "starting", "running")
_REASON_MAX = 256  # graphemes: the lexicon's bound on replicaView.reason
_PROBLEM_MAX = 1000  # characters: the lexicon's bound on recordProblem.reason


def _clip(text: str, limit: int = _REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def invalid_workload_views(
    refused: Iterable[Refusal], owner: str | None = None
) -> list[dict[str, Any]]:
    """The workload records among `refused` (of `owner`, or of anyone) as
    `farm.meshlet.defs#invalidWorkloadView`s, newest first (by rkey)."""
    prefix = f"at://{owner}/" if owner else "at://"
    out = []
    for r in refused:
        if not r.uri.startswith(prefix) or r.uri.split("/")[3:4] != [NSID_WORKLOAD]:
            continue
        row: dict[str, Any] = {
            "uri": r.uri,
            "ownerDid": owner_of(r.uri),
            "problem": {"field": r.field or "", "reason": _clip(r.reason, _PROBLEM_MAX)},
        }
        if r.cid:
            row["cid"] = r.cid
        if r.name is not None:
            row["name"] = r.name
        out.append(row)
    return sorted(out, key=lambda row: row["uri"].rsplit("/", 1)[1], reverse=True)


class ReadModel:
    """`refused` gives the records whose current version validation refused (the
    firehose's `refusals()`), for the owners to see why their workload is ignored."""

    def __init__(
        self,
        local: Local,
        view: ClusterView,
        followed: Followed,
        refused: Callable[[], Iterable[Refusal]] = lambda: (),
    ) -> None:
        self.local = local
        self.view = view
        self.followed = followed
        self.refused = refused

    # -- this meshlet ----------------------------------------------------------------------

    def peers(self) -> dict[str, Member]:
        """Verified members of our clusters, ourselves excepted."""
        return {d: m for d, m in self.view.all_members().items() if d != self.local.did}

    def endpoint_of(self, meshlet: str) -> str | None:
        member = self.view.all_members().get(meshlet)
        return member.endpoint if member is not None else None

    def _local_replicas(self) -> list[dict[str, Any]]:
        me, engine = self.local.did, self.local.engine
        if engine is not None:
            return [
                {"workload": {"uri": uri}, "slot": slot, "state": state, "meshletDid": me}
                for (uri, slot), state in engine.scheduler.replicas().items()
                if state in ("starting", "running")
            ]
        return [
            s
            for per in self.followed.statuses.values()
            for s in per.values()
            if s["meshletDid"] == me and s.get("state") in ("starting", "running")
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "did": self.local.did,
            "ownerDid": self.local.owner,
            "state": self.local.state,
            "members": len(self.peers()),
            "replicas": len(self._local_replicas()),
            "workloads": len(self.followed.workloads),
            "capacity": self.capacity(),
            "backend": "atproto",
            "publishing": self.local.meshlet_repo is not None,
        }

    def status_line(self) -> str:
        n, r = len(self.peers()), len(self._local_replicas())
        line = f"{n} member{'s' * (n != 1)}, {r} replica{'s' * (r != 1)}"
        return line + (", draining" if self.local.state == "draining" else "")

    def capacity(self) -> dict[str, Any]:
        c = self.local.cfg.contribution
        total = {"milliCpu": c.milli_cpu, "memoryMiB": c.memory_mib, "storageMiB": c.storage_mib}
        used = {"milliCpu": 0, "memoryMiB": 0, "storageMiB": 0}
        for s in self._local_replicas():
            uri = (s.get("workload") or {}).get("uri", "")
            res = (self.followed.raw_workload(uri) or {}).get("resources", {})
            for k in used:
                used[k] += int(res.get(k, 0))
        free = {k: max(0, total[k] - used[k]) for k in total}
        return {"total": total, "allocated": used, "free": free}

    # -- the cluster -----------------------------------------------------------------------

    def is_member(self, did: str) -> bool:
        if did == self.local.owner:
            return True
        if any(did in owners for owners in self.view.config.values()):
            return True
        return did in self.view.all_members()

    def members(self) -> list[dict[str, Any]]:
        out = []
        snapshots = self.view.clusters()
        for c in self.local.cfg.clusters:
            snap = snapshots.get(c.name)
            for owner in c.members:
                claimed = sorted(self.view.claimed_meshlets(owner))
                verified = sorted(d for d in claimed if snap is not None and d in snap.members)
                reasons = [r for d in claimed if (r := self.view.why_not(d, owner))]
                if not claimed:
                    reasons = [f"{owner} has no commune.scheduler.meshlet record (yet)"]
                out.append(
                    {
                        "cluster": c.name,
                        "ownerDid": owner,
                        "meshletDids": verified,
                        "verified": bool(verified),
                        "reason": "; ".join(reasons),
                    }
                )
        return out

    # -- workloads -------------------------------------------------------------------------

    def uri_of(self, ref: str) -> str:
        """A workload's URI from its URI or (for our owner's workloads) its name."""
        if ref in self.followed.workloads:
            return ref
        if ref.startswith("at://"):
            raise NotFound(f"no workload {ref} is known here")
        mine = self.followed.named(self.local.owner, ref)
        if not mine:
            raise NotFound(f"no workload named {ref!r}")
        return mine[0]

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[dict[str, Any]]:
        out = []
        for uri in sorted(self.followed.workloads):
            v = self._view(uri)
            if owner and v["ownerDid"] != owner:
                continue
            if not everything and not any(
                r.get("meshletDid") == self.local.did for r in v["running"]
            ):
                continue
            out.append(v)
        return out

    def workload(self, ref: str) -> dict[str, Any]:
        return self._view(self.uri_of(ref))

    def invalid_workloads(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Workload records (of `owner`, or of anyone) ignored as invalid, newest first,
        each with the offending field and the reason (`invalidWorkloadView`)."""
        return invalid_workload_views(self.refused(), owner)

    def _view(self, uri: str) -> dict[str, Any]:
        published = self.followed.workloads[uri]
        engine = self.local.engine
        running: list[dict[str, Any]] = []
        owners: dict[int, str] = {}  # slot -> owner, when the scheduler knows the placement
        if engine is not None:
            running = self._placed(engine, uri, published.replicas)
            owners = {r["slot"]: r["meshletDid"] for r in running if r.get("meshletDid")}
        suspects = self._suspects()
        statuses = self.followed.statuses.get(uri, {}).values()
        for s in sorted(statuses, key=lambda s: s.get("slot", 0)):
            if any(
                r["slot"] == s.get("slot") and r.get("meshletDid") == s["meshletDid"]
                for r in running
            ):
                continue
            r = {k: s[k] for k in _REPLICA_FIELDS if k in s}
            row: dict[str, Any] = {"workload": uri, "meshletDid": s["meshletDid"], **r}
            moved_to = owners.get(s.get("slot", -1))
            if moved_to is not None and s.get("state") in _LIVE_STATES:
                # A status left by a host that lost the slot: it is not a serving replica.
                if s["meshletDid"] in suspects:
                    row["state"] = "lost"
                    row["reason"] = f"{s['meshletDid']} is suspected lost (probes fail)"
                else:
                    row["state"] = "stopping"
                    row["reason"] = f"slot moved to {moved_to} (make-before-break)"
            running.append(row)
        view: dict[str, Any] = {
            "uri": uri,
            "name": published.name,
            "ownerDid": owner_of(uri),
            "replicas": published.replicas,
            "paused": bool(published.record.get("paused", False)),
            "running": running,
        }
        if published.cid:
            view["cid"] = published.cid
        return view

    def _suspects(self) -> set[str]:
        """Peers this meshlet's probes currently say are lost (empty when not scheduling)."""
        engine = self.local.engine
        return set(engine.scheduler.suspects) if engine is not None else set()

    @staticmethod
    def _pending_reasons(engine: Scheduling, uri: str) -> dict[int, str]:
        try:
            return dict(engine.scheduler.pending_reasons(uri))
        except Exception:  # a display aid must never break `meshletctl workloads`
            log.exception("pending reasons of %s", uri)
            return {}

    def _placed(self, engine: Scheduling, uri: str, replicas: int) -> list[dict[str, Any]]:
        """Slots as the scheduler core sees them: owner per slot (local state if ours, else
        the host's reported state, `lost` while our probes suspect it), or `pending` with
        the core's reason why nobody serves it yet."""
        me = self.local.did
        placed = engine.scheduler.placement().get(uri)
        owners = placed if placed is not None else (None,) * replicas
        local = engine.scheduler.replicas()
        reasons = self._pending_reasons(engine, uri)
        suspects = self._suspects()
        out = []
        for slot, owner in enumerate(owners):
            r: dict[str, Any]
            if owner is None:
                r = {"workload": uri, "slot": slot, "state": "pending"}
                if slot in reasons:
                    r["reason"] = _clip(reasons[slot])
                out.append(r)
                continue
            rnd, meshlet = owner
            r = {"workload": uri, "slot": slot, "round": rnd, "meshletDid": meshlet}
            # The host's own status record (its latest round) says how the replica is doing.
            reported = [
                st
                for st in self.followed.statuses.get(uri, {}).values()
                if st["meshletDid"] == meshlet and st.get("slot") == slot
            ]
            status = max(reported, key=lambda st: st.get("round", 0)) if reported else None
            if meshlet == me and (uri, slot) in local:
                r["state"] = local[(uri, slot)]
            elif status is not None and status.get("round", 0) >= rnd:
                r["state"] = status["state"]
            else:
                r["state"] = "starting" if status is None else "pending"
            if meshlet != me and meshlet in suspects and r["state"] in _LIVE_STATES:
                r["state"] = "lost"
            for key in ("exitCode", "restarts"):
                if status is not None and key in status:
                    r[key] = status[key]
            if slot in reasons:
                r["reason"] = _clip(reasons[slot])
            if meshlet == me:
                unit = engine.units.get((uri, slot))
                if unit:
                    r["unit"] = unit
            out.append(r)
        return out

    def bids(self, ref: str) -> dict[str, Any]:
        uri = self.uri_of(ref)
        members = self.view.all_members()
        rounds: dict[int, list[dict[str, Any]]] = {}
        for b in self.followed.bids.get(uri, {}).values():
            rounds.setdefault(int(b.get("round", 0)), []).append(
                {
                    "meshletDid": b["meshletDid"],
                    "priority": b.get("priority", 0),
                    "accepted": b["meshletDid"] in members,
                }
            )
        winners: dict[int, set[str]] = {}
        for s in self.followed.statuses.get(uri, {}).values():
            winners.setdefault(int(s.get("round", 0)), set()).add(s["meshletDid"])
        return {
            "workload": uri,
            "rounds": [
                {
                    "round": r,
                    "bids": sorted(bs, key=lambda b: (-b["priority"], b["meshletDid"])),
                    "winners": sorted(winners.get(r, set())),
                    "why": "winners are the meshlets reporting a replica of this round",
                }
                for r, bs in sorted(rounds.items())
            ],
        }

    def balance(self, now_ms: int) -> dict[str, Any]:
        """The fair-share ledger from the usage records seen, with the core's own formula."""
        t = self.local.cfg.scheduling
        # As the core does for its bids: at the start of the current usage period, from the
        # records of periods that ended by then (docs/protocol.md section 11).
        at = now_ms - now_ms % t.usage_period_ms
        owner_of_meshlet = {m: rec.owner_did for m, rec in self.view.owners.items()}
        usages = self.followed.usages.values()
        taken, given = balances(usages, owner_of_meshlet, at, t.half_life_ms)
        owners = list(dict.fromkeys([self.local.owner, *self.local.cfg.members, *taken, *given]))
        return {
            "at": format_datetime_ms(at),
            "halfLifeSeconds": t.half_life_ms // 1000,
            "usagePeriodSeconds": t.usage_period_ms // 1000,
            "owners": [
                {
                    "ownerDid": o,
                    "gaveMilliCpuSeconds": given.get(o, 0),
                    "tookMilliCpuSeconds": taken.get(o, 0),
                    "priority": meshlet_priority(o, taken, given),
                }
                for o in owners
            ],
        }

    def shown_dids(self) -> set[str]:
        """Every DID this meshlet shows: itself, owners, members, workload owners."""
        cfg = self.local.cfg
        dids = {cfg.did, cfg.owner, *cfg.members, *self.view.all_members()}
        return dids | {owner_of(u) for u in self.followed.workloads}
