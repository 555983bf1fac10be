"""Unauthenticated reads of any repo on any PDS (listRecords, signed getRecord proofs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from meshletd.atproto.verify import (
    Unverified,
    cid_bytes,
    cid_str,
    decode_car,
    mst_lookup,
    verified_record,
    verify_commit,
)


class ReadError(Exception):
    """The PDS could not be read (down, answered with an error, or with something that is
    not the answer the method promises)."""


class RepoAbsent(ReadError):
    """The PDS answered that it does not list this repo (a 4xx other than 429: no such
    repo, deactivated, taken down): there is nothing to read there, now."""


# A PDS's answer is untrusted input: bounded in size, parsed in a scope that turns anything
# unexpected into a ReadError (docs/protocol.md, "Validity").
MAX_RESPONSE_BYTES = 8 * 2**20
MAX_LISTED_RECORDS = 50_000  # per collection and repo (= the mirror's bound); more: ReadError


@dataclass(frozen=True)
class _Answer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def _json_object(r: _Answer, what: str) -> dict[str, Any]:
    """The JSON object of an answer, or ReadError (not JSON, too deep, not an object)."""
    try:
        body = json.loads(r.content)
    except (ValueError, RecursionError) as e:
        raise ReadError(f"{what}: answer is not JSON ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise ReadError(f"{what}: answer is not a JSON object")
    return body


@dataclass(frozen=True)
class ProvenRecord:
    """A record (or its absence) proven by a signed commit at revision `rev`."""

    did: str
    collection: str
    rkey: str
    rev: str
    cid: str | None
    value: dict[str, Any] | None


def verify_record_proof(
    car: bytes, did: str, did_key: str | None, collection: str, rkey: str
) -> ProvenRecord:
    """A `com.atproto.sync.getRecord` answer (a CAR: the repo's signed commit, the MST path
    to `collection/rkey` and the record, if present), checked: the commit is `did`'s and
    signed with `did_key`, and the path proves the record's presence or absence. Raises
    Unverified otherwise (a hostile CAR may raise other errors too: callers catch all).
    Pure: the same check for an answer read from the PDS and for one a peer forwarded."""
    try:
        header, blocks = decode_car(car)
    except Exception as e:
        raise Unverified(f"proof is not a CAR ({e})") from e
    roots = header.get("roots") or []
    if not roots:
        raise Unverified("proof CAR has no root")
    commit = verify_commit(blocks, roots[0], did, did_key)
    path = f"{collection}/{rkey}"
    found = mst_lookup(blocks, commit["data"], path)
    cid, value = verified_record(blocks, commit["data"], path, found)
    return ProvenRecord(did, collection, rkey, commit["rev"], cid_str(cid) if cid else None, value)


class RepoReader:
    def __init__(self, http: httpx.AsyncClient | None = None, timeout_s: float = 10.0) -> None:
        self.http = http or httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _get(self, pds: str, nsid: str, params: dict[str, Any]) -> _Answer:
        """GET one XRPC query; the (decoded) body is read up to MAX_RESPONSE_BYTES (more is
        a ReadError, so a hostile PDS cannot make us hold an endless answer)."""
        try:
            async with self.http.stream("GET", f"{pds}/xrpc/{nsid}", params=params) as r:
                chunks: list[bytes] = []
                size = 0
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise ReadError(f"{pds} {nsid}: answer over {MAX_RESPONSE_BYTES} bytes")
                    chunks.append(chunk)
                return _Answer(r.status_code, b"".join(chunks))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            raise ReadError(f"{pds} {nsid}: {type(e).__name__}: {e}") from e

    async def list_records(self, pds: str, did: str, collection: str) -> dict[str, str]:
        """rkey -> cid of every record in one collection (unverified; pages of 100)."""
        out: dict[str, str] = {}
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"repo": did, "collection": collection, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            r = await self._get(pds, "com.atproto.repo.listRecords", params)
            if r.status_code != 200:
                kind = (
                    RepoAbsent if 400 <= r.status_code < 500 and r.status_code != 429 else ReadError
                )
                raise kind(f"{pds} listRecords {did} {collection}: {r.status_code} {r.text[:200]}")
            what = f"{pds} listRecords {did} {collection}"
            body = _json_object(r, what)
            records = body.get("records", [])
            if not isinstance(records, list):
                raise ReadError(f"{what}: records is not a list")
            for rec in records:
                uri = rec.get("uri") if isinstance(rec, dict) else None
                cid = rec.get("cid") if isinstance(rec, dict) else None
                if not isinstance(uri, str) or not isinstance(cid, str):
                    raise ReadError(f"{what}: a listed record has no uri and cid")
                out[uri.rsplit("/", 1)[-1]] = cid
            if len(out) > MAX_LISTED_RECORDS:
                raise ReadError(f"{what}: more than {MAX_LISTED_RECORDS} records")
            cursor = body.get("cursor")
            if not isinstance(cursor, str) or not cursor or not records:
                return out

    async def get_record(
        self, pds: str, did: str, collection: str, rkey: str
    ) -> dict[str, Any] | None:
        """The JSON view of one record (unverified), or None if absent."""
        r = await self._get(
            pds, "com.atproto.repo.getRecord", {"repo": did, "collection": collection, "rkey": rkey}
        )
        if r.status_code == 400 and "RecordNotFound" in r.text:
            return None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ReadError(f"{pds} getRecord {did}/{collection}/{rkey}: {r.status_code}")
        return _json_object(r, f"{pds} getRecord {did}/{collection}/{rkey}")

    async def prove_record(
        self, pds: str, did: str, did_key: str | None, collection: str, rkey: str
    ) -> ProvenRecord:
        """com.atproto.sync.getRecord, verified: signed commit + MST path (presence or absence)."""
        r = await self._get(
            pds, "com.atproto.sync.getRecord", {"did": did, "collection": collection, "rkey": rkey}
        )
        if r.status_code != 200:
            raise ReadError(f"{pds} sync.getRecord {did}/{collection}/{rkey}: {r.status_code}")
        return verify_record_proof(r.content, did, did_key, collection, rkey)

    async def collections(self, pds: str, did: str) -> set[str] | None:
        """Collections the repo holds (describeRepo), or None if the PDS cannot say."""
        r = await self._get(pds, "com.atproto.repo.describeRepo", {"repo": did})
        if r.status_code != 200:
            return None
        got = _json_object(r, f"{pds} describeRepo {did}").get("collections") or ()
        if not isinstance(got, list):
            return None
        return {c for c in got if isinstance(c, str)}

    async def latest_rev(self, pds: str, did: str) -> str | None:
        r = await self._get(pds, "com.atproto.sync.getLatestCommit", {"did": did})
        if r.status_code != 200:
            return None
        rev = _json_object(r, f"{pds} getLatestCommit {did}").get("rev")
        return rev if isinstance(rev, str) else None


__all__ = ["ProvenRecord", "ReadError", "RepoAbsent", "RepoReader", "cid_bytes"]
