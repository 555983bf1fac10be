"""Shared by dev/benches/footprint and dev/benches/ctl: a throwaway meshletd to measure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
did = "{did}"
owner = "{owner}"
pds = "{pds}"
plc_url = "{plc}"
state_dir = "{base}/state"
backend = "{backend}"
runtime = "none"
[[clusters]]
name = "bench"
members = {members}
[listen]
xrpc = "127.0.0.1:0"
control_socket = "{base}/control.sock"
"""


class BenchDaemon:
    """`with BenchDaemon(members=3) as d:` runs meshletd until the block ends."""

    def __init__(self, members: int = 3, devnet: object = None) -> None:
        """With `devnet` (a running dev/devnet), meshletd uses the real atproto backend with
        fresh accounts and `members` member owners whose meshlets consent to it."""
        self.devnet = devnet
        self.members = [f"did:plc:member{i}" for i in range(members)]
        self.base = Path(tempfile.mkdtemp(prefix="meshlet-bench-"))
        self.socket = self.base / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fields = {
            "did": "did:plc:benchmesh",
            "owner": "did:plc:benchowner",
            "pds": "http://127.0.0.1:1",
            "plc": "http://127.0.0.1:1",
            "backend": "memory",
        }
        if devnet is not None:
            self._accounts(devnet, members)

    def _accounts(self, devnet: object, members: int) -> None:
        import trio

        from meshletd.atproto.testing import MeshletNode

        tag = os.urandom(3).hex()
        owner = devnet.create_account(f"bo{tag}")
        mesh = devnet.create_account(f"bm{tag}")
        people = [
            (
                devnet.create_account(f"b{i}o{tag}", pds=i % 2),
                devnet.create_account(f"b{i}m{tag}", pds=i % 2),
            )
            for i in range(members)
        ]

        async def publish() -> None:
            for o, m in people:
                node = MeshletNode(
                    plc_url=devnet.plc_url, meshlet=m, owner=o, clusters={"bench": [owner.did]}
                )
                await node.publish()

        trio.run(publish)
        self.members = [o.did for o, _ in people]
        self.fields = {
            "did": mesh.did,
            "owner": owner.did,
            "pds": mesh.pds_url,
            "plc": devnet.plc_url,
            "backend": "atproto",
        }
        creds = self.base / "credentials.toml"
        creds.write_text(
            f'meshlet-app-password = "{mesh.app_password}"\n'
            f'owner-app-password = "{owner.app_password}"\n'
        )
        os.chmod(creds, 0o600)
        self.credentials = creds

    def __enter__(self) -> BenchDaemon:
        cfg = self.base / "meshlet.toml"
        members = "[" + ", ".join(f'"{m}"' for m in self.members) + "]"
        cfg.write_text(CONFIG.format(base=self.base, members=members, **self.fields))
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        if self.devnet is not None:
            env["MESHLET_CREDENTIALS"] = str(self.credentials)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshletd", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "meshletd.log", "wb"),
            env=env,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.base / "meshletd.log").read_text())
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
