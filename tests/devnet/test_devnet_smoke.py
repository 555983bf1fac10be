"""The local atproto network is real: a record written through the PDS reaches its firehose."""

from __future__ import annotations

import httpx
from firehose_check import put_and_watch, session_token


async def test_record_written_through_pds_is_seen_on_its_firehose(devnet) -> None:
    alice = devnet.accounts["alice"]
    token = await session_token(alice.pds_url, alice.handle, alice.app_password)
    record = {
        "$type": "commune.scheduler.meshlet",
        "meshletDid": devnet.accounts["alice-mesh"].did,
        "createdAt": "2026-11-27T00:00:00.000Z",
    }
    repo, body, _lag = await put_and_watch(
        alice.pds_url, alice.did, token, "commune.scheduler.meshlet", "smoke", record
    )
    assert repo == alice.did
    assert body["meshletDid"] == record["meshletDid"]


async def test_accounts_are_resolvable_did_plc_documents_naming_their_pds(devnet) -> None:
    carol = devnet.accounts["carol"]
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{devnet.plc_url}/{carol.did}")
        r.raise_for_status()
    services = r.json()["service"]
    assert carol.did.startswith("did:plc:")
    assert any(s["serviceEndpoint"].rstrip("/") == carol.pds_url for s in services)
    assert carol.pds_url == devnet.pds_urls[1]


async def test_fresh_accounts_can_be_created_for_one_test(devnet) -> None:
    dave = await devnet.create_account_async("dave", pds=1)
    assert await session_token(dave.pds_url, dave.handle, dave.app_password)
