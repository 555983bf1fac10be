"""What the API asks of the rest of meshletd: the `Node` protocol, and its access rules.

The XRPC methods (methods.py) and so `meshletctl` only see this protocol. Two nodes serve
it: `AtprotoNode` (atproto_node.py), the real one, a meshlet in its clusters over the AT
Protocol, scheduling and running replicas; and `InMemoryNode` (fake_node.py), a
self-contained stand-in (`backend = "memory"`: demos, tests, the footprint benchmark) that
places every replica on itself. Views are plain dicts shaped like the `farm.meshlet.defs`
lexicon objects (camelCase keys, integers only).
"""

from __future__ import annotations

from typing import Protocol

from meshletd.config import Config
from meshletd.daemon.peers import LogPage
from meshletd.errors import Forbidden, InvalidRequest
from meshletd.jsonvalue import JsonObject


class Node(Protocol):
    @property
    def did(self) -> str:
        """This meshlet's DID."""
        ...

    @property
    def owner(self) -> str:
        """Its owner's DID."""
        ...

    def state(self) -> str:
        """active | draining | stopping."""
        ...

    def summary(self) -> JsonObject: ...

    def status_line(self) -> str:
        """One short line for systemd's STATUS= ("3 members, 2 replicas, draining")."""
        ...

    def capacity(self) -> JsonObject: ...

    def is_member(self, did: str) -> bool: ...

    def members(self) -> list[JsonObject]: ...

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[JsonObject]:
        """Workload views; `everything=False` keeps those with a replica on this meshlet."""
        ...

    def invalid_workloads(self, owner: str | None = None) -> list[JsonObject]:
        """The workload records (of `owner`, or of every repo followed) that this meshlet
        ignores as invalid, newest first, each a `farm.meshlet.defs#invalidWorkloadView`
        (uri, ownerDid, cid, name, problem {field, reason}): so an owner learns why."""
        ...

    def workload(self, uri: str) -> JsonObject: ...

    async def create_workload(self, record: JsonObject) -> JsonObject: ...

    async def delete_workload(self, uri: str) -> None: ...

    async def set_paused(self, uri: str, paused: bool) -> None: ...

    async def drain(self) -> str: ...

    async def undrain(self) -> str: ...

    async def policy(self) -> JsonObject:
        """This meshlet's host policy: `policy` (record value), `published`, `settings`."""
        ...

    async def set_policy(self, body: JsonObject) -> JsonObject:
        """Change the host policy as a setPolicy request says and publish it; returns
        `{policy}` (the record value in force). Raises InvalidRequest, Forbidden."""
        ...

    async def logs(self, uri: str, slot: int, lines: int, cursor: str | None = None) -> LogPage:
        """Entries `{line, time}` and a cursor: the last `lines` entries, or at most `lines`
        of the oldest after `cursor` (opaque, from an earlier answer); the cursor answered is
        the last entry's, else the one given."""
        ...

    def bids(self, uri: str) -> JsonObject: ...

    def endpoints(self, uri: str) -> JsonObject:
        """Where each serving replica of a workload publishes its ports (ctl.getEndpoints)."""
        ...

    def balance(self) -> JsonObject: ...

    def usage(self, days: int) -> JsonObject:
        """What ran on this meshlet per UTC day and owner over the last `days` days."""
        ...

    async def handles(self) -> dict[str, str]:
        """DID -> handle of the DIDs this node shows, for human tables (may be empty)."""
        ...

    async def put_secret(self, name: str, value: bytes) -> None: ...

    def notify_records(self, refs: list[JsonObject]) -> int:
        """A peer's delivery hint ({uri, cid} of records it just wrote): read those we
        follow from their PDS, verified, without waiting for the firehose. Never blocks;
        returns how many will be read."""
        ...

    async def get_secret(self, caller_did: str, workload_uri: str, name: str) -> bytes:
        """The secret sealed to `caller_did`, if it holds a slot of the workload."""
        ...

    async def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded `meshletd.config.Config` (members, clusters, contribution)."""
        ...


def workload_owner(uri: str) -> str:
    """The owner DID in `at://<did>/commune.scheduler.workload/<rkey>`."""
    if not uri.startswith("at://"):
        raise InvalidRequest(f"not an at:// URI: {uri}")
    authority = uri[len("at://") :].split("/", 1)[0]
    if not authority.startswith("did:"):
        raise InvalidRequest(f"workload URI must name its owner by DID: {uri}")
    return authority


def check_owner(caller_did: str | None, uri: str, local_admin: bool, meshlet_owner: str) -> None:
    """Owner-only methods: the workload's owner over XRPC, or a local admin for workloads
    of this machine's owner."""
    owner = workload_owner(uri) if uri.startswith("at://") else None
    if caller_did is not None:
        if owner is None or caller_did != owner:
            raise Forbidden(f"only the workload's owner may do this ({caller_did} is not)")
        return
    if not local_admin:
        raise Forbidden("needs root or the meshlet admin group")
    if owner is not None and owner != meshlet_owner:
        raise Forbidden(f"{uri} belongs to {owner}, not to this machine's owner")
