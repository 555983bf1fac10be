"""Test-suite wiring: markers by folder, and the session-scoped environments."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from devnet import Devnet

_HERE = Path(__file__).parent
_MARK_BY_FOLDER = {"unit": "unit", "devnet": "devnet", "system": "system"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/<folder>/ get that folder's marker (unit, devnet or system)."""
    for item in items:
        rel = Path(str(item.fspath)).relative_to(_HERE)
        mark = _MARK_BY_FOLDER.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if mark and not item.get_closest_marker(mark):
            item.add_marker(mark)


# --- no test leaves a process behind ---------------------------------------------------


def _descendants(root: int) -> dict[int, str]:
    """pid -> command name of every live descendant of `root` (from /proc)."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parent[int(d.name)] = int(fields[1])
        names[int(d.name)] = comm
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = names[child]
                frontier.append(child)
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a subprocess of its own running (session environments,
    started before the test, are not counted)."""
    before = set(_descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = {p: n for p, n in _descendants(os.getpid()).items() if p not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        pytest.fail(f"the test left processes running: {left}", pytrace=False)


# --- the local atproto network (dev/devnet), one per test session ---------------------

sys.path.insert(0, str(_HERE.parent / "dev" / "lib"))


@pytest.fixture(scope="session")
def hostenv_network() -> Iterator[str]:
    """The address the local atproto network listens on: the gateway of this run's
    dev/hostenv network (booted hosts sit on it, each at an address of its own), or
    loopback where hosts are not booted (not root, MESHLET_SYSTEM_HOST=local) or when
    MESHLET_DEVNET_HOST=loopback. The network is removed after the session's hosts."""
    local = os.environ.get("MESHLET_SYSTEM_HOST") == "local"
    if os.geteuid() != 0 or local or os.environ.get("MESHLET_DEVNET_HOST") == "loopback":
        yield "127.0.0.1"
        return
    from tests.system.hostenv import HostEnvError, Network

    try:
        net = Network.up()
    except HostEnvError as e:
        pytest.fail(f"the hosts' network did not come up: {e}", pytrace=False)
    try:
        yield net.gateway
    finally:
        net.down()


@pytest.fixture(scope="session")
def devnet(hostenv_network: str) -> Iterator[Devnet]:
    """PLC + two reference PDSes with alice, bob, carol and their meshlets, on the address
    booted hosts reach (`hostenv_network`).

    Tests that need accounts of their own (to stay independent) call
    `devnet.create_account(name, pds)` or `await devnet.create_account_async(...)`.
    """
    from devnet import Devnet, DevnetError

    try:
        # gone with this run, even if killed
        net = Devnet.up(owner_pid=os.getpid(), host=hostenv_network)
    except DevnetError as e:
        pytest.fail(f"the local atproto network did not start: {e}", pytrace=False)
    try:
        yield net
    finally:
        net.down()
