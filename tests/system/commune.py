"""A real commune for end-to-end tests, benches and the demo: three people, three meshlets,
each meshletd a `Type=notify` service on its own booted systemd host.

    commune = Commune.up(devnet)            # accounts, hosts, units, config, credentials
    a = commune["alice"]                    # one `Meshlet`: its host, accounts, meshletctl
    a.ctl_json("members")
    commune.down()                          # meshletd stopped, hosts powered off, nothing left

alice and bob live on PDS 0 and carol on PDS 1 of the local atproto network (dev/devnet);
every person gets fresh accounts (owner + meshlet), so a commune never sees another test's
records. Each meshlet lists the other two owners in one cluster ("commune"): mutual consent.
Each host has a network namespace and an address of its own (dev/hostenv); meshletd listens
for peers on that address and publishes it as its endpoint, and reaches the PLC and PDSes at
the network's gateway. Nothing goes over loopback between hosts. Faults for the tests:
`behind_nat(person)` (or `Commune.up(nat=...)`, from boot), `cut(a, b, both=)`,
`cut_from_pds(person)`, `heal(person)`, `stop_pds(person, seconds)`, `kill_firehoses()`,
`hold_firehose(person, seconds)`.

The unit is the packaged systemd/meshletd.service, with a drop-in that runs the project's
venv inside the host and binds the checkout read-only (PrivateTmp/ProtectHome would hide a
checkout under /tmp or /root).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.system.hostenv import (
    HOSTENV_RUN,
    HostEnvError,
    Network,
    NspawnHost,
    build,
    nspawn_available,
    remove_stale_hosts,
)
from tests.system.meshletd_unit import install_meshletd_unit

ROOT = Path(__file__).resolve().parents[2]
UNIT = "meshletd.service"
VENV = "/opt/meshlet-venv/bin"
CTL = f"{VENV}/meshletctl"
PEOPLE = ("alice", "bob", "carol")
PDS_OF = {"alice": 0, "bob": 0, "carol": 1}
# More people (`Commune.up(people=...)`, e.g. dev/chaos): their PDS alternates 1, 0, 1, ...
MORE_PEOPLE = ("dave", "erin", "frank", "grace", "heidi")


def pds_of(person: str, index: int) -> int:
    """The PDS (0 or 1) of the index-th person of a commune."""
    return PDS_OF.get(person, (index + 1) % 2)


CLUSTER = "commune"
# The host's podman pause holder (dev/hostenv) is not a replica.
NOT_REPLICAS = ("meshlet-podman-pause.service",)


T = TypeVar("T")
_serial = itertools.count()


class CommuneError(RuntimeError):
    """Setting up the commune failed; the message says which meshlet and carries its log."""


# meshletd's XRPC port on a host with an address of its own.
XRPC_PORT = 2585


def free_port() -> int:
    """A free TCP port on loopback (for hosts that share this machine's network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.25) -> T:
    """Call `probe` until it returns something truthy; return it, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except AssertionError as e:  # a probe may assert; keep the last message
            last = e
            value = None
        else:
            value = last
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}; last: {last!r}"
            )
        time.sleep(every)


@dataclass
class Meshlet:
    """One person's machine: a host running meshletd for their meshlet account."""

    person: str
    host: NspawnHost
    owner: Any  # dev/lib/devnet.Account
    mesh: Any
    port: int
    members: list[str]
    contribution: dict[str, int]
    scheduling: dict[str, int] = field(default_factory=dict)
    # meshlet.toml [policy] (e.g. {"network": "lan"} where a test's services are on the LAN)
    policy: dict[str, str] = field(default_factory=dict)
    # Behind NAT: no one can reach it, so it publishes no endpoint.
    nat: bool = False
    web_port: int = 0  # the page (`[web] listen`), on the host's own address

    @property
    def did(self) -> str:
        return str(self.mesh.did)

    @property
    def owner_did(self) -> str:
        return str(self.owner.did)

    @property
    def address(self) -> str:
        """The host's own address, or loopback on a host without a network of its own."""
        try:
            return self.host.address
        except FileNotFoundError:
            return "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def web_url(self) -> str:
        return f"http://{self.address}:{self.web_port}"

    def config(self, devnet: Any) -> str:
        members = ", ".join(f'"{d}"' for d in self.members)
        lines = [
            f'did = "{self.mesh.did}"',
            f'owner = "{self.owner.did}"',
            f'pds = "{self.mesh.pds_url}"',
            f'owner_pds = "{self.owner.pds_url}"',
            f'plc_url = "{devnet.plc_url}"',
            *([] if self.nat else [f'public_endpoint = "{self.endpoint}"']),
            'runtime = "systemd"',
            'log_level = "info"',
            "[[clusters]]",
            f'name = "{CLUSTER}"',
            f"members = [{members}]",
            "[contribution]",
            *(f"{k} = {v}" for k, v in self.contribution.items()),
            "[listen]",
            f'xrpc = "{self.address}:{self.port}"',
            "[web]",
            f'listen = "{self.address}:{self.web_port}"',
        ]
        if self.scheduling:
            lines += ["[scheduling]", *(f"{k} = {v}" for k, v in self.scheduling.items())]
        if self.policy:
            lines += ["[policy]", *(f"{k} = {json.dumps(v)}" for k, v in self.policy.items())]
        return "\n".join(lines) + "\n"

    # -- running things inside ----------------------------------------------------------

    def run(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.host.run(*cmd, **kw)

    def write(self, path: str, text: str, mode: str = "644") -> None:
        self.host.run("sh", "-c", f"cat > {path} && chmod {mode} {path}", input=text, check=True)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`meshletctl ARGS` as root on this machine (exit code and output as they are)."""
        return self.host.run(CTL, *args, timeout=timeout)

    def ctl_json(self, *args: str, timeout: float = 60) -> Any:
        """`meshletctl ARGS --json`, parsed; fails with the output when it exits non-zero."""
        # --json right after the command: anything after `--` belongs to the container.
        done = self.ctl(args[0], "--json", *args[1:], timeout=timeout)
        if done.returncode != 0:
            why = ""
            if "InternalError" in done.stdout:  # the daemon's side of the story
                why = "\n--- meshletd journal ---\n" + self.journal(lines=40)
            raise AssertionError(
                f"meshletctl {' '.join(args)} on {self.person} exited {done.returncode}: "
                f"{done.stdout}{done.stderr}{why}"
            )
        return json.loads(done.stdout)

    def journal(self, unit: str = UNIT, lines: int = 80) -> str:
        return self.host.run(
            "journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"
        ).stdout

    def replica_units(self) -> list[str]:
        """Active transient replica units on this machine (`meshlet-*`)."""
        out = self.host.run(
            "systemctl", "list-units", "--plain", "--no-legend", "--state=active", "meshlet-*"
        ).stdout
        units = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [u for u in units if u not in NOT_REPLICAS]

    def active_since(self, unit: str) -> float | None:
        """When systemd marked `unit` active, on this machine's `time.monotonic()` clock
        (the hosts share the kernel's CLOCK_MONOTONIC), or None while it is not active."""
        out = self.host.run(
            "systemctl", "show", unit, "-p", "ActiveState,ActiveEnterTimestampMonotonic"
        ).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if props.get("ActiveState") != "active":
            return None
        return int(props["ActiveEnterTimestampMonotonic"]) / 1e6

    def start_daemon(self) -> None:
        self.host.run("systemctl", "reset-failed", UNIT)
        done = self.host.run("systemctl", "start", UNIT, timeout=150)
        if done.returncode != 0:
            raise CommuneError(
                f"meshletd did not start on {self.person} ({self.host.name}): "
                f"{done.stderr}\n{self.journal(lines=40)}"
            )


class Commune:
    """Three meshlets (alice, bob, carol; or `people`) on booted hosts; see the module doc."""

    def __init__(
        self,
        devnet: Any,
        meshlets: dict[str, Meshlet],
        *,
        trace: bool = False,
        packaged_restart: bool = False,
        crash_hook: bool = False,
    ) -> None:
        self.devnet = devnet
        self.meshlets = meshlets
        self.hosts = [m.host for m in meshlets.values()]
        self.trace = trace  # meshletd logs its timing trace (meshletd/trace.py)
        self.packaged_restart = packaged_restart  # keep the unit's own RestartSec=
        self.crash_hook = crash_hook  # MESHLET_DEBUG_CRASH=1: SIGUSR2 crashes meshletd

    def __getitem__(self, person: str) -> Meshlet:
        return self.meshlets[person]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.meshlets.values())

    def by_did(self, meshlet_did: str) -> Meshlet:
        for m in self:
            if m.did == meshlet_did:
                return m
        raise KeyError(meshlet_did)

    @classmethod
    def up(
        cls,
        devnet: Any,
        names: Iterable[str] | None = None,
        *,
        tag: str | None = None,
        contribution: dict[str, int] | None = None,
        scheduling: dict[str, int] | None = None,
        start: bool = True,
        trace: bool = False,
        crash_hook: bool = False,
        nat: Iterable[str] = (),
        people: Sequence[str] = PEOPLE,
        policy: dict[str, str] | None = None,
    ) -> Commune:
        """Accounts for alice, bob and carol (+ meshlets), three booted hosts, meshletd
        installed and (with `start`) started on each. Host names default to
        cm-a/cm-b/cm-c with a per-process suffix (test sessions run side by side). With
        `trace`, each meshletd logs the timing trace benches read (meshletd/trace.py). With
        `crash_hook`, SIGUSR2 makes meshletd crash (MESHLET_DEBUG_CRASH=1, docs/cli.md) and
        the unit keeps its packaged restart delay (restart tests). The people in `nat` have
        their host behind NAT from boot (before meshletd starts), and their meshlet
        publishes no endpoint. `people` names the meshlets' people (default alice, bob and
        carol; more from MORE_PEOPLE, each with one meshlet, all in one cluster). `policy`
        is every meshlet's meshlet.toml [policy]."""
        nat = set(nat)
        people = tuple(people)
        tag = tag or f"{os.getpid()}x{next(_serial)}"
        names = list(names or (f"cm-{c}-{tag}"[:31] for c in "abcdefgh"[: len(people)]))
        contribution = contribution or {"milli_cpu": 1000, "memory_mib": 512, "max_replicas": 8}
        accounts = {}
        for i, person in enumerate(people):
            pds = pds_of(person, i)
            accounts[person] = (
                devnet.create_account(f"{person}-{tag}", pds=pds),
                devnet.create_account(f"{person}-mesh-{tag}", pds=pds),
            )
        remove_stale_hosts()
        build()
        hosts = NspawnHost.boot(*names)
        meshlets: dict[str, Meshlet] = {}
        for person, host in zip(people, hosts, strict=True):
            owner, mesh = accounts[person]
            others = [accounts[p][0].did for p in people if p != person]
            meshlets[person] = Meshlet(
                person,
                host,
                owner,
                mesh,
                XRPC_PORT if (HOSTENV_RUN / host.name / "address").exists() else free_port(),
                others,
                dict(contribution),
                dict(scheduling or {}),
                policy=dict(policy or {}),
                web_port=free_port(),
                nat=person in nat,
            )
        commune = cls(
            devnet, meshlets, trace=trace, packaged_restart=crash_hook, crash_hook=crash_hook
        )
        try:
            for m in commune:
                if m.nat:
                    m.host.behind_nat()
            for m in commune:
                commune.install(m)
            if start:
                for m in commune:
                    m.start_daemon()
        except BaseException:
            commune.down()
            raise
        return commune

    def install(self, m: Meshlet) -> None:
        """The unit, its drop-in, meshlet.toml and the two app passwords on m's host."""
        extra = "" if self.packaged_restart else "RestartSec=1s"
        if self.trace:
            extra += "\nEnvironment=MESHLET_TRACE=1"
        if self.crash_hook:
            extra += "\nEnvironment=MESHLET_DEBUG_CRASH=1"
        install_meshletd_unit(m.host, name="commune.conf", extra=extra)
        m.write("/etc/meshlet/meshlet.toml", m.config(self.devnet))
        m.write("/etc/meshlet/credentials/meshlet-app-password", m.mesh.app_password, "600")
        m.write("/etc/meshlet/credentials/owner-app-password", m.owner.app_password, "600")

    # -- failures -----------------------------------------------------------------------

    def power_off(self, person: str) -> None:
        """Pull the plug on person's host: every process of it killed at once."""
        self[person].host.down(abrupt=True)

    def behind_nat(self, person: str) -> None:
        """Put person's host behind NAT now (outbound only; see NspawnHost.behind_nat)."""
        self[person].host.behind_nat()

    def cut(self, a: str, b: str, *, both: bool = False) -> None:
        """Cut the link from a's host to b's (and back, with `both`)."""
        self[a].host.cut_link(self[b].host, both=both)

    def cut_from_pds(self, person: str) -> None:
        """Cut person's host from its meshlet's PDS only (peers and other PDSes reachable)."""
        m = self[person]
        self[person].host.cut_port(self.devnet.pds_port(self.devnet.pds_index(m.mesh.pds_url)))

    def heal(self, person: str, *faults: str) -> None:
        """Undo faults of person's host (all of them without `faults`)."""
        self[person].host.heal(*faults)

    def stop_pds(self, person: str, seconds: float | None = None) -> None:
        """Stop the PDS of person's meshlet (its data kept); back after `seconds` if given."""
        self.devnet.stop_pds(self.devnet.pds_index(self[person].mesh.pds_url), seconds)

    def start_pds(self, person: str) -> None:
        self.devnet.start_pds(self.devnet.pds_index(self[person].mesh.pds_url))

    def hold_firehose(self, person: str, seconds: float) -> None:
        """The stream of person's meshlet's PDS stalls for `seconds` (connections up, pings
        answered, reads served), then delivers everything held."""
        self.devnet.hold_firehose(self.devnet.pds_index(self[person].mesh.pds_url), seconds)

    def kill_firehoses(self) -> int:
        """Close every firehose connection of every PDS (subscribers reconnect)."""
        return int(self.devnet.kill_firehose())

    def power_on(self, person: str) -> None:
        """Boot person's host again and start meshletd with the same identity and port.

        dev/hostenv gives a powered-off host a fresh disk: meshletd's state directory and
        any replica unit are gone, so this is "the machine came back, reinstalled"."""
        m = self[person]
        try:
            m.host.up()
        except HostEnvError as e:
            # The shared base rootfs or venv was being refreshed (a dependency changed):
            # build it (idempotent, waits for a concurrent build) and boot again.
            if "not built" not in str(e):
                raise
            build()
            m.host.up()
        if m.nat:
            m.host.behind_nat()
        self.install(m)
        m.start_daemon()

    def _freezer(self, person: str) -> Path:
        name = self[person].host.name
        for root in (Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup")):
            cg = root / "meshlet-hostenv" / name
            if (cg / "freezer.state").exists() or (cg / "cgroup.freeze").exists():
                return cg
        raise CommuneError(f"no freezer cgroup for host {name} (need cgroup v1 freezer or v2)")

    def freeze(self, person: str) -> None:
        """Freeze every process of person's host (a hung or cut-off machine): its replicas
        survive, frozen, and run on when it is thawed — the stale replicas fencing is for."""
        cg = self._freezer(person)
        if (cg / "freezer.state").exists():
            (cg / "freezer.state").write_text("FROZEN\n")
        else:
            (cg / "cgroup.freeze").write_text("1\n")

    def thaw(self, person: str) -> None:
        cg = self._freezer(person)
        if (cg / "freezer.state").exists():
            (cg / "freezer.state").write_text("THAWED\n")
        else:
            (cg / "cgroup.freeze").write_text("0\n")

    def is_up(self, person: str) -> bool:
        return (HOSTENV_RUN / self[person].host.name / "leader.pid").exists()

    # -- views --------------------------------------------------------------------------

    def placement(self, person: str, workload_uri: str) -> dict[int, str] | None:
        """slot -> meshlet DID of the replicas `person`'s meshletd reports running."""
        for w in self[person].ctl_json("workloads", "--all"):
            if w["uri"] == workload_uri:
                return {
                    int(r["slot"]): r["meshletDid"]
                    for r in w.get("running", [])
                    if r.get("state") == "running" and r.get("meshletDid")
                }
        return None

    def placements(self, workload_uri: str, people: Iterable[str] = PEOPLE) -> dict[str, Any]:
        return {p: self.placement(p, workload_uri) for p in people}

    # -- teardown -----------------------------------------------------------------------

    def story(self, since_wall: float, uri: str, skip: Iterable[str] = ()) -> str:
        """What each meshletd (but those in `skip`) logged about a workload and its peers
        since `since_wall` (epoch seconds), times relative to it: the rounds, bids, probes
        and leases behind a failover that was slow, or a slot that moved."""
        out = []
        rkey = uri.rsplit("/", 1)[-1]
        keep = ("suspect", "probe", "round", "bid", "heard", "starting", "member", "lease")
        for m in self:
            if m.person in skip or not self.is_up(m.person):
                continue
            text = m.host.run(
                "journalctl", "-u", UNIT, "--since", f"@{int(since_wall) - 1}",
                "--no-pager", "-o", "short-unix",
            ).stdout  # fmt: skip
            for line in text.splitlines():
                stamp, _, rest = line.partition(" ")
                try:
                    at = float(stamp) - since_wall
                except ValueError:
                    continue
                if rkey in rest or any(k in rest for k in keep):
                    out.append((at, f"{at:7.2f} {m.person}: {rest.split(': ', 1)[-1][:220]}"))
        return "\n".join(line for _, line in sorted(out))

    def down(self) -> None:
        """Stop meshletd and every replica unit, power the hosts off. Leaves nothing."""
        for m in self:
            if not self.is_up(m.person):
                continue
            try:
                self.thaw(m.person)
            except (CommuneError, OSError):
                pass
            try:
                m.run("systemctl", "stop", UNIT, timeout=60)
                m.run("sh", "-c", "systemctl stop 'meshlet-*' 2>/dev/null; true", timeout=60)
            except subprocess.TimeoutExpired:
                pass
        NspawnHost.shutdown(*[m.host for m in self if self.is_up(m.person)])
        for m in self:
            m.host._up = False


@contextlib.contextmanager
def booted(devnet: Any, **kw: Any) -> Iterator[Commune]:
    """`Commune.up(devnet, **kw)` for the tests of one module, down at the end (a test
    module's `commune` fixture)."""
    if not nspawn_available():
        import pytest

        pytest.fail("the commune needs root and systemd-nspawn (dev/test installs it)", False)
    c = Commune.up(devnet, **kw)
    try:
        yield c
    finally:
        c.down()


def wait_formed(commune: Commune, timeout: float = 90) -> Commune:
    """Until every meshlet lists every other one as a verified member."""
    for m in commune:
        others = sum(1 for o in commune if o is not m)

        def verified(m: Meshlet = m, others: int = others) -> bool | None:
            return sum(1 for r in m.ctl_json("members") if r["verified"]) == others or None

        wait_for(verified, timeout, f"{m.person}'s meshletd to verify the other {others}")
    return commune


class commune_session:
    """`with commune_session() as (devnet, commune):` — a local atproto network and a
    commune on it, both gone at the end (for dev/benches and demos outside pytest)."""

    def __init__(self, **commune_kw: Any) -> None:
        self._kw = commune_kw
        self.devnet: Any = None
        self.network: Any = None
        self.commune: Commune | None = None

    def __enter__(self) -> tuple[Any, Commune]:
        import signal
        import sys

        sys.path.insert(0, str(ROOT / "dev" / "lib"))
        from devnet import Devnet

        # SIGTERM (a CI timeout, `kill`) tears down like Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        remove_stale_hosts()
        self.network = Network.up()
        try:
            self.devnet = Devnet.up(host=self.network.gateway)
            try:
                self.commune = Commune.up(self.devnet, **self._kw)
            except BaseException:
                self.devnet.down()
                raise
        except BaseException:
            self.network.down()
            raise
        return self.devnet, self.commune

    def __exit__(self, *exc: object) -> None:
        try:
            if self.commune is not None:
                self.commune.down()
        finally:
            try:
                self.devnet.down()
            finally:
                self.network.down()
