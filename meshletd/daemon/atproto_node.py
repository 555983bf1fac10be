"""The real node: this meshlet in its clusters, over the atproto layer. The composition root.

It builds the parts and wires them; the parts do the work (docs/architecture.md):

- `Local` (local.py): what this meshlet knows of itself, shared by the parts;
- the cluster view and its formation (atproto/cluster.py): verified members, live from
  the members' firehoses (cursors in the state store);
- `Followed` (followed.py): the workload, bid, status and usage records of watched repos;
- `PdsPublisher` (publisher.py): this meshlet's own records;
- `Engine` (engine.py): the scheduler core driven against the runtime, writing through
  the PDS write queue; only when a runtime is configured and this meshlet can publish;
- `HttpPeers` (http_peers.py): calls to other meshlets (probes, hints, secrets, logs);
- `ReadModel` (readmodel.py): every view the API shows;
- `OwnerCommands` (commands.py): workloads, drain/undrain, secrets, logs.

It serves the `Node` protocol (node.py) for the XRPC methods by handing each call to the
part that owns it. The start-up sequence is `run`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import trio

from meshletd import metrics
from meshletd.atproto.cluster import ClusterFormation, ConfiguredClusters
from meshletd.atproto.firehose import Firehose, RecordEvent
from meshletd.atproto.frames import Refusal
from meshletd.atproto.identity import IdentityResolver
from meshletd.atproto.pds import PdsClient, Write
from meshletd.atproto.writequeue import WriteQueue
from meshletd.config import Config, Credentials
from meshletd.core.events import BidAbandoned
from meshletd.core.records import (
    NSID_BID,
    NSID_LEASE,
    NSID_MESHLET_OWNER,
    NSID_STATUS,
    NSID_USAGE,
    NSID_WORKLOAD,
    HostPolicy,
)
from meshletd.core.scheduler import MeshletIdentity, Scheduler
from meshletd.daemon.commands import DigestResolver, OwnerCommands
from meshletd.daemon.engine import Engine
from meshletd.daemon.followed import Followed
from meshletd.daemon.hostpolicy import now_ms, policy_view, requested_policy
from meshletd.daemon.http_peers import PROBE_TIMEOUT_S, HttpPeers
from meshletd.daemon.local import Local
from meshletd.daemon.peers import LogPage, Peers, RecordRef
from meshletd.daemon.publisher import (
    PdsPublisher,
    machine_arch,
    membership_lists,
    network_grant,
)
from meshletd.daemon.readmodel import ReadModel
from meshletd.daemon.repo import PdsRepo
from meshletd.daemon.secrets import EncryptionKey, SecretStore
from meshletd.daemon.stored import Store, StoreCursors, StoreJournal
from meshletd.errors import UpstreamFailure
from meshletd.policy_settings import record_value
from meshletd.runtime import (
    ReplicaRuntime,
    contribution_runtime_config,
    fake_runtime,
    systemd_runtime,
)
from meshletd.runtime.network import grant_of

log = logging.getLogger("meshletd.node")

# Records whose writes we hint to peers (docs/protocol.md, section 17), and up to how many
# peers (beyond that, the firehose alone: a hint per peer per write would not scale).
HINTED = frozenset({NSID_WORKLOAD, NSID_BID, NSID_STATUS, NSID_MESHLET_OWNER})
HINT_MAX_PEERS = 16
# A hint carries the record's proof as our PDS serves it (docs/protocol.md section 17): read
# once here instead of by every receiver. Bounds: one proof, all of one hint's proofs (the
# peers' XRPC bodies are at most 1 MiB), and how long a hint waits for them.
HINT_PROOF_MAX_BYTES = 16384
HINT_PROOFS_MAX_BYTES = 256 * 1024
HINT_PROOF_WAIT_S = 1.0
# Login to the PDS is retried with backoff, doubling up to this cap (seconds): the daemon
# starts scheduling at most this long after its PDS comes back (docs/protocol.md, section 13).
PDS_RETRY_INITIAL_S = 1.0
PDS_RETRY_MAX_S = 10.0
# How long start-up waits for the view before telling systemd it is ready anyway (the view
# then completes in the background; nothing is decided before it does).
READY_WAIT_S = 20.0
_HANDLE = re.compile(r"^(?=.{3,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*$")


class AtprotoNode:
    """`Node` over the atproto layer (see the module doc)."""

    def __init__(
        self, cfg: Config, credentials: Credentials, store: Store, *, peers: Peers | None = None
    ) -> None:
        self._credentials = credentials
        self._store = store
        self.local = Local(cfg)
        self.resolver = IdentityResolver(cfg.plc_url, ttl_s=300)
        self.view = ConfiguredClusters.create(cfg.did, cfg.owner, membership_lists(cfg))
        self.followed = Followed()
        self.key = EncryptionKey(store)
        self.publisher = PdsPublisher(self.local, self.key)
        self.read = ReadModel(
            self.local, self.view, self.followed, self._refused, lambda: self.view_loaded.is_set()
        )
        self.peers: Peers = peers if peers is not None else HttpPeers(self.read.endpoint_of)
        self.commands = OwnerCommands(
            self.local,
            self.view,
            self.followed,
            self.read,
            self.publisher,
            self.peers,
            SecretStore(store),
            self.key,
            resolve_image=DigestResolver() if cfg.images.resolve_tags else None,
        )
        self.formation: ClusterFormation | None = None
        self.engine: Engine | None = None
        self.writes: WriteQueue | None = None
        self._nursery: trio.Nursery | None = None
        self.published = False  # our records reached our PDS since start
        self.pds_problem: str | None = None  # why not (yet), for STATUS= and the log
        self._publishing = False  # a retry loop is running
        self.view_loaded = trio.Event()
        # (workload, failed version) of our owner's updates rolled back since start (bounded)
        self._rolled_back: set[tuple[str, str]] = set()

    @property
    def did(self) -> str:
        return self.local.did

    @property
    def owner(self) -> str:
        return self.local.owner

    @property
    def cfg(self) -> Config:
        return self.local.cfg

    @property
    def meshlet_pds(self) -> PdsClient | None:
        return self.publisher.meshlet

    @property
    def owner_pds(self) -> PdsClient | None:
        return self.publisher.owner

    # -- the start-up sequence -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start this meshlet; `started` once the cluster view is loaded, or after
        READY_WAIT_S while it is not (a PDS unreachable): nothing is decided before the view
        is complete either way (docs/protocol.md, section 13). Runs until cancelled."""
        cursors = StoreCursors(self._store)

        def firehose(sink: Any) -> Firehose:
            return Firehose(self.resolver, cursors, sink)

        formation = self.formation = ClusterFormation(self.view, firehose)
        formation.add_listener(self._on_record)
        formation.add_batch_listener(self._on_startup_batch)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # 1. Log in to the PDSes; take back a drain from before a restart; publish
                #    our own records. One attempt now, then with backoff in the background
                #    while the PDS is unreachable: the meshlet serves meanwhile.
                self._make_clients()
                with trio.move_on_after(PDS_RETRY_MAX_S):
                    await self._login_and_publish()
                if not self.published:
                    self._keep_publishing()
                # 2. The scheduler core, the runtime and the write queue (adopting the
                #    replicas left running), unless this meshlet only observes. It starts
                #    whether or not the PDS answers; the core decides nothing before 3.
                await self._start_engine(nursery)
                # 3. Follow the cluster: read every watched repo (again, with backoff, until
                #    every one was read), hand them over as one batch, then the firehoses.
                nursery.start_soon(self._follow, formation)
                with trio.move_on_after(READY_WAIT_S):
                    await self.view_loaded.wait()
                if not self.view_loaded.is_set():
                    log.warning(
                        "ready before the cluster view is complete (%s): nothing is decided "
                        "until it is; replicas keep running",
                        self.status_line(),
                    )
                task_status.started()
        finally:
            if isinstance(self.peers, HttpPeers):
                with trio.CancelScope(shield=True):
                    await self.peers.aclose()

    async def _follow(self, formation: ClusterFormation) -> None:
        await formation.run()

    def _on_startup_batch(self, batch: list[RecordEvent]) -> None:
        """The start-up read of every watched repo, ours included (docs/protocol.md
        section 13): our tables, then the scheduler core in one batch."""
        for ev in batch:
            self.followed.apply(ev)
        if self.engine is not None:
            self.engine.view_complete(batch)
        for ev in batch:  # an update that failed while we were away
            if ev.collection == NSID_STATUS and ev.action != "delete":
                self._maybe_roll_back(ev)
        if self.formation is not None:
            log.info("cluster view loaded: %s", self.formation.describe())
        self.view_loaded.set()

    def _make_clients(self) -> None:
        """The meshlet's PDS client, before any request (it logs in on first use): the
        write queue can take writes while the PDS is unreachable."""
        creds, cfg = self._credentials, self.local.cfg
        if creds.meshlet_app_password is not None and self.publisher.meshlet is None:
            meshlet = PdsClient(cfg.pds, cfg.did, creds.meshlet_app_password.get_secret_value())
            self._attach(meshlet, owner=False)

    def _keep_publishing(self) -> None:
        """Retry login and publication with capped backoff until they succeed."""
        if self._publishing or self._nursery is None or self.publisher.meshlet is None:
            return
        self._publishing = True
        self._nursery.start_soon(self._publish_with_backoff)

    async def _publish_with_backoff(self) -> None:
        delay = PDS_RETRY_INITIAL_S
        try:
            while not await self._login_and_publish():
                self.pds_problem = f"PDS unreachable, retrying in {delay:.0f} s"
                await trio.sleep(delay)
                delay = min(delay * 2, PDS_RETRY_MAX_S)
        finally:
            self._publishing = False

    async def _login_and_publish(self) -> bool:
        """Log in (meshlet and owner) and publish our records; False (logged) when the PDS
        cannot be reached or refuses."""
        creds, cfg = self._credentials, self.local.cfg
        meshlet, owner = self.publisher.meshlet, self.publisher.owner
        if meshlet is None:
            log.warning("no meshlet-app-password credential: running read-only")
            return True
        try:
            if meshlet.session.access is None:
                await meshlet.login()
            if creds.owner_app_password is not None and owner is None:
                url = cfg.owner_pds or await self._pds_of(cfg.owner)
                password = creds.owner_app_password.get_secret_value()
                self._attach(await PdsClient.logged_in(url, cfg.owner, password), owner=True)
            await self._restore_state()
            await self.publisher.publish()
        except Exception as e:  # PDS down or wrong password: keep serving, say why
            self.pds_problem = f"PDS unreachable: {e}"
            log.warning("cannot publish this meshlet's records (will retry): %s", e)
            return False
        if self.pds_problem is not None:
            log.info("the PDS answers again: this meshlet's records are published")
            if self.local.engine is not None:
                # The runtime started with meshlet.toml's grant: the published one rules.
                await self.local.engine.set_network_grant(
                    await network_grant(self.publisher, self.local)
                )
        self.pds_problem = None
        self.published = True
        return True

    def _attach(self, client: PdsClient, *, owner: bool) -> None:
        """A logged-in client of this meshlet's repo or of its owner's: the publisher and
        the owner's commands write through it, and each commit is hinted to our peers."""
        if owner:
            self.publisher.owner, self.local.owner_repo = client, PdsRepo(client)
        else:
            self.publisher.meshlet, self.local.meshlet_repo = client, PdsRepo(client)
        client.on_commit = lambda done, client=client: self._committed(client, done)

    async def _restore_state(self) -> None:
        """A drain outlives a restart (an operator drains before maintenance, and the reboot
        must not put the machine back to work): start in the state our published
        meshletOwner record has. The core reads the same record and keeps draining."""
        if await self.publisher.published_state() == "draining":
            if self.local.state != "draining":
                self.local.state = "draining"
                log.info(
                    "this meshlet was draining when meshletd stopped: it stays draining "
                    "until `meshletctl undrain`"
                )

    async def _pds_of(self, did: str) -> str:
        ident = await self.resolver.resolve(did)
        if not ident.pds:
            raise UpstreamFailure(f"{did} has no PDS in its DID document")
        return ident.pds

    def _runtime_kind(self) -> str:
        kind = self.local.cfg.runtime
        if kind == "auto":
            kind = "systemd" if os.path.isdir("/run/systemd/system") else "none"
        return kind

    async def _start_engine(self, nursery: trio.Nursery) -> None:
        """The scheduler core + runtime + write queue; skipped when observing only."""
        kind, meshlet = self._runtime_kind(), self.publisher.meshlet
        if kind == "none" or meshlet is None:
            log.warning(
                "scheduler not started (runtime %s, %s): this meshlet only observes",
                kind,
                "publishing" if meshlet else "no meshlet credentials",
            )
            return
        cfg = self.local.cfg
        runtime: ReplicaRuntime = (
            systemd_runtime(
                contribution_runtime_config(
                    cfg.contribution,
                    cfg.images,
                    isolation=cfg.isolation,
                    network_grant=await network_grant(self.publisher, self.local),
                )
            )
            if kind == "systemd"
            else fake_runtime()
        )
        me = MeshletIdentity(
            did=cfg.did,
            owner=cfg.owner,
            milli_cpu=cfg.contribution.milli_cpu,
            memory_mib=cfg.contribution.memory_mib,
            max_replicas=cfg.contribution.max_replicas,
            # Real only where replicas are real (conmon, slirp4netns beside each workload).
            replica_overhead_mib=cfg.contribution.replica_overhead_mib if kind == "systemd" else 0,
            arch=cfg.arch or machine_arch(),
            labels=frozenset(cfg.labels),
            endpoint=cfg.public_endpoint or "",
            # Without an endpoint nobody can probe us: a lease says we live (protocol §8).
            lease=not cfg.public_endpoint,
        )

        def dropped(w: Write) -> None:
            if w.collection == NSID_BID and self.engine is not None:
                self.engine.feed(BidAbandoned(f"at://{cfg.did}/{w.collection}/{w.rkey}"))

        writes = self.writes = WriteQueue(
            meshlet,
            journal=StoreJournal(self._store),
            prime=(NSID_BID, NSID_STATUS, NSID_USAGE),
            backoff_max_s=PDS_RETRY_MAX_S,
            on_dropped=dropped,
        )
        if writes.pending:
            log.info("%d write(s) left from the last run will be sent", len(writes.pending))
        await nursery.start(writes.run)
        engine = self.engine = Engine(
            Scheduler(me, cfg.scheduling.timing()),
            runtime,
            self._submit,
            secret=self.commands.fetch_secret,
            own_record=self.publisher.owner_record,
            probe=self.peers.ping,
            probe_timeout_s=PROBE_TIMEOUT_S + 1.0,
            feeds_behind=self.formation.firehose.behind if self.formation else None,
            refresh_lease=self._refresh_lease,
            published=writes,
        )
        self.local.engine = engine
        adopted = await nursery.start(engine.run)
        log.info("scheduler running on the %s runtime; %d replica(s) adopted", kind, len(adopted))

    def _submit(self, write: Write) -> None:
        """A write of the scheduler core, to the PDS write queue."""
        assert self.writes is not None
        try:
            self.writes.submit(write)
        except Exception as e:  # a record the lexicon refuses: a bug, not a reason to die
            log.error(
                "write %s/%s dropped: %s (value %r)", write.collection, write.rkey, e, write.value
            )

    # -- records in, hints out (docs/protocol.md, section 17) ----------------------------

    def _on_record(self, ev: RecordEvent) -> None:
        metrics.count_record(ev, self.followed)
        if self.engine is not None:
            self.engine.record_changed(ev)
        self.followed.apply(ev)
        if ev.collection == NSID_STATUS and ev.action != "delete":
            self._maybe_roll_back(ev)

    def _maybe_roll_back(self, ev: RecordEvent) -> None:
        """A slot's status says an update of one of our owner's workloads failed: write
        the previous spec back (docs/protocol.md, section 25), once per failed version."""
        rec = ev.record
        if not isinstance(rec, dict):
            return
        failed, ref = rec.get("failedVersion"), rec.get("workload")
        uri = ref.get("uri") if isinstance(ref, dict) else None
        if not isinstance(failed, str) or not failed or not isinstance(uri, str):
            return
        if self.local.owner_repo is None or self._nursery is None:
            return
        if not uri.startswith(f"at://{self.owner}/{NSID_WORKLOAD}/"):
            return
        # Only the slot's owner in the placement may say its update failed: anyone can
        # write a status, and a forged one must not undo the owner's update.
        slot = rec.get("slot")
        placed = self.engine.scheduler.placement().get(uri) if self.engine else None
        if not isinstance(slot, int) or not placed or not 0 <= slot < len(placed):
            return
        holder = placed[slot]
        if holder is None or holder[1] != ev.did:
            return
        if (uri, failed) in self._rolled_back:
            return
        if len(self._rolled_back) >= 4096:
            self._rolled_back.clear()
        self._rolled_back.add((uri, failed))
        reason = rec.get("message")
        why = reason if isinstance(reason, str) and reason else f"version {failed} failed"
        self._nursery.start_soon(self._roll_back, uri, failed, why)

    async def _roll_back(self, uri: str, failed: str, why: str) -> None:
        """Roll back, trying again while the owner's PDS does not answer (about 2 min)."""
        delay = 2.0
        for _ in range(6):
            if await self.commands.roll_back(uri, failed, why):
                return
            await trio.sleep(delay)
            delay *= 2
        self._rolled_back.discard((uri, failed))  # the next status naming it tries again

    def _committed(self, client: PdsClient, done: list[tuple[str, str, str | None]]) -> None:
        """Records we just wrote: tell our peers, so they need not wait for the firehose."""
        repo = client.did
        refs = [
            RecordRef(f"at://{repo}/{coll}/{rkey}", cid)
            for coll, rkey, cid in done
            if coll in HINTED
        ]
        ours = repo == self.local.owner  # our scheduler follows it too
        peers = sorted(d for d, m in self.read.peers().items() if m.endpoint)
        if len(peers) > HINT_MAX_PEERS:
            peers = []
        if not refs or (not ours and not peers) or self._nursery is None:
            return
        self._nursery.start_soon(self._send_hints, client, refs, ours, peers)

    async def _send_hints(
        self, client: PdsClient, refs: list[RecordRef], ours: bool, peers: list[str]
    ) -> None:
        """Read each record's proof from our PDS once and put it in the hints, so that no
        receiver reads it again (docs/protocol.md section 17); a record whose proof is not
        read within HINT_PROOF_WAIT_S (or is too large) is hinted without one."""
        proofs: dict[str, bytes] = {}

        async def read(ref: RecordRef) -> None:
            coll, rkey = ref.uri.rsplit("/", 2)[-2:]
            try:
                proof = await client.record_proof(coll, rkey, HINT_PROOF_MAX_BYTES)
            except Exception as e:  # a hint is best effort: send it without the proof
                log.debug("hint %s: proof not read: %s", ref.uri, e)
                return
            if proof is not None:
                proofs[ref.uri] = proof

        with trio.move_on_after(HINT_PROOF_WAIT_S):
            async with trio.open_nursery() as nursery:
                for ref in refs:
                    nursery.start_soon(read, ref)
        sent, size = [], 0
        for ref in refs:
            proof = proofs.get(ref.uri)
            if proof is not None and size + len(proof) <= HINT_PROOFS_MAX_BYTES:
                size += len(proof)
                ref = RecordRef(ref.uri, ref.cid, proof)
            sent.append(ref)
        if ours:  # as the XRPC method hands them over: the proof as bytes
            self.notify_records([{"uri": r.uri, "cid": r.cid, "proof": r.proof} for r in sent])
        for meshlet in peers:
            if self._nursery is not None:
                self._nursery.start_soon(self.peers.notify_records, meshlet, sent)

    def _refresh_lease(self, meshlet: str) -> None:
        """The core finds `meshlet`'s lease expired: read it again from its PDS."""
        if self.formation is not None:
            self.formation.firehose.refresh(meshlet, NSID_LEASE, "self")

    def _refused(self) -> list[Refusal]:
        return self.formation.firehose.refusals() if self.formation is not None else []

    def notify_records(self, refs: list[dict[str, Any]]) -> int:
        firehose = self.formation.firehose if self.formation is not None else None
        if firehose is None:
            return 0
        accepted = 0
        for ref in refs:
            uri, cid, proof = ref.get("uri", ""), ref.get("cid"), ref.get("proof")
            parts = uri[len("at://") :].split("/") if uri.startswith("at://") else []
            if len(parts) != 3 or not all(parts):
                continue
            did, coll, rkey = parts
            if firehose.hint(
                did,
                coll,
                rkey,
                cid if isinstance(cid, str) else None,
                proof if isinstance(proof, bytes) else None,
            ):
                accepted += 1
        return accepted

    # -- reads (the read model) ------------------------------------------------------------

    def state(self) -> str:
        return self.local.state

    def summary(self) -> dict[str, Any]:
        return self.read.summary()

    def status_line(self) -> str:
        line = self.read.status_line()
        engine = self.engine
        if engine is not None and not engine.view_is_complete and engine.adopted:
            line += f", {len(engine.adopted)} adopted"
        if self.pds_problem:
            line += f"; {self.pds_problem}"
        if not self.view_loaded.is_set():
            waiting = len(self.formation.waiting_for) if self.formation is not None else 0
            line += "; reading the cluster's records" + (
                f" ({waiting} repo(s) unreachable)" if waiting else ""
            )
            if engine is not None:
                line += ": not scheduling yet"
        return line

    def capacity(self) -> dict[str, Any]:
        return self.read.capacity()

    def is_member(self, did: str) -> bool:
        return self.read.is_member(did)

    def members(self) -> list[dict[str, Any]]:
        return self.read.members()

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[dict[str, Any]]:
        return self.read.workloads(owner, everything)

    def workload(self, uri: str) -> dict[str, Any]:
        return self.read.workload(uri)

    def invalid_workloads(self, owner: str | None = None) -> list[dict[str, Any]]:
        return self.read.invalid_workloads(owner)

    def bids(self, uri: str) -> dict[str, Any]:
        return self.read.bids(uri)

    def endpoints(self, uri: str) -> dict[str, Any]:
        return self.read.endpoints(uri)

    def balance(self) -> dict[str, Any]:
        return self.read.balance(int(time.time() * 1000))

    def usage(self, days: int) -> dict[str, Any]:
        return self.read.usage(int(time.time() * 1000), days)

    def meshlets(self) -> list[dict[str, Any]]:
        return self.read.meshlets()

    def rounds(self, uri: str) -> dict[str, Any]:
        return self.read.rounds(uri)

    def workload_record(self, uri: str) -> dict[str, Any]:
        return self.read.workload_record(uri)

    async def handles(self) -> dict[str, str]:
        """DID -> handle for every DID this meshlet shows (itself, owners, members, their
        meshlets, workload owners), from the DID documents (cached by the resolver). Display
        only: a handle is a claim of the DID document, not checked against DNS here, and a
        handle claimed by two DIDs names neither."""
        found: dict[str, str] = {}
        with trio.move_on_after(3):
            for did in sorted(self.read.shown_dids()):
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

    # -- the owner's commands ----------------------------------------------------------

    async def logs(self, uri: str, slot: int, lines: int, cursor: str | None = None) -> LogPage:
        return await self.commands.logs(uri, slot, lines, cursor)

    async def create_workload(self, record: dict[str, Any]) -> dict[str, Any]:
        return await self.commands.create_workload(record)

    async def delete_workload(self, uri: str) -> None:
        await self.commands.delete_workload(uri)

    async def set_paused(self, uri: str, paused: bool) -> None:
        await self.commands.set_paused(uri, paused)

    async def update_workload(self, uri: str, image: str) -> dict[str, Any]:
        return await self.commands.update_workload(uri, image)

    async def drain(self) -> str:
        return await self.commands.drain()

    async def undrain(self) -> str:
        return await self.commands.undrain()

    async def policy(self) -> dict[str, Any]:
        published = await self.publisher.published_policy()
        return policy_view(published or HostPolicy.default(self.did), published is not None)

    async def set_policy(self, body: dict[str, Any]) -> dict[str, Any]:
        current = await self.publisher.published_policy() or HostPolicy.default(self.did)
        got = await self.publisher.publish_policy(requested_policy(body, current, now_ms()))
        engine = self.local.engine
        if engine is not None and got.network != current.network:
            # What replicas may reach follows the published grant (docs/runtime.md).
            await engine.set_network_grant(grant_of(got.network))
        return {"policy": record_value(got)}

    async def put_secret(self, name: str, value: bytes) -> None:
        await self.commands.put_secret(name, value)

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        return await self.commands.get_secret(caller_did, workload_uri, name)

    async def reconfigure(self, cfg: Config) -> None:
        self.local.cfg = cfg
        self.view.set_config(membership_lists(cfg))
        if self.formation is not None:
            await self.formation.sync_watches()
        if self.publisher.meshlet is not None and not self._publishing:
            # A reload while the PDS is unreachable must not end the daemon: the new
            # records go out when it is back.
            if not await self._login_and_publish():
                self._keep_publishing()
