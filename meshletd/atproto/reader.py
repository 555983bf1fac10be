"""Unauthenticated reads of any repo on any PDS (listRecords, signed getRecord proofs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from meshletd.atproto.verify import (
    Unverified,
    cid_bytes,
    cid_str,
    decode_car,
    verified_record,
    verify_commit,
)


class ReadError(Exception):
    """The PDS could not be read (down, or answered with an error)."""


@dataclass(frozen=True)
class ProvenRecord:
    """A record (or its absence) proven by a signed commit at revision `rev`."""

    did: str
    collection: str
    rkey: str
    rev: str
    cid: str | None
    value: dict[str, Any] | None


class RepoReader:
    def __init__(self, http: httpx.AsyncClient | None = None, timeout_s: float = 10.0) -> None:
        self.http = http or httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _get(self, pds: str, nsid: str, params: dict[str, Any]) -> httpx.Response:
        try:
            r = await self.http.get(f"{pds}/xrpc/{nsid}", params=params)
        except httpx.HTTPError as e:
            raise ReadError(f"{pds} {nsid}: {type(e).__name__}: {e}") from e
        return r

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
                raise ReadError(
                    f"{pds} listRecords {did} {collection}: {r.status_code} {r.text[:200]}"
                )
            body = r.json()
            for rec in body.get("records", []):
                out[rec["uri"].rsplit("/", 1)[1]] = rec["cid"]
            cursor = body.get("cursor")
            if not cursor or not body.get("records"):
                return out

    async def get_record(self, pds: str, did: str, collection: str, rkey: str) -> dict | None:
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
        return r.json()

    async def prove_record(
        self, pds: str, did: str, did_key: str | None, collection: str, rkey: str
    ) -> ProvenRecord:
        """com.atproto.sync.getRecord, verified: signed commit + MST path (presence or absence)."""
        r = await self._get(
            pds, "com.atproto.sync.getRecord", {"did": did, "collection": collection, "rkey": rkey}
        )
        if r.status_code != 200:
            raise ReadError(f"{pds} sync.getRecord {did}/{collection}/{rkey}: {r.status_code}")
        try:
            header, blocks = decode_car(r.content)
        except Exception as e:
            raise Unverified(f"proof is not a CAR ({e})") from e
        roots = header.get("roots") or []
        if not roots:
            raise Unverified("proof CAR has no root")
        commit = verify_commit(blocks, roots[0], did, did_key)
        path = f"{collection}/{rkey}"
        from meshletd.atproto.verify import mst_lookup

        found = mst_lookup(blocks, commit["data"], path)
        cid, value = verified_record(blocks, commit["data"], path, found)
        return ProvenRecord(
            did, collection, rkey, commit["rev"], cid_str(cid) if cid else None, value
        )

    async def collections(self, pds: str, did: str) -> set[str] | None:
        """Collections the repo holds (describeRepo), or None if the PDS cannot say."""
        r = await self._get(pds, "com.atproto.repo.describeRepo", {"repo": did})
        if r.status_code != 200:
            return None
        return set(r.json().get("collections") or ())

    async def latest_rev(self, pds: str, did: str) -> str | None:
        r = await self._get(pds, "com.atproto.sync.getLatestCommit", {"did": did})
        if r.status_code != 200:
            return None
        return r.json().get("rev")


__all__ = ["ProvenRecord", "ReadError", "RepoReader", "cid_bytes"]
