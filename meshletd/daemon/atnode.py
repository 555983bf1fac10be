"""The node backed by the atproto layer: real cluster view, workloads in real repos.

What it does today: publishes this meshlet's own records (owner link, meshletOwner,
memberships), keeps the verified cluster view live from the members' firehoses (cursors in
the state store), follows every workload, bid and workloadStatus record of the watched repos,
publishes/pauses/deletes the owner's workloads through the owner's PDS, and drains by
republishing meshletOwner.state. Placement, the runtime and fair share are not wired in yet:
replicas shown are those reported by workloadStatus records.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import trio

from meshletd.config import Config, Credentials
from meshletd.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    UpstreamFailure,
)
from meshletd.trace import trace

log = logging.getLogger("meshletd.node")

WORKLOAD = "commune.scheduler.workload"
BID = "commune.scheduler.bid"
STATUS = "commune.scheduler.workloadStatus"
USAGE = "commune.scheduler.usage"
MESHLET_OWNER = "commune.scheduler.meshletOwner"
_B32 = "234567abcdefghijklmnopqrstuvwxyz"
_REPLICA_FIELDS = ("slot", "round", "state", "exitCode", "restarts", "unit")
# Records whose writes we hint to peers (docs/protocol.md, section 17), and up to how many
# peers (beyond that, the firehose alone: a hint per peer per write would not scale).
HINTED = frozenset({WORKLOAD, BID, STATUS, MESHLET_OWNER})
HINT_MAX_PEERS = 16
_LIVE_STATES = ("pulling", "starting", "running")
_HANDLE = re.compile(r"^(?=.{3,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*$")
_REASON_MAX = 256  # graphemes: the lexicon's bound on replicaView.reason


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def new_tid(now_us: int | None = None, clock_id: int | None = None) -> str:
    """An atproto TID (sortable record key) from the wall clock in microseconds."""
    us = time.time_ns() // 1000 if now_us is None else now_us
    cid = int.from_bytes(os.urandom(2), "big") % 1024 if clock_id is None else clock_id
    n = (us << 10) | cid
    out = ""
    for _ in range(13):
        out = _B32[n & 31] + out
        n >>= 5
    return out


class StoreCursors:
    """The firehose's `CursorStore` in the crash-safe state store (one key for all PDSes)."""

    KEY = "firehose-cursors"

    def __init__(self, store: Any) -> None:
        self._store = store
        self._cursors: dict[str, int] = dict(store.get(self.KEY, {}) or {})

    def load(self, pds_url: str) -> int | None:
        return self._cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        if self._cursors.get(pds_url) == seq:
            return
        self._cursors[pds_url] = seq
        self._store.put(self.KEY, self._cursors)


class StoreJournal:
    """The write queue's `WriteJournal` in the crash-safe state store: writes queued for the
    PDS survive a restart (e.g. while the PDS is down)."""

    KEY = "pending-writes"

    def __init__(self, store: Any) -> None:
        self._store = store

    def load(self) -> list[dict[str, Any]]:
        value = self._store.get(self.KEY, [])
        return value if isinstance(value, list) else []

    def save(self, pending: list[dict[str, Any]]) -> None:
        self._store.put(self.KEY, pending)


