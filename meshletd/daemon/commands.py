"""The owner's commands: publish, pause and delete workloads, drain and undrain, secrets, logs.

Workloads are written to the owner's repo (`Local.owner_repo`) and noted in `Followed` at
once, so the next `meshletctl workloads` shows them before the firehose brings them back.
Drain and undrain go to the scheduler core when this meshlet schedules (it moves the
replicas, make-before-break, and republishes meshletOwner), else to the publisher. Secrets
are served to slot holders sealed to their key, and fetched from the owner's meshlet for the
replicas that run here. A replica's logs come from journald when it runs here, else from the
meshlet that hosts it (as the owner).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from meshletd.atproto.cluster import ConfiguredClusters
from meshletd.atproto.records import record_from_json
from meshletd.core.nsid import NSID_WORKLOAD
from meshletd.core.records import Workload
from meshletd.daemon.followed import Followed, owner_of
from meshletd.daemon.journal import read_unit
from meshletd.daemon.local import Local, State
from meshletd.daemon.peers import LogPage, LogQuery, Peers
from meshletd.daemon.publisher import OwnRecords
from meshletd.daemon.readmodel import ReadModel
from meshletd.daemon.repo import Repo
from meshletd.daemon.secrets import EncryptionKey, SecretStore, seal
from meshletd.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    MeshletError,
    NotFound,
    UpstreamFailure,
)
from meshletd.runtime.reference import parse_image
from meshletd.runtime.registry import RegistryClient, RegistryError, auth_file
from meshletd.trace import trace

log = logging.getLogger("meshletd.node")

_B32 = "234567abcdefghijklmnopqrstuvwxyz"
# How a failed resolution at publish time reaches the owner.
_PUBLISH_ERRORS: dict[str, type[MeshletError]] = {
    "not-found": NotFound,
    "unauthorized": Forbidden,
}

JournalReader = Callable[[str, int, str | None], Awaitable[LogPage]]
# (image, auth file content or None) -> the digest the image's tag means now
ImageResolver = Callable[[str, bytes | None], Awaitable[str]]


class DigestResolver:
    """Asks an image's registry which digest its tag means now (`RegistryError` if it
    can't); one HTTP client for the process (making one costs ~90 ms: its TLS context)."""

    def __init__(self) -> None:
        self._client: RegistryClient | None = None

    async def __call__(self, image: str, auth: bytes | None) -> str:
        if self._client is None:
            self._client = RegistryClient()
        return (await self._client.inspect(parse_image(image), auth=auth)).digest


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


