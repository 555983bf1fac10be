"""System-test fixtures: one real systemd host for the whole session.

By default the host is booted with `dev/hostenv` (systemd-nspawn, an overlay of the cached
base rootfs) and powered off at the end. On a machine whose PID 1 is systemd, set
MESHLET_SYSTEM_HOST=local to run against the machine itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.system.hostenv import (
    HostEnvError,
    LocalHost,
    NspawnHost,
    build,
    host_kind,
    nspawn_available,
    remove_stale_hosts,
    unique_name,
)


@pytest.fixture(scope="session")
def systemd_host(hostenv_network: str) -> Iterator[NspawnHost | LocalHost]:
    """A booted systemd host with rootless podman (user meshlet) and pystemd in `.python`."""
    if host_kind() == "local":
        yield LocalHost()
        return
    if not nspawn_available():
        pytest.fail("system tests need root and systemd-nspawn (dev/test installs it)", False)
    try:
        remove_stale_hosts()
        build()
        host = NspawnHost(unique_name("pytest")).up()
    except HostEnvError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield host
    finally:
        host.down()
