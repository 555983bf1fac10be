"""A repo this meshlet writes and signs for: its own, or its owner's (with their credential).

`Repo` is what the owner's commands need of a PDS account: read, create, update and delete
records, and a service-auth token to call a peer in that account's name. `PdsRepo` is the
real one (a logged-in `PdsClient`); `FakeRepo` keeps records in memory for unit tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Protocol

from meshletd.atproto.pds import PdsClient
from meshletd.errors import UpstreamFailure
from meshletd.jsonvalue import JsonObject

SERVICE_AUTH = "com.atproto.server.getServiceAuth"
TOKEN_TTL_S = 60


class Repo(Protocol):
    @property
    def did(self) -> str: ...

    async def get_record(self, collection: str, rkey: str) -> tuple[str, JsonObject] | None:
        """(cid, value), or None if there is no such record."""
        ...

    async def create_record(self, collection: str, rkey: str, value: JsonObject) -> str:
        """Create a record under a fresh key; returns its CID."""
        ...

    async def put_record(self, collection: str, rkey: str, value: JsonObject) -> str:
        """Create or update a record; returns its CID."""
        ...

    async def delete_record(self, collection: str, rkey: str) -> None: ...

    async def token(self, aud: str, lxm: str) -> str:
        """A service-auth token of this account for method `lxm` of `aud` (`ServiceAuth`)."""
        ...


class PdsRepo:
    """`Repo` over a logged-in `PdsClient`."""

    def __init__(self, client: PdsClient) -> None:
        self.client = client

    @property
    def did(self) -> str:
        return self.client.did

    async def get_record(self, collection: str, rkey: str) -> tuple[str, dict[str, Any]] | None:
        got = await self.client.get_record(collection, rkey)
        if got is None:
            return None
        cid, value = got
        return str(cid), dict(value)

    async def create_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        return await self.client.create_record(collection, rkey, value)

    async def put_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        return await self.client.put_record(collection, rkey, value)

    async def delete_record(self, collection: str, rkey: str) -> None:
        await self.client.delete_record(collection, rkey)

    async def token(self, aud: str, lxm: str) -> str:
        r = await self.client.session.request(
            "GET",
            SERVICE_AUTH,
            params={"aud": aud, "lxm": lxm, "exp": int(time.time()) + TOKEN_TTL_S},
        )
        if r.status_code != 200:
            raise UpstreamFailure(f"the PDS of {self.did} refused a service-auth token: {r.text}")
        token = r.json().get("token")
        if not isinstance(token, str):
            raise UpstreamFailure(f"the PDS of {self.did} answered no service-auth token")
        return token


class FakeRepo:
    """`Repo` in memory: CIDs are hashes of the values; tokens only fake peers accept."""

    def __init__(self, did: str) -> None:
        self._did = did
        self.records: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    @property
    def did(self) -> str:
        return self._did

    async def get_record(self, collection: str, rkey: str) -> tuple[str, dict[str, Any]] | None:
        return self.records.get((collection, rkey))

    async def create_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        return await self.put_record(collection, rkey, value)

    async def put_record(self, collection: str, rkey: str, value: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
        cid = "bafyrei" + digest[:52]
        self.records[(collection, rkey)] = (cid, dict(value))
        return cid

    async def delete_record(self, collection: str, rkey: str) -> None:
        self.records.pop((collection, rkey), None)  # as a PDS: deleting nothing is no error

    async def token(self, aud: str, lxm: str) -> str:
        return f"fake:{self._did}:{aud}:{lxm}"