class OwnerCommands:
    def __init__(
        self,
        local: Local,
        view: ConfiguredClusters,
        followed: Followed,
        read: ReadModel,
        publisher: OwnRecords,
        peers: Peers,
        secrets: SecretStore,
        key: EncryptionKey,
        *,
        journal: JournalReader = read_unit,
        resolve_image: ImageResolver | None = None,
    ) -> None:
        self.local = local
        self.view = view
        self.followed = followed
        self.read = read
        self.publisher = publisher
        self.peers = peers
        self.secrets = secrets
        self.key = key
        self.journal = journal
        self.resolve_image = resolve_image

    # -- workloads -------------------------------------------------------------------------

    def _owner_repo(self) -> Repo:
        if self.local.owner_repo is None:
            raise Forbidden(
                "no owner-app-password credential: this meshlet cannot write the owner's repo"
            )
        return self.local.owner_repo

    async def create_workload(self, record: dict[str, Any]) -> dict[str, Any]:
        repo = self._owner_repo()
        owner, name = self.local.owner, record.get("name")
        if isinstance(name, str) and self.followed.named(owner, name):
            raise Conflict(f"a workload named {name!r} exists already")
        record = await self.pin_image(record)
        rkey = new_tid()
        uri = f"at://{owner}/{NSID_WORKLOAD}/{rkey}"
        trace("publish", uri=uri)
        cid = await repo.create_record(NSID_WORKLOAD, rkey, record)
        self._note(uri, cid, record)
        log.info("workload %s published as %s", name, uri)
        out = {"uri": uri, "cid": cid}
        if record.get("imageDigest"):
            out["imageDigest"] = record["imageDigest"]
        return out

    async def pin_image(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with `imageDigest`: the digest its image's tag means now, asked of the
        registry once, here, so every replica runs the same bits (docs/protocol.md, section
        23). A reference that names a digest already is pinned to it; a local image
        (localhost/NAME) is in no registry and stays as written. A record that has an
        `imageDigest` keeps it: whoever changes `image` (an update) drops it first."""
        image = record.get("image")
        if not isinstance(image, str) or record.get("imageDigest"):
            return record
        try:
            ref = parse_image(image)
        except ValueError:
            return record  # the lexicon check where it is written names the problem
        if ref.digest is not None:
            return {**record, "imageDigest": ref.digest}
        if ref.local_only or self.resolve_image is None:
            return record
        auth = None
        pull_secret = record.get("imagePullSecret")
        if isinstance(pull_secret, str) and pull_secret:
            value = self.secrets.get(pull_secret)
            if value is None:
                raise NotFound(f"pull secret {pull_secret!r} is not stored on this meshlet")
            try:
                auth = auth_file(value, ref.registry)
            except ValueError as err:
                raise InvalidRequest(f"pull secret {pull_secret!r}: {err}") from err
        try:
            digest = await self.resolve_image(image, auth)
        except RegistryError as err:
            raise _PUBLISH_ERRORS.get(err.problem, UpstreamFailure)(
                f"image {image}: {err.message}"
            ) from err
        log.info("image %s resolved to %s", image, digest)
        return {**record, "imageDigest": digest}

    def _own_rkey(self, ref: str) -> tuple[str, str]:
        """(URI, rkey) of one of our owner's workloads, by URI or name."""
        uri = self.read.uri_of(ref)
        prefix = f"at://{self.local.owner}/{NSID_WORKLOAD}/"
        if not uri.startswith(prefix):
            raise Forbidden(f"{uri} is not a workload of this meshlet's owner")
        return uri, uri[len(prefix) :]

    async def delete_workload(self, ref: str) -> None:
        uri, rkey = self._own_rkey(ref)
        await self._owner_repo().delete_record(NSID_WORKLOAD, rkey)
        self.followed.workloads.pop(uri, None)
        log.info("workload %s deleted", ref)

    async def set_paused(self, ref: str, paused: bool) -> None:
        uri, rkey = self._own_rkey(ref)
        repo = self._owner_repo()
        # The record as stored, so that fields this meshletd does not know are kept.
        got = await repo.get_record(NSID_WORKLOAD, rkey)
        if got is None:
            raise NotFound(f"no workload {uri} in the owner's repo")
        new = {**got[1], "paused": paused}
        cid = await repo.put_record(NSID_WORKLOAD, rkey, new)
        self._note(uri, cid, new)

    def _note(self, uri: str, cid: str, value: dict[str, Any]) -> None:
        """Show a workload we just wrote before the firehose brings it back."""
        try:
            wl = record_from_json(uri, cid, value)
        except (KeyError, ValueError, TypeError) as e:  # the PDS client validated it
            log.warning("workload %s written but not shown: %s", uri, e)
            return
        if isinstance(wl, Workload):
            self.followed.workloads[uri] = wl

    # -- this meshlet's state ----------------------------------------------------------------

    async def _set_state(self, state: State) -> str:
        if self.local.engine is not None:
            # The core writes meshletOwner.state itself and moves replicas (make-before-break).
            self.local.engine.set_draining(state == "draining")
            self.local.state = state
            return state
        old, self.local.state = self.local.state, state
        try:
            await self.publisher.publish()
        except BaseException:
            self.local.state = old
            raise
        return self.local.state

    async def drain(self) -> str:
        return await self._set_state("draining")

    async def undrain(self) -> str:
        return await self._set_state("active")

    # -- secrets -------------------------------------------------------------------------------

    async def put_secret(self, name: str, value: bytes) -> None:
        if not name:
            raise InvalidRequest("a secret needs a name")
        self.secrets.put(name, value)
        log.info("secret %s stored (%d bytes)", name, len(value))

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        """Serve a secret of our owner's workload, sealed to a meshlet that holds a slot."""
        if not workload_uri.startswith(f"at://{self.local.owner}/{NSID_WORKLOAD}/"):
            raise Forbidden("secrets are served by the workload owner's own meshlet")
        wl = self.followed.workloads.get(workload_uri)
        if wl is None:
            raise NotFound(f"no workload {workload_uri}")
        if name not in [ref.name for ref in wl.secrets] and name != wl.image_pull_secret:
            raise Forbidden(f"{workload_uri} does not reference a secret named {name!r}")
        value = self.secrets.get(name)
        if value is None:
            raise NotFound(f"secret {name!r} is not stored on this meshlet")
        if self.local.engine is None:
            raise Forbidden("this meshlet does not schedule, so it cannot tell slot holders")
        slots = self.local.engine.scheduler.placement().get(workload_uri) or ()
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
        """A secret a replica here needs: ours from the store, others' from their meshlet
        (the first of the owner's meshlets that hands it over)."""
        owner = owner_of(workload_uri)
        if owner == self.local.owner:
            return self.secrets.get(name)
        me = self.local.meshlet_repo
        if me is None:
            return None
        for meshlet in sorted(self.view.claimed_meshlets(owner)):
            try:
                sealed = await self.peers.get_secret(meshlet, workload_uri, name, auth=me)
                return self.key.unseal(sealed)
            except MeshletError as e:
                log.warning("secret %s of %s refused by %s: %s", name, workload_uri, meshlet, e)
            except Exception as e:  # a bad seal, a broken peer: try the next meshlet
                log.warning("secret %s of %s: %s failed: %s", name, workload_uri, meshlet, e)
        return None

    # -- logs ----------------------------------------------------------------------------------

    async def logs(self, ref: str, slot: int, lines: int, cursor: str | None = None) -> LogPage:
        """A replica's lines: from journald when it runs here; for our owner's workloads
        running elsewhere, from the hosting meshlet (as the owner, service auth), passing
        the cursor through (it is the hosting meshlet's journal cursor)."""
        uri = self.read.uri_of(ref)
        engine = self.local.engine
        unit = engine.units.get((uri, slot)) if engine is not None else None
        if unit:
            return await self.journal(unit, lines, cursor)
        running = self.read.workload(uri)["running"]
        host = next((r.get("meshletDid") for r in running if r["slot"] == slot), None)
        if not host or host == self.local.did:
            raise NotFound(f"replica {slot} of {uri} runs nowhere this meshlet knows of")
        owner = self.local.owner_repo
        if not uri.startswith(f"at://{self.local.owner}/") or owner is None:
            raise Forbidden("only the owner's meshlet (with the owner's credentials) may fetch it")
        return await self.peers.get_logs(host, LogQuery(uri, slot, lines, cursor), auth=owner)