class AtprotoNode:
    """`Node` over the atproto layer (see module doc)."""

    def __init__(self, cfg: Config, credentials: Credentials, store: Any) -> None:
        from meshletd.atproto.cluster import ClusterView
        from meshletd.atproto.identity import IdentityResolver

        self.cfg = cfg
        self.did = cfg.did
        self.owner = cfg.owner
        self._credentials = credentials
        self._store = store
        self._state = "active"
        self.resolver = IdentityResolver(cfg.plc_url, ttl_s=300)
        self.view = ClusterView.create(cfg.did, cfg.owner, self._clusters(cfg))
        self.meshlet_pds: Any = None
        self.owner_pds: Any = None
        self.formation: Any = None
        # uri -> (cid, record); bids and statuses by workload uri
        self._workloads: dict[str, tuple[str | None, dict[str, Any]]] = {}
        self._bids: dict[str, dict[str, dict[str, Any]]] = {}
        self._statuses: dict[str, dict[str, dict[str, Any]]] = {}
        self._usages: dict[str, Any] = {}  # uri -> meshletd.core.records.Usage
        from meshletd.daemon.secrets import EncryptionKey, SecretStore

        self._secrets = SecretStore(store)
        self.key = EncryptionKey(store)
        self.engine: Any = None
        self.writes: Any = None
        self._nursery: trio.Nursery | None = None
        self._hint_http: Any = None

    @staticmethod
    def _clusters(cfg: Config) -> dict[str, list[str]]:
        # Our own owner is listed in every membership record: the scheduler core counts a
        # bid only from meshlets whose membership names the workload's owner.
        return {c.name: list(dict.fromkeys([*c.members, cfg.owner])) for c in cfg.clusters}

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish our records, start following the cluster; `started` once watches are set."""
        from meshletd.atproto.cluster import ClusterFormation
        from meshletd.atproto.firehose import Firehose

        cursors = StoreCursors(self._store)

        def firehose(sink: Any) -> Any:
            return Firehose(self.resolver, cursors, sink)

        self.formation = ClusterFormation(self.view, firehose)
        self.formation.add_listener(self._on_event)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with trio.move_on_after(20):
                await self._login_and_publish()
            await self._start_engine(nursery)
            await nursery.start(self.formation.run)
            log.info("cluster view loaded: %s", self.formation.describe())
            task_status.started()

    def _runtime_kind(self) -> str:
        kind = self.cfg.runtime
        if kind == "auto":
            kind = "systemd" if os.path.isdir("/run/systemd/system") else "none"
        return kind

    async def _start_engine(self, nursery: trio.Nursery) -> None:
        """The scheduler core + runtime + write queue; skipped when observing only."""
        kind = self._runtime_kind()
        if kind == "none" or self.meshlet_pds is None:
            log.warning(
                "scheduler not started (runtime %s, %s): this meshlet only observes",
                kind,
                "publishing" if self.meshlet_pds else "no meshlet credentials",
            )
            return
        from meshletd.atproto.pds import Write, WriteQueue
        from meshletd.core.scheduler import MeshletIdentity, Scheduler
        from meshletd.daemon.engine import Engine
        from meshletd.runtime import fake_runtime, systemd_runtime

        runtime = systemd_runtime() if kind == "systemd" else fake_runtime()
        c = self.cfg.contribution
        me = MeshletIdentity(
            did=self.did,
            owner=self.owner,
            milli_cpu=c.milli_cpu,
            memory_mib=c.memory_mib,
            arch=self.cfg.arch or _machine_arch(),
            labels=frozenset(self.cfg.labels),
            endpoint=self.cfg.public_endpoint or "",
            # Without an endpoint nobody can probe us: a lease says we live (protocol §8).
            lease=not self.cfg.public_endpoint,
        )
        self.writes = WriteQueue(
            self.meshlet_pds, journal=StoreJournal(self._store), prime=(BID, STATUS, USAGE)
        )
        if self.writes.pending:
            log.info("%d write(s) left from the last run will be sent", len(self.writes.pending))
        await nursery.start(self.writes.run)

        def submit(w: tuple[str, str, str, Any]) -> None:
            action, collection, rkey, value = w
            if collection == MESHLET_OWNER and value is not None:
                value = self._complete_owner_record(value)
            try:
                self.writes.submit(Write(action, collection, rkey, value))
            except Exception as e:  # a record the lexicon refuses: a bug, not a reason to die
                log.error("write %s/%s dropped: %s (value %r)", collection, rkey, e, value)

        self.engine = Engine(
            Scheduler(me, self.cfg.scheduling.timing()),
            runtime,
            submit,
            raw_workload=lambda uri: (self._workloads.get(uri) or (None, None))[1],
            secret=self.fetch_secret,
            workload_cid=lambda uri: (self._workloads.get(uri) or (None, None))[0],
            probe=self._probe,
        )
        adopted = await nursery.start(self.engine.run)
        log.info("scheduler running on the %s runtime; %d replica(s) adopted", kind, len(adopted))

    async def _probe(self, meshlet: str) -> bool:
        import httpx

        member = self.view.all_members().get(meshlet)
        endpoint = member.endpoint if member else None
        if not endpoint:
            return False
        async with httpx.AsyncClient(timeout=2.0) as http:
            r = await http.get(f"{endpoint.rstrip('/')}/xrpc/farm.meshlet.ping")
        return r.status_code == 200

    async def _login_and_publish(self) -> None:
        from meshletd.atproto.pds import PdsClient

        creds = self._credentials
        try:
            if creds.meshlet_app_password is not None and self.meshlet_pds is None:
                pds = PdsClient(
                    self.cfg.pds, self.did, creds.meshlet_app_password.get_secret_value()
                )
                await pds.login()
                self.meshlet_pds = pds
            if creds.owner_app_password is not None and self.owner_pds is None:
                owner_pds_url = self.cfg.owner_pds or await self._pds_of(self.owner)
                pds = PdsClient(
                    owner_pds_url, self.owner, creds.owner_app_password.get_secret_value()
                )
                await pds.login()
                self.owner_pds = pds
            for client in (self.meshlet_pds, self.owner_pds):
                if client is not None:
                    client.on_commit = lambda done, repo=client.did: self._committed(repo, done)
            if self.meshlet_pds is None:
                log.warning("no meshlet-app-password credential: running read-only")
                return
            await self._restore_state()
            await self._publish()
        except Exception as e:  # PDS down or wrong password: keep serving, say why
            log.warning("cannot publish this meshlet's records: %s", e)

    async def _restore_state(self) -> None:
        """A drain outlives a restart (an operator drains before maintenance, and the reboot
        must not put the machine back to work): start in the state our published
        meshletOwner record has. The core reads the same record and keeps draining."""
        got = await self.meshlet_pds.get_record(MESHLET_OWNER, "self")
        if got is not None and got[1].get("state") == "draining" and self._state != "draining":
            self._state = "draining"
            log.info(
                "this meshlet was draining when meshletd stopped (since %s): it stays "
                "draining until `meshletctl undrain`",
                got[1].get("stateSince", "?"),
            )

    async def _pds_of(self, did: str) -> str:
        ident = await self.resolver.resolve(did)
        if not ident.pds:
            raise UpstreamFailure(f"{did} has no PDS in its DID document")
        return ident.pds

    async def _publish(self) -> int:
        from meshletd import __version__
        from meshletd.atproto.cluster import publish_own_records
        from meshletd.atproto.records import MeshletOwner, Resources

        c = self.cfg.contribution
        record = MeshletOwner(
            owner_did=self.owner,
            state=self._state,
            capacity=Resources(
                milli_cpu=c.milli_cpu, memory_mib=c.memory_mib, storage_mib=c.storage_mib
            ),
            arch=self.cfg.arch or _machine_arch(),
            endpoint=self.cfg.public_endpoint,
            labels=tuple(self.cfg.labels),
            encryption_key=self.key.public_b64,
            version=__version__,
        )
        writes = await publish_own_records(
            self.meshlet_pds, self.owner_pds, record, self._clusters(self.cfg)
        )
        log.info("published this meshlet's records (%d write(s))", writes)
        return writes

    # -- delivery hints (docs/protocol.md, section 17) ------------------------------------

    def _committed(self, repo: str, done: list[tuple[str, str, str | None]]) -> None:
        """Records we just wrote: tell our peers, so they need not wait for the firehose."""
        refs = [
            {"uri": f"at://{repo}/{coll}/{rkey}", **({"cid": cid} if cid else {})}
            for coll, rkey, cid in done
            if coll in HINTED
        ]
        if not refs:
            return
        if repo == self.owner:
            self.notify_records(refs)  # our own scheduler follows our owner's repo too
        peers = sorted({m.endpoint for m in self._peers().values() if m.endpoint})
        if not peers or len(peers) > HINT_MAX_PEERS or self._nursery is None:
            return
        for endpoint in peers:
            self._nursery.start_soon(self._send_hint, endpoint, refs)

    async def _send_hint(self, endpoint: str, refs: list[dict[str, str]]) -> None:
        import httpx

        if self._hint_http is None:
            self._hint_http = httpx.AsyncClient(timeout=1.0)
        try:
            await self._hint_http.post(
                f"{endpoint.rstrip('/')}/xrpc/farm.meshlet.notifyRecords", json={"records": refs}
            )
        except httpx.HTTPError as e:  # a hint is best effort: the firehose brings it anyway
            log.debug("hint to %s not sent: %s", endpoint, e)

    def notify_records(self, refs: list[dict[str, Any]]) -> int:
        firehose = self.formation.firehose if self.formation is not None else None
        if firehose is None:
            return 0
        accepted = 0
        for ref in refs:
            uri, cid = ref.get("uri", ""), ref.get("cid")
            parts = uri[len("at://") :].split("/") if uri.startswith("at://") else []
            if len(parts) != 3 or not all(parts):
                continue
            did, coll, rkey = parts
            if firehose.hint(did, coll, rkey, cid if isinstance(cid, str) else None):
                accepted += 1
        return accepted

    def _complete_owner_record(self, value: dict[str, Any]) -> dict[str, Any]:
        """The core rewrites meshletOwner on drain/undrain from what it knows (state,
        capacity, labels); add what only the daemon holds, so a state change never drops
        the encryption key (peers could no longer seal secrets to us) or the version."""
        from meshletd import __version__

        return complete_owner_record(
            value,
            encryption_key=self.key.public_b64,
            storage_mib=self.cfg.contribution.storage_mib,
            version=__version__,
        )

    def _on_event(self, ev: Any) -> None:
        if self.engine is not None:
            self.engine.record_changed(ev)
        if ev.collection == WORKLOAD:
            if ev.action == "delete":
                self._workloads.pop(ev.uri, None)
                log.info("workload %s deleted by its owner", ev.uri)
            else:
                self._workloads[ev.uri] = (ev.cid, dict(ev.record or {}))
                log.info("workload %s (%s) seen", (ev.record or {}).get("name"), ev.uri)
        elif ev.collection == USAGE:
            if ev.action == "delete":
                self._usages.pop(ev.uri, None)
            else:
                from meshletd.core.records import record_from_json

                try:
                    self._usages[ev.uri] = record_from_json(ev.uri, ev.cid or "", ev.record or {})
                except (KeyError, ValueError, TypeError) as e:
                    log.warning("usage record %s ignored: %s", ev.uri, e)
        elif ev.collection in (BID, STATUS):
            table = self._bids if ev.collection == BID else self._statuses
            record = ev.record or {}
            target = (record.get("workload") or {}).get("uri")
            key = f"{ev.did}/{ev.rkey}"
            if ev.action == "delete":
                for per in table.values():
                    per.pop(key, None)
            elif target:
                table.setdefault(target, {})[key] = {"meshletDid": ev.did, **record}

    # -- reads -------------------------------------------------------------------------

    def state(self) -> str:
        return self._state

    def _peers(self) -> dict[str, Any]:
        return {d: m for d, m in self.view.all_members().items() if d != self.did}

    def _local_replicas(self) -> list[dict[str, Any]]:
        if self.engine is not None:
            return [
                {"workload": {"uri": uri}, "slot": slot, "state": state, "meshletDid": self.did}
                for (uri, slot), state in self.engine.scheduler.replicas().items()
                if state in ("starting", "running")
            ]
        return [
            s
            for per in self._statuses.values()
            for s in per.values()
            if s["meshletDid"] == self.did and s.get("state") in ("starting", "running")
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "ownerDid": self.owner,
            "state": self._state,
            "members": len(self._peers()),
            "replicas": len(self._local_replicas()),
            "workloads": len(self._workloads),
            "capacity": self.capacity(),
            "backend": "atproto",
            "publishing": self.meshlet_pds is not None,
        }

    def status_line(self) -> str:
        n, r = len(self._peers()), len(self._local_replicas())
        line = f"{n} member{'s' * (n != 1)}, {r} replica{'s' * (r != 1)}"
        return line + (", draining" if self._state == "draining" else "")

    def capacity(self) -> dict[str, Any]:
        c = self.cfg.contribution
        total = {"milliCpu": c.milli_cpu, "memoryMiB": c.memory_mib, "storageMiB": c.storage_mib}
        used = {"milliCpu": 0, "memoryMiB": 0, "storageMiB": 0}
        for s in self._local_replicas():
            cid_rec = self._workloads.get((s.get("workload") or {}).get("uri", ""))
            res = (cid_rec[1] if cid_rec else {}).get("resources", {})
            for k in used:
                used[k] += int(res.get(k, 0))
        free = {k: max(0, total[k] - used[k]) for k in total}
        return {"total": total, "allocated": used, "free": free}

    def is_member(self, did: str) -> bool:
        if did == self.owner:
            return True
        if any(did in owners for owners in self.view.config.values()):
            return True
        return did in self.view.all_members()

    def members(self) -> list[dict[str, Any]]:
        out = []
        snapshots = self.view.clusters()
        for c in self.cfg.clusters:
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

    def _view(self, uri: str) -> dict[str, Any]:
        cid, rec = self._workloads[uri]
        owner = uri[len("at://") :].split("/", 1)[0]
        running: list[dict[str, Any]] = []
        owners: dict[int, str] = {}  # slot -> owner, when the scheduler knows the placement
        if self.engine is not None:
            running = self._placed(uri, int(rec.get("replicas", 1)))
            owners = {r["slot"]: r["meshletDid"] for r in running if r.get("meshletDid")}
        suspects = self._suspects()
        for s in sorted(self._statuses.get(uri, {}).values(), key=lambda s: s.get("slot", 0)):
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
            "name": rec.get("name", ""),
            "ownerDid": owner,
            "replicas": int(rec.get("replicas", 1)),
            "paused": bool(rec.get("paused", False)),
            "running": running,
        }
        if cid:
            view["cid"] = cid
        return view

    def _suspects(self) -> set[str]:
        """Peers this meshlet's probes currently say are lost (empty when not scheduling)."""
        if self.engine is None:
            return set()
        return set(getattr(self.engine.scheduler, "suspects", ()) or ())

    def _pending_reasons(self, uri: str) -> dict[int, str]:
        query = getattr(self.engine.scheduler, "pending_reasons", None)
        if query is None:
            return {}
        try:
            return dict(query(uri))
        except Exception:  # a display aid must never break `meshletctl workloads`
            log.exception("pending reasons of %s", uri)
            return {}

    def _placed(self, uri: str, replicas: int) -> list[dict[str, Any]]:
        """Slots as the scheduler core sees them: owner per slot (local state if ours, else
        the host's reported state, `lost` while our probes suspect it), or `pending` with
        the core's reason why nobody serves it yet."""
        sched = self.engine.scheduler
        placed = sched.placement().get(uri)
        owners = placed if placed is not None else (None,) * replicas
        local = sched.replicas()
        reasons = self._pending_reasons(uri)
        suspects = self._suspects()
        out = []
        for slot, owner in enumerate(owners):
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
                for st in self._statuses.get(uri, {}).values()
                if st["meshletDid"] == meshlet and st.get("slot") == slot
            ]
            status = max(reported, key=lambda st: st.get("round", 0)) if reported else None
            if meshlet == self.did and (uri, slot) in local:
                r["state"] = local[(uri, slot)]
            elif status is not None and status.get("round", 0) >= rnd:
                r["state"] = status["state"]
            else:
                r["state"] = "starting" if status is None else "pending"
            if meshlet != self.did and meshlet in suspects and r["state"] in _LIVE_STATES:
                r["state"] = "lost"
            for key in ("exitCode", "restarts"):
                if status is not None and key in status:
                    r[key] = status[key]
            if slot in reasons:
                r["reason"] = _clip(reasons[slot])
            if meshlet == self.did:
                unit = self.engine.units.get((uri, slot))
                if unit:
                    r["unit"] = unit
            out.append(r)
        return out

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[dict[str, Any]]:
        out = []
        for uri in sorted(self._workloads):
            v = self._view(uri)
            if owner and v["ownerDid"] != owner:
                continue
            if not everything and not any(r["meshletDid"] == self.did for r in v["running"]):
                continue
            out.append(v)
        return out

    def _uri_of(self, ref: str) -> str:
        if ref in self._workloads:
            return ref
        if ref.startswith("at://"):
            raise NotFound(f"no workload {ref} is known here")
        mine = [
            u
            for u, (_, r) in self._workloads.items()
            if u.startswith(f"at://{self.owner}/") and r.get("name") == ref
        ]
        if not mine:
            raise NotFound(f"no workload named {ref!r}")
        return mine[0]

    def workload(self, uri: str) -> dict[str, Any]:
        return self._view(self._uri_of(uri))

    def bids(self, uri: str) -> dict[str, Any]:
        uri = self._uri_of(uri)
        rounds: dict[int, list[dict[str, Any]]] = {}
        for b in self._bids.get(uri, {}).values():
            rounds.setdefault(int(b.get("round", 0)), []).append(
                {
                    "meshletDid": b["meshletDid"],
                    "priority": b.get("priority", 0),
                    "accepted": b["meshletDid"] in self.view.all_members(),
                }
            )
        winners: dict[int, set[str]] = {}
        for s in self._statuses.get(uri, {}).values():
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

    def balance(self) -> dict[str, Any]:
        """The fair-share ledger from the usage records seen, with the core's own formula."""
        from meshletd.core.fairshare import balances, meshlet_priority
        from meshletd.core.records import format_datetime_ms

        t = self.cfg.scheduling
        now = int(time.time() * 1000)
        # As the core does for its bids: at the start of the current usage period, from the
        # records of periods that ended by then (docs/protocol.md section 11).
        at = now - now % t.usage_period_ms
        owner_of = {m: rec.owner_did for m, rec in self.view.owners.items()}
        taken, given = balances(self._usages.values(), owner_of, at, t.half_life_ms)
        owners = list(dict.fromkeys([self.owner, *self.cfg.members, *taken, *given]))
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

    async def handles(self) -> dict[str, str]:
        """DID -> handle for every DID this meshlet shows (itself, owners, members, their
        meshlets, workload owners), from the DID documents (cached by the resolver). Display
        only: a handle is a claim of the DID document, not checked against DNS here, and a
        handle claimed by two DIDs names neither."""
        dids = {self.did, self.owner, *self.cfg.members, *self.view.all_members()}
        dids |= {u[len("at://") :].split("/", 1)[0] for u in self._workloads}
        found: dict[str, str] = {}
        with trio.move_on_after(3):
            for did in sorted(dids):
                try:
                    ident = await self.resolver.resolve(did)
                except Exception:  # unresolvable now: show the DID
                    continue
                handle = (ident.handle or "").lower()
                if _HANDLE.match(handle):
                    found[did] = handle
        claims: dict[str, int] = {}
        for h in found.values():
            claims[h] = claims.get(h, 0) + 1
        return {d: h for d, h in found.items() if claims[h] == 1}

    async def logs(
        self, uri: str, slot: int, lines: int, cursor: str | None = None
    ) -> dict[str, Any]:
        """A replica's lines: from journald when it runs here; for our owner's workloads
        running elsewhere, from the hosting meshlet (as the owner, service auth), passing
        the cursor through (it is the hosting meshlet's journal cursor)."""
        uri = self._uri_of(uri)
        unit = self.engine.units.get((uri, slot)) if self.engine is not None else None
        if unit:
            from meshletd.daemon.journal import read_unit

            return await read_unit(unit, lines, cursor)
        host = next(
            (r.get("meshletDid") for r in self._view(uri)["running"] if r["slot"] == slot), None
        )
        if not host or host == self.did:
            raise NotFound(f"replica {slot} of {uri} runs nowhere this meshlet knows of")
        if not uri.startswith(f"at://{self.owner}/") or self.owner_pds is None:
            raise Forbidden("only the owner's meshlet (with the owner's credentials) may fetch it")
        member = self.view.all_members().get(host)
        if member is None or not member.endpoint:
            raise UpstreamFailure(f"{host} publishes no XRPC endpoint")
        import httpx

        nsid = "farm.meshlet.getLogs"
        r = await self.owner_pds.session.request(
            "GET", "com.atproto.server.getServiceAuth", params={"aud": host, "lxm": nsid}
        )
        if r.status_code != 200:
            raise UpstreamFailure(f"the owner's PDS refused a service-auth token: {r.text}")
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                got = await http.get(
                    f"{member.endpoint.rstrip('/')}/xrpc/{nsid}",
                    params={
                        "uri": uri,
                        "slot": slot,
                        "lines": lines,
                        **({"cursor": cursor} if cursor else {}),
                    },
                    headers={"authorization": f"Bearer {r.json()['token']}"},
                )
        except httpx.HTTPError as e:
            raise UpstreamFailure(f"{host} unreachable: {e}") from None
        if got.status_code != 200:
            from meshletd.errors import from_xrpc

            raise from_xrpc(got.json(), got.status_code)
        body = got.json()
        # A meshlet from before entries and cursors answers `lines` only: no times, and no
        # cursor (a follower then cannot resume; it sees the last lines again).
        entries = body.get("entries") or [{"line": str(x)} for x in body.get("lines", [])]
        return {"entries": entries, "cursor": body.get("cursor")}

    # -- mutations ---------------------------------------------------------------------

    def _need_owner_pds(self) -> Any:
        if self.owner_pds is None:
            raise Forbidden(
                "no owner-app-password credential: this meshlet cannot write the owner's repo"
            )
        return self.owner_pds

    async def create_workload(self, record: dict[str, Any]) -> dict[str, Any]:
        pds = self._need_owner_pds()
        name = record.get("name")
        if any(
            u.startswith(f"at://{self.owner}/") and r.get("name") == name
            for u, (_, r) in self._workloads.items()
        ):
            raise Conflict(f"a workload named {name!r} exists already")
        # The publisher's default round-0 window ([scheduling] bid_window_ms); the record
        # carries it, so every meshlet uses the same one for this workload.
        record = {"bidWindowMs": self.cfg.scheduling.bid_window_ms, **record}
        rkey = new_tid()
        uri = f"at://{self.owner}/{WORKLOAD}/{rkey}"
        trace("publish", uri=uri)
        cid = await pds.create_record(WORKLOAD, rkey, record)
        self._workloads[uri] = (cid, dict(record))
        log.info("workload %s published as %s", name, uri)
        return {"uri": uri, "cid": cid}

    def _own_rkey(self, uri: str) -> str:
        uri = self._uri_of(uri)
        prefix = f"at://{self.owner}/{WORKLOAD}/"
        if not uri.startswith(prefix):
            raise Forbidden(f"{uri} is not a workload of this meshlet's owner")
        return uri[len(prefix) :]

    async def delete_workload(self, uri: str) -> None:
        rkey = self._own_rkey(uri)
        await self._need_owner_pds().delete_record(WORKLOAD, rkey)
        self._workloads.pop(f"at://{self.owner}/{WORKLOAD}/{rkey}", None)
        log.info("workload %s deleted", uri)

    async def set_paused(self, uri: str, paused: bool) -> None:
        rkey = self._own_rkey(uri)
        full = f"at://{self.owner}/{WORKLOAD}/{rkey}"
        _, rec = self._workloads[full]
        new = {**rec, "paused": paused}
        cid = await self._need_owner_pds().put_record(WORKLOAD, rkey, new)
        self._workloads[full] = (cid, new)

    async def _set_state(self, state: str) -> str:
        if self.engine is not None:
            # The core writes meshletOwner.state itself and moves replicas (make-before-break).
            self.engine.set_draining(state == "draining")
            self._state = state
            return state
        if self.meshlet_pds is None:
            raise Forbidden("no meshlet-app-password credential: cannot publish the new state")
        old, self._state = self._state, state
        try:
            await self._publish()
        except BaseException:
            self._state = old
            raise
        return self._state

    async def drain(self) -> str:
        return await self._set_state("draining")

    async def undrain(self) -> str:
        return await self._set_state("active")

    async def put_secret(self, name: str, value: bytes) -> None:
        if not name:
            raise InvalidRequest("a secret needs a name")
        self._secrets.put(name, value)
        log.info("secret %s stored (%d bytes)", name, len(value))

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        """Serve a secret of our owner's workload, sealed to a meshlet that holds a slot."""
        from meshletd.daemon.secrets import seal

        if not workload_uri.startswith(f"at://{self.owner}/{WORKLOAD}/"):
            raise Forbidden("secrets are served by the workload owner's own meshlet")
        entry = self._workloads.get(workload_uri)
        if entry is None:
            raise NotFound(f"no workload {workload_uri}")
        if name not in [ref.get("name") for ref in entry[1].get("secrets", ())]:
            raise Forbidden(f"{workload_uri} does not reference a secret named {name!r}")
        value = self._secrets.get(name)
        if value is None:
            raise NotFound(f"secret {name!r} is not stored on this meshlet")
        if self.engine is None:
            raise Forbidden("this meshlet does not schedule, so it cannot tell slot holders")
        slots = self.engine.scheduler.placement().get(workload_uri) or ()
        if not any(owner is not None and owner[1] == caller_did for owner in slots):
            log.warning("secret %s of %s refused to %s: no slot", name, workload_uri, caller_did)
            raise Forbidden(f"{caller_did} holds no slot of {workload_uri}")
        record = self.view.owners.get(caller_did)
        key = record.encryption_key if record is not None else None
        if not key:
            raise Forbidden(f"{caller_did} publishes no encryption key")
        log.info("secret %s of %s sealed to %s", name, workload_uri, caller_did)
        return seal(key, value)

    async def fetch_secret(self, workload_uri: str, name: str) -> bytes | None:
        """A secret a workload needs: ours from the store, others' from their meshlet."""
        owner = workload_uri[len("at://") :].split("/", 1)[0]
        if owner == self.owner:
            return self._secrets.get(name)
        if self.meshlet_pds is None:
            return None
        import httpx

        from meshletd.xrpc.app import from_json

        members = self.view.all_members()
        for meshlet in sorted(self.view.claimed_meshlets(owner)):
            member = members.get(meshlet)
            if member is None or not member.endpoint:
                continue
            nsid = "farm.meshlet.getSecret"
            try:
                r = await self.meshlet_pds.session.request(
                    "GET",
                    "com.atproto.server.getServiceAuth",
                    params={"aud": meshlet, "lxm": nsid, "exp": int(time.time()) + 60},
                )
                token = r.json()["token"]
                async with httpx.AsyncClient(timeout=10) as http:
                    got = await http.get(
                        f"{member.endpoint.rstrip('/')}/xrpc/{nsid}",
                        params={"workload": workload_uri, "name": name},
                        headers={"authorization": f"Bearer {token}"},
                    )
                if got.status_code != 200:
                    log.warning(
                        "secret %s of %s refused by %s: %s", name, workload_uri, meshlet, got.text
                    )
                    continue
                return self.key.unseal(from_json(got.json())["sealed"])
            except Exception as e:
                log.warning("secret %s of %s: %s unreachable: %s", name, workload_uri, meshlet, e)
        return None

    async def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.view.set_config(self._clusters(cfg))
        if self.formation is not None:
            await self.formation.sync_watches()
        if self.meshlet_pds is not None:
            await self._publish()


def complete_owner_record(
    value: dict[str, Any], *, encryption_key: str, storage_mib: int, version: str
) -> dict[str, Any]:
    """A meshletOwner value written by the scheduler core, with the daemon's own fields
    (`encryptionKey`, `version`, `capacity.storageMiB`) that the core does not model."""
    out = dict(value)
    out["encryptionKey"] = encryption_key
    out["version"] = version
    out["capacity"] = {**(out.get("capacity") or {}), "storageMiB": storage_mib}
    if not out.get("endpoint"):
        out.pop("endpoint", None)  # the lexicon wants a URI or nothing
    return out


def _machine_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
