"""SIGHUP: the configuration is re-read and applied live; a broken file changes nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from meshletd import config
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore

BASE = """
did = "did:plc:alicemesh"
owner = "did:plc:alice"
pds = "http://127.0.0.1:1"
backend = "memory"
state_dir = "{dir}/state"
[[clusters]]
name = "friends"
members = {members}
[listen]
xrpc = "127.0.0.1:0"
control_socket = "{dir}/control.sock"
"""


def write(path: Path, members: str) -> None:
    path.write_text(BASE.format(dir=path.parent, members=members))


async def start(tmp_path: Path, nursery: trio.Nursery, signals: bool = False) -> Daemon:
    path = tmp_path / "meshlet.toml"
    write(path, '["did:plc:bob"]')
    d = Daemon(
        config.load(path),
        config_path=path,
        notifier=RecordingNotifier(),
        handle_signals=signals,
        environ={},
        store=MemoryStore(),
    )
    await nursery.start(d.run)
    return d


async def test_reload_applies_new_members_and_tells_systemd(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    d = await start(tmp_path, nursery)
    write(tmp_path / "meshlet.toml", '["did:plc:bob", "did:plc:carol"]')
    await d.reload()
    assert d.node.summary()["members"] == 2
    assert d.node.is_member("did:plc:carol")
    keys = [next(iter(m)) for m in d.notifier.messages]
    assert keys[-2:] == ["RELOADING", "READY"]
    assert d.notifier.messages[-1]["STATUS"] == "2 members, 0 replicas"
    d.request_stop()


async def test_a_broken_file_on_reload_keeps_the_running_configuration(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    d = await start(tmp_path, nursery)
    (tmp_path / "meshlet.toml").write_text("did = ")
    await d.reload()
    assert d.cfg.members == ["did:plc:bob"] and d.node.summary()["members"] == 1
    assert d.notifier.messages[-1].get("READY") == "1"
    d.request_stop()


async def test_sigterm_stops_the_daemon_with_stopping(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            d = await start(tmp_path, nursery, signals=True)
            os.kill(os.getpid(), signal.SIGTERM)
    assert any(m.get("STOPPING") == "1" for m in d.notifier.messages)
    assert not (tmp_path / "control.sock").exists()
