"""The firehose's pure parts: frames in, verified record events out (no I/O, no trio).

- `decode_frame(raw)`: (header, body) of one event-stream frame.
- `FrameDecoder.process(raw) -> FrameOutcome`: decodes one frame (two DAG-CBOR values,
  header and body, with libipld: the SDK's frame parser would import its whole generated
  client, tens of MB of idle memory), skips repos and collections nobody asked for before
  decoding any block, checks the commit signature against the repo DID's signing key and the
  MST proof of every op, validates each record against its lexicon and size limit, and turns
  ops into `RecordEvent`s. Everything it refuses is listed in `dropped` with the reason.
- `RepoMirror`: last known (cid, rev) per record; keeps firehose and anti-entropy from
  contradicting each other (a change applies only if its commit rev is not older).

The trio side (`PdsSubscription`, `Firehose`) is in `meshletd.atproto.firehose`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import libipld

from meshletd.atproto.lexicon import Lexicons, default_lexicons
from meshletd.atproto.verify import (
    Unverified,
    cid_str,
    decode_car,
    verified_record,
    verify_commit,
)
from meshletd.core.nsid import RECORD_NSIDS
from meshletd.errors import InvalidRecord

COMMUNE_COLLECTIONS = RECORD_NSIDS  # every collection meshlet follows

Action = Literal["create", "update", "delete"]


@dataclass(frozen=True)
class RecordEvent:
    """A verified change of one record."""

    did: str
    collection: str
    rkey: str
    action: Action
    cid: str | None  # None for deletes
    record: dict[str, Any] | None  # the validated value; None for deletes
    rev: str  # repo revision of the commit that made the change
    seq: int | None = None  # firehose sequence number; None when found by anti-entropy
    source: Literal["firehose", "resync", "hint"] = "firehose"
    # A delete that stands for a version validation refused: an invalid record counts as
    # absent, the same for every observer, however many valid versions it saw before
    # (docs/protocol.md section 19.1).
    refused: bool = False

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


@dataclass
class Interest:
    """Which repos and collections matter. Shared and mutable: membership changes it."""

    dids: set[str] = field(default_factory=set)
    collections: frozenset[str] = COMMUNE_COLLECTIONS


@dataclass(frozen=True)
class Refusal:
    """A record version refused by validation: which field, and why (shown to its owner)."""

    uri: str
    cid: str | None
    field: str | None
    reason: str
    name: str | None = None  # the record's `name`, when it is a string (cut to 64 chars)

    @staticmethod
    def name_of(value: Any) -> str | None:
        name = value.get("name") if isinstance(value, dict) else None
        return name[:64] if isinstance(name, str) else None


@dataclass
class FrameOutcome:
    seq: int | None = None
    kind: str = ""
    did: str | None = None
    events: list[RecordEvent] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    need_key: str | None = None  # resolve this DID's key, then process the frame again
    bad_signature: bool = False  # the key we had failed: re-resolve once, then retry
    resync: set[str] = field(default_factory=set)  # DIDs to heal with anti-entropy
    identity_changed: str | None = None
    commit_rev: str | None = None  # a verified commit's rev, and the rev it follows
    commit_since: str | None = None
    error: str | None = None  # an error frame (or #info) from the PDS
    refused: list[Refusal] = field(default_factory=list)  # records validation refused
    time: str | None = None  # the frame's `time` (when the PDS sequenced it), unchecked


def decode_frame(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, body) of one event-stream frame: `op` 1 is a message whose type is `t`
    (`#commit`, ...), `op` -1 an error (`error`, `message`). Raises ValueError otherwise."""
    parts = libipld.decode_dag_cbor_multi(raw)
    if len(parts) != 2:
        raise ValueError(f"a frame is a header and a body, not {len(parts)} value(s)")
    header, body = parts
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise ValueError("frame header and body must be maps")
    op = header.get("op")
    if op == 1:
        if not isinstance(header.get("t"), str):
            raise ValueError("message frame without a type")
    elif op == -1:
        if not isinstance(body.get("error"), str):
            raise ValueError("error frame without an error name")
    else:
        raise ValueError(f"invalid frame op {op!r}")
    return header, body


