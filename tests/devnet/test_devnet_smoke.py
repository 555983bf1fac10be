"""The local atproto network is real: a record written through the PDS reaches its firehose."""

from __future__ import annotations

import httpx
import trio
from atproto import CAR, firehose_models, models, parse_subscribe_repos_message
from trio_websocket import open_websocket_url


async def _session(pds_url: str, handle: str, app_password: str) -> str:
    async with httpx.AsyncClient(base_url=pds_url) as http:
        r = await http.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": handle, "password": app_password},
        )
        r.raise_for_status()
        return str(r.json()["accessJwt"])


async def test_record_written_through_pds_is_seen_on_its_firehose(devnet) -> None:
    alice = devnet.accounts["alice"]
    token = await _session(alice.pds_url, alice.handle, alice.app_password)
    ws_url = alice.pds_url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos"
    record = {
        "$type": "commune.scheduler.meshlet",
        "meshletDid": devnet.accounts["alice-mesh"].did,
        "createdAt": "2026-11-27T00:00:00.000Z",
    }

    seen: list[tuple[str, str, dict]] = []
    with trio.fail_after(15):
        async with open_websocket_url(ws_url) as ws:
            async with httpx.AsyncClient(base_url=alice.pds_url) as http:
                r = await http.post(
                    "/xrpc/com.atproto.repo.putRecord",
                    headers={"authorization": f"Bearer {token}"},
                    json={
                        "repo": alice.did,
                        "collection": "commune.scheduler.meshlet",
                        "rkey": "smoke",
                        "record": record,
                    },
                )
                r.raise_for_status()
            while not any(path == "commune.scheduler.meshlet/smoke" for _, path, _ in seen):
                frame = firehose_models.Frame.from_bytes(await ws.get_message())
                msg = parse_subscribe_repos_message(frame)
                if not isinstance(msg, models.ComAtprotoSyncSubscribeRepos.Commit):
                    continue
                car = CAR.from_bytes(msg.blocks)
                for op in msg.ops:
                    if op.action in ("create", "update") and op.cid is not None:
                        seen.append((msg.repo, op.path, car.blocks.get(op.cid)))

    repo, _, body = next(s for s in seen if s[1] == "commune.scheduler.meshlet/smoke")
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
    token = await _session(dave.pds_url, dave.handle, dave.app_password)
    assert token
