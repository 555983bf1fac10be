"""Write a record through a PDS and wait for it on that PDS's firehose (trio).

Used by the devnet smoke test and by dev/demo: the quickest end-to-end proof that the local
atproto network is real.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio
from atproto import CAR, firehose_models, models, parse_subscribe_repos_message
from trio_websocket import open_websocket_url


async def session_token(pds_url: str, handle: str, app_password: str) -> str:
    async with httpx.AsyncClient(base_url=pds_url) as http:
        r = await http.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": handle, "password": app_password},
        )
        r.raise_for_status()
        return str(r.json()["accessJwt"])


async def put_and_watch(
    pds_url: str,
    did: str,
    token: str,
    collection: str,
    rkey: str,
    record: dict[str, Any],
    timeout: float = 15.0,
) -> tuple[str, dict[str, Any], float]:
    """putRecord, then read the firehose until the commit carrying it arrives.

    Returns (repo DID of the commit, the record as decoded from the commit's CAR blocks,
    seconds from the put's reply to the frame).
    """
    ws_url = pds_url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos"
    path = f"{collection}/{rkey}"
    with trio.fail_after(timeout):
        async with open_websocket_url(ws_url) as ws:
            async with httpx.AsyncClient(base_url=pds_url) as http:
                r = await http.post(
                    "/xrpc/com.atproto.repo.putRecord",
                    headers={"authorization": f"Bearer {token}"},
                    json={"repo": did, "collection": collection, "rkey": rkey, "record": record},
                )
                r.raise_for_status()
            put_done = time.monotonic()
            while True:
                frame = firehose_models.Frame.from_bytes(await ws.get_message())
                msg = parse_subscribe_repos_message(frame)
                if not isinstance(msg, models.ComAtprotoSyncSubscribeRepos.Commit):
                    continue
                car = CAR.from_bytes(msg.blocks)
                for op in msg.ops:
                    if op.path == path and op.cid is not None:
                        return msg.repo, car.blocks.get(op.cid), time.monotonic() - put_done