class FrameDecoder:
    """Pure decoder/verifier of subscribeRepos frames for one `Interest`."""

    def __init__(
        self,
        interest: Interest,
        keys: dict[str, str | None] | None = None,
        lexicons: Lexicons | None = None,
    ) -> None:
        self.interest = interest
        self.keys: dict[str, str | None] = keys if keys is not None else {}
        self.lexicons = lexicons or default_lexicons()
        self.last_rev: dict[str, str] = {}
        self.frames = 0
        self.commits = 0

    def process(self, raw: bytes) -> FrameOutcome:
        """What one frame means. Never raises: a frame that is not what the protocol says
        (wrong types, missing fields, nesting too deep) is one `dropped` reason, and the
        repo it names is healed by anti-entropy (`resync`) in case it carried a change."""
        self.frames += 1
        try:
            header, body = decode_frame(raw)
        except Exception as e:
            return FrameOutcome(dropped=[f"undecodable frame ({type(e).__name__}: {e})"])
        out = FrameOutcome()
        try:
            self._message(header, body, out)
        except Exception as e:
            did = out.did
            out = FrameOutcome(seq=out.seq, kind=out.kind, did=did)
            out.dropped.append(
                f"malformed {out.kind or 'frame'} seq={out.seq} repo={did}: "
                f"{type(e).__name__}: {str(e)[:200]}"
            )
            if did is not None and did in self.interest.dids:
                out.resync.add(did)
        return out

    def _message(self, header: dict[str, Any], body: dict[str, Any], out: FrameOutcome) -> None:
        if header["op"] == -1:
            out.kind = "error"
            out.error = f"{_text(body.get('error'))}: {_text(body.get('message'))}"
            return
        t = header["t"]
        out.kind = t
        seq = body.get("seq")
        # The cursor is saved and sent back to the PDS: only a plain non-negative integer.
        out.seq = seq if type(seq) is int and 0 <= seq < 2**63 else None
        out.time = body["time"] if isinstance(body.get("time"), str) else None
        if t == "#commit":
            self.commits += 1
            self._commit(body, out)
        elif t == "#identity":
            did = _did(body.get("did"))
            out.did = did
            if did in self.interest.dids:
                out.identity_changed = did
        elif t in ("#sync", "#account"):
            did = _did(body.get("did"))
            out.did = did
            if did in self.interest.dids and (t == "#sync" or body.get("active") is True):
                out.resync.add(did)
        elif t == "#info":
            out.error = f"{_text(body.get('name'))}: {_text(body.get('message'))}"
            if body.get("name") == "OutdatedCursor":
                out.resync |= set(self.interest.dids)

    def _commit(self, body: dict[str, Any], out: FrameOutcome) -> None:
        did = _did(body.get("repo"))
        out.did = did
        if did is None or did not in self.interest.dids:
            return
        if body.get("tooBig"):
            out.resync.add(did)
            return
        raw_ops = body.get("ops")
        if not isinstance(raw_ops, list):
            raise ValueError("ops is not a list")
        wanted = self.interest.collections
        ops = []
        for op in raw_ops:
            if (
                not isinstance(op, dict)
                or not isinstance(op.get("path"), str)
                or op.get("action") not in ("create", "update", "delete")
            ):
                raise ValueError("an op is not {path, action, cid}")
            if op["path"].split("/", 1)[0] in wanted:
                ops.append(op)
        if not ops:
            return
        if did not in self.keys:
            out.need_key = did
            return
        seq = out.seq
        rev = body.get("rev")
        if not isinstance(rev, str):
            raise ValueError("rev is not a string")
        last = self.last_rev.get(did)
        if last is not None and rev <= last:
            return  # a replay of something already applied
        try:
            _header, blocks = decode_car(body["blocks"])
            commit = verify_commit(blocks, body["commit"], did, self.keys[did])
        except Unverified as e:
            out.bad_signature = "signature" in str(e)
            out.dropped.append(f"commit seq={seq} repo={did}: {e}")
            return
        except Exception as e:
            out.dropped.append(f"commit seq={seq} repo={did}: undecodable blocks ({e})")
            return
        if commit.get("rev") != rev:
            out.dropped.append(f"commit seq={seq} repo={did}: rev differs from the signed commit")
            return
        self.last_rev[did] = rev
        since = body.get("since")
        out.commit_rev, out.commit_since = rev, since if isinstance(since, str) else None
        data_root = commit["data"]
        for op in ops:
            path = op["path"]
            collection, _, rkey = path.partition("/")
            action = op["action"]
            uri = f"at://{did}/{path}"
            try:
                cid, value = verified_record(blocks, data_root, path, op.get("cid"))
            except Unverified as e:
                out.dropped.append(f"record {uri} seq={seq}: {e}")
                continue
            except Exception as e:  # a malformed op or block: refuse this op only
                out.dropped.append(f"record {uri} seq={seq}: unreadable ({type(e).__name__})")
                continue
            if action == "delete":
                out.events.append(
                    RecordEvent(did, collection, rkey, "delete", None, None, rev, seq)
                )
                continue
            try:
                self.lexicons.validate_record(collection, value, rkey=rkey)
                self.lexicons.validate_size(collection, value)
            except InvalidRecord as e:
                out.dropped.append(f"record {uri} seq={seq}: invalid ({e.message})")
                out.refused.append(
                    Refusal(
                        uri,
                        cid_str(cid) if cid else None,
                        e.field,
                        e.reason,
                        Refusal.name_of(value),
                    )
                )
                out.events.append(
                    RecordEvent(did, collection, rkey, "delete", None, None, rev, seq, refused=True)
                )
                continue
            except Exception as e:  # never expected (the validator refuses): still one record
                out.dropped.append(f"record {uri} seq={seq}: unreadable ({type(e).__name__})")
                continue
            assert cid is not None
            out.events.append(
                RecordEvent(did, collection, rkey, action, cid_str(cid), value, rev, seq)
            )


