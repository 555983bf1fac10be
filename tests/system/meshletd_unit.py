"""Install the packaged systemd/meshletd.service in a booted test host, run from the dev venv.

The packaged unit runs /usr/bin/meshletd; in a test host the venv /opt/meshlet-venv provides
meshletd, installed editable from the project folder. A drop-in points the unit there and
binds the project folder in read-only: the unit's PrivateTmp/ProtectHome would hide a
checkout under /tmp or /root (CI clones anywhere). Everything else is the unit as shipped,
sandbox included, so the tests check the daemon under the hardening users get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[2]
UNIT = "meshletd.service"
VENV = "/opt/meshlet-venv/bin"
DROP_IN_DIR = f"/etc/systemd/system/{UNIT}.d"


class _Host(Protocol):
    def run(self, *cmd: str, check: bool = ..., input: str | None = ...) -> object: ...


def drop_in(extra: str = "") -> str:
    """The drop-in: the venv's meshletd instead of /usr/bin's; `extra` adds [Service] lines."""
    return (
        "[Service]\n"
        f"BindReadOnlyPaths={ROOT}\n"
        "ExecStart=\n"
        f"ExecStart={VENV}/meshletd\n"
        f"{extra.strip()}\n"
    )


def install_meshletd_unit(host: _Host, *, name: str = "test.conf", extra: str = "") -> None:
    """The unit, its drop-in `name`, /etc/meshlet/credentials (0700) and the runtime dirs
    the package's tmpfiles.d makes; then daemon-reload. meshlet.toml is the caller's."""
    host.run(
        "sh",
        "-c",
        f"mkdir -p /etc/meshlet/credentials {DROP_IN_DIR} && chmod 700 /etc/meshlet/credentials",
        check=True,
    )
    _write(host, f"/etc/systemd/system/{UNIT}", (ROOT / "systemd" / UNIT).read_text())
    _write(host, f"{DROP_IN_DIR}/{name}", drop_in(extra))
    # The package's tmpfiles.d lines for /run (the unit may write nowhere else there).
    tmpfiles = "".join(
        line + "\n"
        for line in (ROOT / "systemd" / "meshlet.tmpfiles").read_text().splitlines()
        if line.startswith("d /run/")
    )
    host.run("systemd-tmpfiles", "--create", "-", input=tmpfiles, check=True)
    host.run("systemctl", "daemon-reload", check=True)


def remove_meshletd_unit(host: _Host) -> None:
    """Undo `install_meshletd_unit` (the unit should be stopped first)."""
    host.run("rm", "-rf", f"/etc/systemd/system/{UNIT}", DROP_IN_DIR)
    host.run("systemctl", "daemon-reload")


def _write(host: _Host, path: str, text: str) -> None:
    host.run("sh", "-c", f"cat > {path} && chmod 644 {path}", input=text, check=True)
