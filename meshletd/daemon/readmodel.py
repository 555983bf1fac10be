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

from meshletd.atproto.cluster import ConfiguredClusters, Member
from meshletd.atproto.frames import Refusal
from meshletd.core.commons import DEFAULT_PERIOD_DAYS, Rule, rule_of
from meshletd.core.fairshare import balances, meshlet_priority
from meshletd.core.hashing import rendezvous_score
from meshletd.core.records import format_datetime_ms
from meshletd.daemon.followed import Followed, owner_of
from meshletd.daemon.ledgerview import (
    contribution_from_records,
    rule_view,
    standing_fields,
    usage_view,
)
from meshletd.daemon.local import Local, Scheduling
from meshletd.daemon.views import LIVE_STATES, clip, invalid_workload_views, serving, status_row
from meshletd.errors import DaemonUnavailable, NotFound
from meshletd.policy_settings import to_policy

log = logging.getLogger("meshletd.node")

# (our replica's state, what our status says) shown as the status: a start pulling its
# image, or an exited replica waiting for its next try with why the last did not start.
# An exited replica whose status still says `pulling` exited: that shows as such.
SHOWN_FROM_STATUS = frozenset(
    {("starting", "pulling"), ("starting", "pending"), ("exited", "pending")}
)


class ReadModel:
    """`refused` gives the records whose current version validation refused (the
    firehose's `refusals()`), for the owners to see why their workload is ignored."""

    def __init__(
        self,
        local: Local,
        view: ConfiguredClusters,
        followed: Followed,
        refused: Callable[[], Iterable[Refusal]] = lambda: (),
        loaded: Callable[[], bool] = lambda: True,
    ) -> None:
        self.local = local
        self.view = view
        self.followed = followed
        self.refused = refused
        # Whether the start-up read of every watched repo is done (docs/protocol.md s13).
        self.loaded = loaded

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
            {
                "workload": {"uri": s.workload_uri},
                "slot": s.slot,
                "state": s.state,
                "meshletDid": me,
            }
            for per in self.followed.statuses.values()
            for s in per.values()
            if s.meshlet == me and s.state in ("starting", "running")
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
            "limits": self.limits(),
            "backend": "atproto",
            "publishing": self.local.meshlet_repo is not None,
        }

    def limits(self) -> dict[str, Any]:
        """The limits in force: [contribution]'s caps on the slice, max replicas, and which
        slice limits an administrator's drop-in sets instead (docs/runtime.md)."""
        c = self.local.cfg.contribution
        out: dict[str, Any] = {
            "milliCpu": c.milli_cpu,
            "memoryMiB": c.memory_mib,
            "maxReplicas": c.max_replicas,
            "enforced": self.local.engine is not None,
        }
        if c.tasks_max is not None:
            out["tasksMax"] = c.tasks_max
        engine = self.local.engine
        if engine is not None and engine.admin_slice_keys:
            out["adminSet"] = sorted(engine.admin_slice_keys)
        return out

    def status_line(self) -> str:
        n, r = len(self.peers()), len(self._local_replicas())
        line = f"{n} member{'s' * (n != 1)}, {r} replica{'s' * (r != 1)}"
        return line + (", draining" if self.local.state == "draining" else "")

    def capacity(self) -> dict[str, Any]:
        c = self.local.cfg.contribution
        total = {"milliCpu": c.milli_cpu, "memoryMiB": c.memory_mib, "storageMiB": c.storage_mib}
        used = {"milliCpu": 0, "memoryMiB": 0, "storageMiB": 0}
        for s in self._local_replicas():
            wl = self.followed.workloads.get(s["workload"]["uri"])
            if wl is not None:
                used["milliCpu"] += wl.milli_cpu
                used["memoryMiB"] += wl.memory_mib
                used["storageMiB"] += wl.storage_mib
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
        mine = [] if ref.startswith("at://") else self.followed.named(self.local.owner, ref)
        if mine:
            return mine[0]
        if not self.loaded():
            # Not "no such workload": right after a start it may just not be read yet.
            raise DaemonUnavailable(
                f"meshletd is still reading the cluster's records after its start, and "
                f"{ref!r} is not among those read so far: retry in a moment"
            )
        if ref.startswith("at://"):
            raise NotFound(f"no workload {ref} is known here")
        raise NotFound(f"no workload named {ref!r}")

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
        wl = self.followed.workloads[uri]
        engine = self.local.engine
        running: list[dict[str, Any]] = []
        owners: dict[int, str] = {}  # slot -> owner, when the scheduler knows the placement
        if engine is not None:
            running = self._placed(engine, uri, wl.replicas)
            owners = {r["slot"]: r["meshletDid"] for r in running if r.get("meshletDid")}
        suspects = self._suspects()
        statuses = self.followed.statuses.get(uri, {}).values()
        for s in sorted(statuses, key=lambda s: s.slot):
            if any(r["slot"] == s.slot and r.get("meshletDid") == s.meshlet for r in running):
                continue
            row = status_row(s)
            moved_to = owners.get(s.slot)
            if moved_to is not None and s.state in LIVE_STATES:
                # A status left by a host that lost the slot: it is not a serving replica.
                if s.meshlet in suspects:
                    row["state"] = "lost"
                    row["reason"] = f"{s.meshlet} is suspected lost (probes fail)"
                else:
                    row["state"] = "stopping"
                    row["reason"] = f"slot moved to {moved_to} (make-before-break)"
            running.append(row)
        view: dict[str, Any] = {
            "uri": uri,
            "name": wl.name,
            "ownerDid": wl.owner,
            "replicas": wl.replicas,
            "paused": wl.paused,
            "running": running,
        }
        if wl.version:
            view["version"] = wl.version
        if wl.rollback_version:
            view["rollback"] = clip(
                f"update to version {wl.rollback_version} rolled back: {wl.rollback_reason}"
            )
        if wl.cid:
            view["cid"] = wl.cid
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
                    r["reason"] = clip(reasons[slot])
                out.append(r)
                continue
            rnd, meshlet = owner
            r = {"workload": uri, "slot": slot, "round": rnd, "meshletDid": meshlet}
            # The host's own status record (its latest round) says how the replica is doing.
            reported = [
                st
                for st in self.followed.statuses.get(uri, {}).values()
                if st.meshlet == meshlet and st.slot == slot
            ]
            status = max(reported, key=lambda st: st.round) if reported else None
            if meshlet == me and (uri, slot) in local:
                r["state"] = local[(uri, slot)]
                if status is not None and status.round >= rnd and status.state == "failing":
                    r["state"] = "failing"  # what our status says: it is being handed off
                elif (
                    status is not None
                    and status.round >= rnd
                    and (r["state"], status.state) in SHOWN_FROM_STATUS
                ):
                    # how far the start is (an image pull), or, while it waits for its
                    # next try, why the last one did not start: not a final exit
                    r["state"] = status.state
            elif status is not None and status.round >= rnd:
                r["state"] = status.state
            else:
                r["state"] = "starting" if status is None else "pending"
            if meshlet != me and meshlet in suspects and r["state"] in LIVE_STATES:
                r["state"] = "lost"
            if status is not None:
                if status.exit_code is not None:
                    r["exitCode"] = status.exit_code
                r["restarts"] = status.restarts
                if status.round >= rnd:
                    serving(r, status)
            if slot in reasons:
                r["reason"] = clip(reasons[slot])
            if meshlet == me:
                unit = engine.units.get((uri, slot))
                if unit:
                    r["unit"] = unit
            out.append(r)
        return out

    def endpoints(self, ref: str) -> dict[str, Any]:
        """Where each serving replica of a workload publishes its ports (its host's status
        record: the endpoint moves with the replica), slot by slot; replicas a host is
        leaving (make-before-break) or that are lost are left out."""
        uri = self.uri_of(ref)
        out = []
        for r in self._view(uri)["running"]:
            if r.get("state") in ("stopping", "lost", "pending") or not r.get("meshletDid"):
                continue
            for e in r.get("endpoints", ()):
                row = {"slot": r["slot"], "meshletDid": r["meshletDid"], **e}
                row["state"] = r["state"]
                if "health" in r:
                    row["health"] = r["health"]
                out.append(row)
        return {"workload": uri, "endpoints": sorted(out, key=lambda e: (e["slot"], e["name"]))}

    def bids(self, ref: str) -> dict[str, Any]:
        uri = self.uri_of(ref)
        members = self.view.all_members()
        rounds: dict[int, list[dict[str, Any]]] = {}
        for b in self.followed.bids.get(uri, {}).values():
            rounds.setdefault(b.round, []).append(
                {"meshletDid": b.meshlet, "priority": b.priority, "accepted": b.meshlet in members}
            )
        winners: dict[int, set[str]] = {}
        for s in self.followed.statuses.get(uri, {}).values():
            winners.setdefault(s.round, set()).add(s.meshlet)
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

    def workload_record(self, ref: str) -> dict[str, Any]:
        """The workload record as its owner published it (kind, image, resources, ...)."""
        from meshletd.atproto.records import record_to_json

        return dict(record_to_json(self.followed.workloads[self.uri_of(ref)]))

    def meshlets(self) -> list[dict[str, Any]]:
        """Every meshlet an owner of our clusters claims, verified or not, for the web page:
        its owner, whether the link holds both ways (the owner claims it, it names the owner
        back) and whom it consents to, its state (`lost` while our probes suspect it), the
        capacity it publishes and what the slots it holds take of it."""
        cfg = self.local.cfg
        members = self.view.all_members()
        suspects = self._suspects()
        slots = self._slots_by_meshlet()
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for owner in dict.fromkeys([self.local.owner, *cfg.members]):
            claimed = set(self.view.claimed_meshlets(owner))
            if owner == self.local.owner:
                claimed.add(self.local.did)
            for d in sorted(claimed):
                if d in seen:
                    continue
                seen.add(d)
                rec = self.view.owners.get(d)
                state = rec.state if rec is not None else "unknown"
                if d == self.local.did:
                    state = self.local.state
                elif d in suspects:
                    state = "lost"
                allocated = {"milliCpu": 0, "memoryMiB": 0}
                for uri in slots.get(d, []):
                    wl = self.followed.workloads.get(uri)
                    if wl is not None:
                        allocated["milliCpu"] += wl.milli_cpu
                        allocated["memoryMiB"] += wl.memory_mib
                if rec is not None:
                    total = {"milliCpu": rec.milli_cpu, "memoryMiB": rec.memory_mib}
                elif d == self.local.did:
                    c = cfg.contribution
                    total = {"milliCpu": c.milli_cpu, "memoryMiB": c.memory_mib}
                else:
                    total = {"milliCpu": 0, "memoryMiB": 0}
                out.append(
                    {
                        "meshletDid": d,
                        "ownerDid": owner,
                        "self": d == self.local.did,
                        "verified": d in members,
                        "ownerClaims": d in self.view.claimed_meshlets(owner)
                        or d == self.local.did,
                        "namesOwner": rec is not None and rec.owner == owner,
                        "consentsTo": sorted(self.view.consented_owners(d)),
                        "state": state,
                        "endpoint": (rec.endpoint or None) if rec is not None else None,
                        "labels": sorted(rec.labels) if rec is not None else [],
                        "capacity": total,
                        "allocated": allocated,
                        "slots": len(slots.get(d, [])),
                        "reason": self.view.why_not(d, owner) or "",
                    }
                )
        return out

    def _slots_by_meshlet(self) -> dict[str, list[str]]:
        """meshlet DID -> the workload URI of each slot it holds (the scheduler's placement
        when it schedules, else the live statuses it reports)."""
        out: dict[str, list[str]] = {}
        engine = self.local.engine
        if engine is not None:
            for uri, owners in engine.scheduler.placement().items():
                for owner in owners:
                    if owner is not None:
                        out.setdefault(owner[1], []).append(uri)
            return out
        for uri, per in self.followed.statuses.items():
            for s in per.values():
                if s.state in LIVE_STATES:
                    out.setdefault(s.meshlet, []).append(uri)
        return out

    def rounds(self, ref: str) -> dict[str, Any]:
        """Every round of a workload as the bids this meshlet has seen tell it: per round
        and slot, each bid (priority, score, offered slots or a decline, the free capacity it
        stated) and the winners (the slots' owners by the scheduler's placement, else the
        meshlets that report a replica of that round). For the web page's "rounds,
        explained"; ordering and scores are docs/protocol.md section 6's."""
        uri = self.uri_of(ref)
        members = self.view.all_members()
        owners: dict[int, tuple[int, str]] = {}
        engine = self.local.engine
        if engine is not None:
            placed = engine.scheduler.placement().get(uri) or ()
            owners = {s: (o[0], o[1]) for s, o in enumerate(placed) if o is not None}
        reported: dict[tuple[int, int], set[str]] = {}
        for st in self.followed.statuses.get(uri, {}).values():
            reported.setdefault((st.round, st.slot), set()).add(st.meshlet)
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for b in self.followed.bids.get(uri, {}).values():
            slot = b.slot if b.round > 0 else -1
            groups.setdefault((b.round, slot), []).append(
                {
                    "meshletDid": b.meshlet,
                    "priority": b.priority,
                    "score": rendezvous_score(uri, b.round, slot, b.meshlet),
                    "slots": b.slots,
                    "free": {"milliCpu": b.free_milli_cpu, "memoryMiB": b.free_memory_mib},
                    "createdAt": format_datetime_ms(b.created_at),
                    "eligible": b.meshlet in members,
                }
            )
        out = []
        for (rnd, slot), bids in sorted(groups.items()):
            bids.sort(key=lambda b: (-b["priority"], b["score"]))
            # The hosts' reports tell past rounds (a slot since moved on); the scheduler's
            # placement, where it has one, is the word for the rounds that own slots now.
            won: dict[int, str] = {}
            for (srnd, s), ms in reported.items():
                if srnd == rnd and (slot == -1 or s == slot):
                    won[s] = sorted(ms)[0]
            for s, (ornd, m) in owners.items():
                if ornd == rnd and (slot == -1 or s == slot):
                    won[s] = m
            out.append({"round": rnd, "slot": slot, "bids": bids, "winners": won})
        return {"workload": uri, "rounds": out}

    def balance(self, now_ms: int) -> dict[str, Any]:
        """The fair-share ledger from the usage records seen, with the core's own formula,
        and each owner's standing under this host's free-rider rule (sections 11 and 22)."""
        t = self.local.cfg.scheduling
        # As the core does for its bids: at the start of the current usage period, from the
        # records of periods that ended by then (docs/protocol.md section 11).
        at = now_ms - now_ms % t.usage_period_ms
        owner_of_meshlet = {m: rec.owner for m, rec in self.view.owners.items()}
        usages = self.followed.usages.values()
        taken, given = balances(usages, owner_of_meshlet, at, t.half_life_ms)
        rule, lent, used = self._contribution(at)
        days = rule.period_days if rule is not None else DEFAULT_PERIOD_DAYS
        me = self.local.owner
        owners = list(dict.fromkeys([me, *self.local.cfg.members, *taken, *given, *lent, *used]))
        return {
            "at": format_datetime_ms(at),
            "halfLifeSeconds": t.half_life_ms // 1000,
            "usagePeriodSeconds": t.usage_period_ms // 1000,
            **rule_view(rule, days),
            "owners": [
                {
                    "ownerDid": o,
                    "gaveMilliCpuSeconds": given.get(o, 0),
                    "tookMilliCpuSeconds": taken.get(o, 0),
                    "priority": meshlet_priority(o, taken, given),
                    **standing_fields(o, me, rule, lent, used),
                }
                for o in owners
            ],
        }

    def _contribution(self, at: int) -> tuple[Rule | None, dict[str, int], dict[str, int]]:
        """The rule and (lent, used) as this meshlet's core judges them; without an engine,
        from the configured [policy] and the usage records followed here."""
        engine = self.local.engine
        if engine is not None:
            return engine.scheduler.contribution()
        cfg = self.local.cfg
        rule = None if cfg.policy is None else rule_of(to_policy(cfg.policy, cfg.did, 0))
        days = rule.period_days if rule is not None else DEFAULT_PERIOD_DAYS
        counted = frozenset({cfg.owner, *cfg.members})
        usages = self.followed.usages.values()
        lent, used = contribution_from_records(usages, self.view.owners, counted, at, days)
        return rule, lent, used

    def usage(self, now_ms: int, days: int) -> dict[str, Any]:
        """What ran on this meshlet per UTC day and owner, from its usage records."""
        return usage_view(self.followed.usages.values(), self.local.did, now_ms, days)

    def shown_dids(self) -> set[str]:
        """Every DID this meshlet shows: itself, owners, members, workload owners."""
        cfg = self.local.cfg
        dids = {cfg.did, cfg.owner, *cfg.members, *self.view.all_members()}
        return dids | {owner_of(u) for u in self.followed.workloads}
