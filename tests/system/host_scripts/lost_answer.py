"""Two writes to this host's meshlet repo whose answers are lost while the host is cut from
its PDS: one through meshletd's own client (it gives up with a reset), one through a client
that closes plainly. Run INSIDE a booted host, as root:

    python tests/system/host_scripts/lost_answer.py COLLECTION

Both clients log in (their connections stay open: the PDS keeps them 90 s), then it prints
`ready` and waits for a line on stdin (the test cuts the host from its PDS meanwhile). Each
client then creates the record COLLECTION/<its name> with a 2 s timeout. The last stdout
line is a JSON object: per client, "lost" (the answer timed out: maybe applied),
"answered", or why it failed otherwise.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from meshletd.atproto.pds import PdsClient, PdsUnavailable

TIMEOUT_S = 2.0


async def main(collection: str) -> None:
    cfg = tomllib.loads(Path("/etc/meshlet/meshlet.toml").read_text())
    password = Path("/etc/meshlet/credentials/meshlet-app-password").read_text().strip()
    clients = {
        "reset": PdsClient(cfg["pds"], cfg["did"], password, timeout_s=TIMEOUT_S),
        "plain": PdsClient(
            cfg["pds"], cfg["did"], password, http=httpx.AsyncClient(timeout=TIMEOUT_S)
        ),
    }
    for c in clients.values():
        await c.login()
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    seen: dict[str, str] = {}

    async def write(name: str, client: PdsClient) -> None:
        try:
            await client.create_record(collection, name, {"$type": collection, "by": name})
            seen[name] = "answered"
        except PdsUnavailable as e:
            seen[name] = "lost" if e.maybe_applied else f"failed: {e}"

    async with trio.open_nursery() as nursery:
        for name, client in clients.items():
            nursery.start_soon(write, name, client)
    for c in clients.values():
        await c.aclose()
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
