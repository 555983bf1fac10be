"""dev/demo's atproto part: show the local network and prove its firehose works."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import trio
from devnet import Devnet
from firehose_check import put_and_watch, session_token


async def main(state: Path) -> None:
    net = Devnet.load(state)
    print(f"  PLC  {net.plc_url}")
    for i, url in enumerate(net.pds_urls):
        print(f"  PDS{i} {url}  ({net.pds_dids[i]})")
    print("  accounts:")
    for a in net.accounts.values():
        print(f"    {a.handle:<22} {a.did}  on {a.pds_url}")
    alice, mesh = net.accounts["alice"], net.accounts["alice-mesh"]
    token = await session_token(alice.pds_url, alice.handle, alice.app_password)
    record = {
        "$type": "commune.scheduler.meshlet",
        "meshletDid": mesh.did,
        "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    repo, body, lag = await put_and_watch(
        alice.pds_url, alice.did, token, "commune.scheduler.meshlet", "demo", record
    )
    print(f"  alice published commune.scheduler.meshlet/demo -> {body['meshletDid']}")
    print(
        f"  ... and it came back on the firehose of {alice.pds_url} from {repo} "
        f"{lag * 1000:.0f} ms after the write"
    )


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
