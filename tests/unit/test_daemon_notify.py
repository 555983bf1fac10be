"""sd_notify messages reach the socket systemd names; nothing happens outside systemd.

`SdNotifier` reads `NOTIFY_SOCKET` from the process environment, as sdnotify and systemd's
own sd_notify do: each test points it at a datagram socket of its own.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from meshletd.notify import RecordingNotifier, SdNotifier, run_watchdog, watchdog_interval


def bound(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s, path


def test_ready_and_status_arrive_as_one_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, path = bound(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = SdNotifier()
    n.ready("3 members, 2 replicas")
    assert s.recv(4096) == b"READY=1\nSTATUS=3 members, 2 replicas"
    n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    n.reloading()
    msg = s.recv(4096).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
    n.close()
    s.close()


def test_abstract_namespace_sockets_work(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"meshlet-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    SdNotifier().watchdog()
    assert s.recv(100) == b"WATCHDOG=1"
    s.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SdNotifier()
    assert not n.enabled
    n.ready()
    assert n.dropped == 0  # nothing was even tried


def test_newlines_cannot_inject_extra_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, path = bound(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = SdNotifier()
    n.status("ok\nREADY=1\rX=1")
    assert s.recv(4096) == b"STATUS=ok READY=1 X=1"
    n.status("caf\u00e9 \u202e")  # systemd reads UTF-8; sdnotify writes latin-1: keep ASCII
    assert s.recv(4096) == b"STATUS=caf? ?"
    s.close()


def test_a_vanished_or_full_systemd_socket_drops_messages_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never.sock"))
    never = SdNotifier()
    never.ready()
    assert not never.enabled and never.dropped == 1

    s, path = bound(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = SdNotifier()
    # Nobody reads: the receive queue fills, and sends fail at once instead of blocking the
    # event loop (sdnotify's socket is blocking by default).
    for _ in range(2000):
        n.status("x" * 1000)
    assert n.dropped > 0
    s.close()
    os.unlink(path)
    before = n.dropped
    n.ready()  # systemd went away after we connected
    assert n.dropped == before + 1


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0


async def test_watchdog_pings_only_while_the_loop_is_alive(autojump_clock) -> None:
    rec = RecordingNotifier()
    healthy = True
    with trio.move_on_after(10.5):
        async with trio.open_nursery() as n:
            n.start_soon(run_watchdog, rec, 1.0, lambda: healthy)
            await trio.sleep(4.5)
            healthy = False
    assert rec.messages.count({"WATCHDOG": "1"}) == 5


def test_a_listening_socket_goes_to_the_fd_store_and_comes_back_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps the XRPC port open across a restart (docs/protocol.md section 13): the
    daemon sends its listener with FDSTORE=1, systemd hands it back in LISTEN_FDS."""
    from meshletd.notify import inherited_fds

    s, path = bound(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert SdNotifier().store_fds("xrpc", [listener.fileno()])
    msg, fds, _flags, _addr = socket.recv_fds(s, 4096, 4)
    assert msg == b"FDSTORE=1\nFDNAME=xrpc" and len(fds) == 1
    kept = socket.socket(fileno=fds[0])
    assert kept.getsockname() == listener.getsockname()
    kept.close()
    listener.close()
    s.close()
    # The next start: LISTEN_* name the descriptors (from fd 3), for this process only.
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "xrpc:other"}
    assert inherited_fds(env) == {"xrpc": [3], "other": [4]}
    assert inherited_fds({**env, "LISTEN_PID": "1"}) == {}
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not SdNotifier().store_fds("xrpc", [0])