def _did(value: Any) -> str | None:
    """A DID named by a frame, or None if the field is not a plausible one."""
    if isinstance(value, str) and value.startswith("did:") and len(value) <= 2048:
        return value
    return None


def _text(value: Any) -> str:
    """A PDS-supplied string for a log line: never anything else, never unbounded."""
    return value[:300] if isinstance(value, str) else repr(type(value).__name__)


# Records (and tombstones) the mirror holds per repo and collection: a repo that writes more
# is not followed beyond them (docs/protocol.md section 19.4). Anti-entropy lists no more.
MAX_RECORDS_PER_COLLECTION = 50_000


class RepoMirror:
    """Last known state of every watched record, ordered by commit rev. Bounded: at most
    `max_per_collection` entries per (repo, collection); a record beyond them is refused
    (counted in `over_bound`) and a delete beyond them is passed on without a tombstone."""

    def __init__(self, max_per_collection: int = MAX_RECORDS_PER_COLLECTION) -> None:
        self.records: dict[tuple[str, str, str], tuple[str | None, str]] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.max_per_collection = max_per_collection
        self.over_bound = 0
        # The newest commit rev each repo's records have come with, from any source (a
        # proof forwarded in a hint is used only if it is at least as new: no replays).
        self.newest_rev: dict[str, str] = {}

    def apply(self, ev: RecordEvent) -> RecordEvent | None:
        """The event to deliver (with a corrected action), or None if stale or no change."""
        if ev.rev and ev.rev > self.newest_rev.get(ev.did, ""):
            self.newest_rev[ev.did] = ev.rev
        key = (ev.did, ev.collection, ev.rkey)
        known = self.records.get(key)
        if known is None:
            n = self.counts.get(key[:2], 0)
            if n >= self.max_per_collection:
                if ev.action == "delete":
                    return ev
                self.over_bound += 1
                return None
            self.counts[key[:2]] = n + 1
        if known is not None:
            cid, rev = known
            if ev.rev < rev or (ev.rev == rev and cid == ev.cid):
                return None
            if cid == ev.cid:
                self.records[key] = (cid, ev.rev)
                return None
        elif ev.action == "delete":
            # Unknown to us but maybe not to the consumer (state kept across a restart):
            # pass it on; deletes of unknown records are no-ops for an idempotent consumer.
            self.records[key] = (None, ev.rev)
            return ev
        self.records[key] = (ev.cid, ev.rev)
        if ev.action != "delete":
            existed = known is not None and known[0] is not None
            action: Action = "update" if existed else "create"
            if action != ev.action:
                ev = RecordEvent(**{**ev.__dict__, "action": action})
        elif known is not None and known[0] is None:
            return None
        return ev

    def known(self, did: str, collection: str) -> dict[str, str]:
        """rkey -> cid of the records we believe exist."""
        return {
            k[2]: v[0]
            for k, v in self.records.items()
            if k[0] == did and k[1] == collection and v[0] is not None
        }

    def forget(self, did: str) -> None:
        self.newest_rev.pop(did, None)
        for k in [k for k in self.records if k[0] == did]:
            del self.records[k]
        for c in [c for c in self.counts if c[0] == did]:
            del self.counts[c]
