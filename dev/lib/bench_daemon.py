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
did = "did:plc:benchmesh"
owner = "did:plc:benchowner"
pds = "http://127.0.0.1:1"
state_dir = "{base}/state"
backend = "memory"
[[clusters]]
name = "bench"
members = {members}
[listen]
xrpc = "127.0.0.1:0"
control_socket = "{base}/control.sock"
"""


class BenchDaemon:
    """`with BenchDaemon(members=3) as d:` runs meshletd until the block ends."""

    def __init__(self, members: int = 3) -> None:
        self.members = [f"did:plc:member{i}" for i in range(members)]
        self.base = Path(tempfile.mkdtemp(prefix="meshlet-bench-"))
        self.socket = self.base / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        cfg = self.base / "meshlet.toml"
        members = "[" + ", ".join(f'"{m}"' for m in self.members) + "]"
        cfg.write_text(CONFIG.format(base=self.base, members=members))
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
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
