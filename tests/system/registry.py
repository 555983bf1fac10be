"""A real OCI registry for system tests: Debian's `docker-registry` (the reference
distribution registry), on the address booted hosts reach (their network's gateway) or
loopback, holding images a booted host builds (`podman build` from localhost/busybox, no
network) and pushes.

`LocalRegistry.start(address)` runs two registries, `open` (anyone pulls) and `private`
(htpasswd basic auth, user `alice`), plus `slow`: a proxy in front of `open` that passes
its answers at a trickle, so a pull can run out of time against the real registry. Hosts
reach them over plain HTTP only because `configure_host` marks exactly these addresses
`insecure = true` in a registries.conf drop-in, as a podman user would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

PRIVATE_USER, PRIVATE_PASSWORD = "alice", "s3cret-registry-pw"
DROP_IN = "/etc/containers/registries.conf.d/50-meshlet-test-registry.conf"


class Host(Protocol):
    """A booted host (hostenv's NspawnHost or LocalHost): runs a command in it."""

    def run(
        self,
        *cmd: str,
        user: str | None = ...,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        check: bool = ...,
        timeout: float | None = ...,
        input: str | None = ...,
    ) -> subprocess.CompletedProcess[str]: ...


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _config(root: Path, addr: str, auth: Path | None) -> str:
    lines = [
        "version: 0.1",
        "log: {level: warn}",
        f"storage: {{filesystem: {{rootdirectory: {root}}}, delete: {{enabled: true}}}}",
        f"http: {{addr: '{addr}', secret: meshlet-test}}",
    ]
    if auth is not None:
        lines.append(f"auth: {{htpasswd: {{realm: meshlet-test, path: {auth}}}}}")
    return "\n".join(lines) + "\n"


class SlowProxy:
    """TCP proxy: requests pass at once, answers at `rate` bytes a second (a slow link)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rate: int) -> None:
        self.target, self.rate = target, rate
        self.sock = socket.create_server(listen)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, self.rate), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        chunk = max(1, rate // 10) if rate else 65536
        try:
            while not self._stop.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@dataclass
class LocalRegistry:
    """Registries on `address`: `open`, `private` (basic auth) and `slow` (open, trickled)."""

    address: str
    open: str  # host:port
    private: str
    slow: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy: SlowProxy | None = None

    @classmethod
    def start(cls, address: str, *, slow_rate: int = 64 * 1024) -> LocalRegistry:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RuntimeError("docker-registry is not installed (dev/test installs it)")
        work = Path(tempfile.mkdtemp(prefix="meshlet-registry-"))
        htpasswd = work / "htpasswd"
        line = subprocess.run(
            ["htpasswd", "-nbB", PRIVATE_USER, PRIVATE_PASSWORD],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        htpasswd.write_text(line + "\n")
        ports = [free_port(address) for _ in range(3)]
        reg = cls(
            address,
            f"{address}:{ports[0]}",
            f"{address}:{ports[1]}",
            f"{address}:{ports[2]}",
            work,
        )
        for name, addr, auth in (("open", reg.open, None), ("private", reg.private, htpasswd)):
            conf = work / f"{name}.yml"
            conf.write_text(_config(work / name, addr, auth))
            log = open(work / f"{name}.log", "wb")
            reg.procs.append(
                subprocess.Popen([exe, "serve", str(conf)], stdout=log, stderr=subprocess.STDOUT)
            )
        reg.proxy = SlowProxy((address, ports[2]), (address, ports[0]), slow_rate)
        for addr in (reg.open, reg.private):
            reg._wait(addr)
        return reg

    def _wait(self, addr: str, timeout: float = 15) -> None:
        host, port = addr.rsplit(":", 1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"registry on {addr} did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-1500:] for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- on a booted host -------------------------------------------------------------------

    def configure_host(self, host: Host) -> None:
        """Mark this run's registries (and only them) insecure in the host's podman config."""
        text = "".join(
            f'[[registry]]\nlocation = "{addr}"\ninsecure = true\n\n'
            for addr in (self.open, self.private, self.slow)
        )
        host.run("mkdir", "-p", "/etc/containers/registries.conf.d", check=True)
        host.run("tee", DROP_IN, input=text, check=True)

    def build_and_push(
        self, host: Host, ref: str, marker: str, *, extra_mib: int = 0, private: bool = False
    ) -> None:
        """Build `ref` FROM localhost/busybox with /marker holding `marker` (and `extra_mib`
        of random bytes in a layer of its own) as user meshlet, push it, drop the local copy."""
        script = f"""set -e
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
printf '%s\\n' '{marker}' > "$d/marker"
printf 'FROM localhost/busybox:latest\\nCOPY marker /marker\\n' > "$d/Containerfile"
if [ {extra_mib} -gt 0 ]; then
  head -c {extra_mib}M /dev/urandom > "$d/blob"
  printf 'COPY blob /blob\\n' >> "$d/Containerfile"
fi
podman build -q --network=none -t '{ref}' "$d" >/dev/null
podman push -q {"--authfile /dev/stdin" if private else ""} '{ref}'
podman rmi -f '{ref}' >/dev/null
"""
        env = {"HOME": "/home/meshlet", "XDG_RUNTIME_DIR": "/run/user/1000"}
        auth = self.auth_json() if private else None
        if private:
            # the auth file goes through a file only root and meshlet read, removed after
            path = "/run/meshlet-test-push-auth.json"
            host.run("install", "-m", "600", "-o", "meshlet", "/dev/stdin", path, input=auth)
            script = script.replace("--authfile /dev/stdin", f"--authfile {path}")
        done = host.run(
            "sh", "-c", script, user="meshlet", env=env, cwd="/home/meshlet", timeout=300
        )
        if private:
            host.run("rm", "-f", "/run/meshlet-test-push-auth.json")
        if done.returncode != 0:
            raise RuntimeError(f"build/push of {ref} failed: {done.stdout}\n{done.stderr}")

    def auth_json(self) -> str:
        import base64
        import json

        token = base64.b64encode(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}".encode()).decode()
        return json.dumps({"auths": {self.private: {"auth": token}}})
