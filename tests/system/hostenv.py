"""Real systemd hosts for system tests: a thin Python face on `dev/hostenv`.

`NspawnHost` boots a Debian host with systemd-nspawn from the shared base rootfs (see
`dev/hostenv`); `LocalHost` uses this machine itself when its PID 1 is systemd and the caller
asks for it (`MESHLET_SYSTEM_HOST=local`). Both run commands the same way: as a transient
systemd service inside the host, in the project folder, with the exit status passed back.

Each booted host has a network namespace and an address of its own (`host.address`) on
this test run's `Network` (a bridge; its gateway is where the local atproto network
listens), and takes faults: `behind_nat()`, `cut_link(peer, both=)`, `cut_port(port)`,
`heal()`, each one nftables table in the host's namespace (dev/lib/hostenv-net.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

PROJECT = Path(__file__).resolve().parents[2]
HOSTENV = PROJECT / "dev" / "hostenv"
HOSTENV_RUN = Path(os.environ.get("MESHLET_HOSTENV_RUN", "/run/meshlet-hostenv"))
HOST_VENV_PYTHON = "/opt/meshlet-venv/bin/python"


class HostEnvError(RuntimeError):
    """dev/hostenv failed; the message names the failing step and carries its log tail."""


def _hostenv(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    # Hosts (and their network) are owned by this process: `dev/hostenv down --stale`
    # removes them if it dies. A caller may name another owner (dev/demo: "demo").
    owner = os.environ.get("MESHLET_HOSTENV_OWNER") or str(os.getpid())
    env = {**os.environ, "MESHLET_HOSTENV_OWNER": owner}
    proc = subprocess.run(
        [str(HOSTENV), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        raise HostEnvError(
            f"dev/hostenv {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    return proc


@dataclass(frozen=True)
class Network:
    """This process's dev/hostenv network: the bridge its hosts' links hang on."""

    number: int
    gateway: str
    subnet: str
    bridge: str

    @classmethod
    def up(cls) -> Network:
        """Create (or find) the network this process owns; hosts it boots join it."""
        out = _hostenv("net", "up", timeout=60).stdout.split()
        kv = dict(word.split("=", 1) for word in out)
        return cls(int(kv["network"]), kv["gateway"], kv["subnet"], kv["bridge"])

    def down(self) -> None:
        """Remove the bridge (every host on it must be down)."""
        _hostenv("net", "down", str(self.number), timeout=60)


def build() -> None:
    """Build or refresh the base rootfs (fast when it is up to date)."""
    _hostenv("build", timeout=1800)


def remove_stale_hosts() -> None:
    """Power off hosts left by test runs that died (killed pytest, CI timeout)."""
    _hostenv("down", "--stale", timeout=120)


def _exec_args(
    cmd: Sequence[str], user: str | None, env: Mapping[str, str] | None, cwd: str | None
) -> list[str]:
    args: list[str] = []
    if user:
        args += ["--user", user]
    for key, value in (env or {}).items():
        args += ["-E", f"{key}={value}"]
    if cwd:
        args += ["--cwd", cwd]
    return [*args, "--", *cmd]


class _Host:
    """What both kinds of host share: running a command given by `command()`."""

    def command(
        self,
        *cmd: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> list[str]:
        raise NotImplementedError

    def run(
        self,
        *cmd: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        check: bool = False,
        timeout: float | None = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the host; stdout/stderr captured as text."""
        return subprocess.run(
            self.command(*cmd, user=user, env=env, cwd=cwd),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
        )

    async def arun(
        self,
        *cmd: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """`run` for trio code: stdout/stderr captured as bytes."""
        return await trio.run_process(
            self.command(*cmd, user=user, env=env, cwd=cwd),
            capture_stdout=True,
            capture_stderr=True,
            check=check,
        )


@dataclass
class NspawnHost(_Host):
    """A systemd host booted by `dev/hostenv up NAME` (an overlay of the base rootfs)."""

    name: str
    python: str = HOST_VENV_PYTHON
    _up: bool = field(default=False, repr=False)

    @classmethod
    def boot(cls, *names: str) -> list[NspawnHost]:
        """Boot several hosts at once (they boot in parallel) and wait until all are ready."""
        _hostenv("up", *names, timeout=180)
        return [cls(name, _up=True) for name in names]

    @classmethod
    async def aboot(cls, *names: str) -> list[NspawnHost]:
        """`boot` for trio code (runs in a worker thread)."""
        return await trio.to_thread.run_sync(lambda: cls.boot(*names))

    async def adown(self, *, abrupt: bool = False) -> None:
        """`down` for trio code, e.g. to crash one host while meshlets keep running."""
        await trio.to_thread.run_sync(lambda: self.down(abrupt=abrupt))

    @staticmethod
    def shutdown(*hosts: NspawnHost) -> None:
        """Power several hosts off at once (those still up)."""
        names = [host.name for host in hosts if host._up]
        if names:
            _hostenv("down", *names, timeout=120)
        for host in hosts:
            host._up = False

    def up(self) -> NspawnHost:
        _hostenv("up", self.name, timeout=180)
        self._up = True
        return self

    def down(self, *, abrupt: bool = False) -> None:
        """Power the host off and remove everything it left (mounts, cgroups, state).

        `abrupt=True` kills every process of the host first, like pulling the plug.
        """
        _hostenv("down", *(["--abrupt"] if abrupt else []), self.name, timeout=120)
        self._up = False

    @property
    def address(self) -> str:
        """The host's own IPv4 address (its eth0 on this run's network)."""
        return (HOSTENV_RUN / self.name / "address").read_text().strip()

    @property
    def public_address(self) -> str:
        """The address a host behind NAT is seen from (no one can connect to it)."""
        a, b, c, d = self.address.split(".")
        return f"{a}.{b}.{c}.{int(d) + 128}"

    # -- faults: each an nftables table in the host's namespace, gone with `heal` --------

    def behind_nat(self) -> None:
        """Outbound only: connections leave from `public_address`, none come in."""
        _hostenv("fault", self.name, "nat", timeout=30)

    def cut_link(self, peer: NspawnHost, *, both: bool = False) -> None:
        """Drop what this host sends to `peer` (and, with `both`, what peer sends here)."""
        _hostenv("fault", self.name, "cut", peer.name, *(["--both"] if both else []), timeout=30)

    def cut_port(self, port: int) -> None:
        """Drop what this host sends to the gateway's TCP `port` (e.g. its PDS)."""
        _hostenv("fault", self.name, "cut-port", str(port), timeout=30)

    def heal(self, *faults: str) -> None:
        """Undo `faults` (names as `faults()` lists them), or every fault."""
        _hostenv("heal", self.name, *faults, timeout=30)

    def faults(self) -> list[str]:
        """The faults in force: nat, cut-to-PEER, cut-port-PORT."""
        ns = f"mh-{self.name}"
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "tables"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return [
            line.split()[2][len("meshlet-") :]
            for line in out.splitlines()
            if len(line.split()) == 3 and line.split()[2].startswith("meshlet-")
        ]

    @property
    def leader_pid(self) -> int:
        """PID (on this machine) of the host's systemd, e.g. for `nsenter -t`."""
        return int((HOSTENV_RUN / self.name / "leader.pid").read_text())

    def command(
        self,
        *cmd: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> list[str]:
        """The argv that runs `cmd` inside the host (for trio.run_process and friends)."""
        return [str(HOSTENV), "exec", self.name, *_exec_args(cmd, user, env, cwd)]


@dataclass
class LocalHost(_Host):
    """This machine, when its PID 1 is systemd: commands run as transient units here.

    It needs what the base rootfs has (user meshlet with rootless podman, the image
    localhost/busybox, pystemd in `python`); see dev/lib/hostenv-build.sh.
    """

    name: str = "localhost"
    python: str = str(PROJECT / ".venv" / "bin" / "python")

    def command(
        self,
        *cmd: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> list[str]:
        argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect"]
        argv += ["--service-type=exec", f"--working-directory={cwd or PROJECT}"]
        if user and user != "root":
            uid = int(subprocess.check_output(["id", "-u", user], text=True))
            argv += [f"--uid={user}", "-E", f"XDG_RUNTIME_DIR=/run/user/{uid}"]
        for key, value in (env or {}).items():
            argv += ["-E", f"{key}={value}"]
        if os.geteuid() != 0:
            argv = ["sudo", *argv]
        return [*argv, "--", *cmd]

    def down(self) -> None:
        """Nothing to power off: this is the machine the tests run on."""


def pid1_is_systemd() -> bool:
    return Path("/run/systemd/system").is_dir() and Path("/proc/1/comm").read_text().strip() == (
        "systemd"
    )


def host_kind() -> str:
    """`local` or `nspawn`: MESHLET_SYSTEM_HOST if set, else nspawn (local is opt-in)."""
    kind = os.environ.get("MESHLET_SYSTEM_HOST", "nspawn")
    if kind not in ("local", "nspawn"):
        sys.exit(f"MESHLET_SYSTEM_HOST must be 'local' or 'nspawn', not {kind!r}")
    if kind == "local" and not pid1_is_systemd():
        sys.exit("MESHLET_SYSTEM_HOST=local needs a machine whose PID 1 is systemd")
    return kind


def unique_name(prefix: str) -> str:
    """A host name no other test session on this machine uses (sessions run side by side)."""
    return f"{prefix}-{os.getpid()}"


def nspawn_available() -> bool:
    return os.geteuid() == 0 and shutil.which("systemd-nspawn") is not None
