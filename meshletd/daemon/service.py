"""The daemon's life: start the transports, tell systemd, serve, reload, stop.

Order matters for `Type=notify`: READY=1 is sent only once the control socket listens
(so `systemctl start meshletd && meshletctl status` works) and the node has loaded its
view. SIGTERM/SIGINT stop the daemon without stopping replicas (they are adopted on the
next start); SIGHUP reloads the configuration (RELOADING=1 … READY=1).
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from meshletd import config as config_mod
from meshletd.atproto.lexicon import default_lexicons
from meshletd.config import Config, Credentials
from meshletd.daemon import methods
from meshletd.daemon.fake_node import InMemoryNode
from meshletd.daemon.node import Node
from meshletd.daemon.stored import Store
from meshletd.errors import ConfigError
from meshletd.notify import (
    Notifier,
    SdNotifier,
    inherited_fds,
    run_watchdog,
    watchdog_interval,
)
from meshletd.store import StateStore
from meshletd.xrpc.app import XrpcApp
from meshletd.xrpc.auth import IdentityKeys, ServiceAuthVerifier, SigningKeyResolver
from meshletd.xrpc.http import serve_tcp, serve_unix

log = logging.getLogger("meshletd")
XRPC_FDNAME = "xrpc"  # our name for the XRPC listener in systemd's file descriptor store


class Lifecycle(Notifier, Protocol):
    """What the daemon tells its service manager (`SdNotifier`, `RecordingNotifier`)."""

    def ready(self, status: str | None = None) -> None: ...
    def status(self, text: str) -> None: ...
    def stopping(self, status: str | None = None) -> None: ...
    def reloading(self) -> None: ...


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def capacity_of(cfg: Config) -> dict[str, int]:
    return {
        "milliCpu": cfg.contribution.milli_cpu,
        "memoryMiB": cfg.contribution.memory_mib,
        "storageMiB": cfg.contribution.storage_mib,
    }


def default_node(cfg: Config, credentials: Credentials, store: Store) -> Node:
    if cfg.backend == "atproto":
        # Lazy: the atproto layer, the scheduler core and the runtime are megabytes of
        # resident modules that `backend = "memory"` never uses (dev/bench footprint).
        from meshletd.daemon.atproto_node import AtprotoNode

        return AtprotoNode(cfg, credentials, store)
    return InMemoryNode(
        cfg.did,
        cfg.owner,
        members=cfg.members,
        capacity=capacity_of(cfg),
        clusters={c.name: list(c.members) for c in cfg.clusters},
    )


class Daemon:
    """One running meshletd. Build it, then `await run()` (or `nursery.start(d.run)`)."""

    def __init__(
        self,
        cfg: Config,
        credentials: Credentials | None = None,
        *,
        config_path: Path | None = None,
        node: Node | None = None,
        notifier: Lifecycle | None = None,
        key_resolver: SigningKeyResolver | None = None,
        environ: dict[str, str] | None = None,
        handle_signals: bool = True,
        store: Store | None = None,
    ) -> None:
        self.cfg = cfg
        self.credentials = credentials or Credentials()
        self.config_path = config_path
        env = dict(os.environ if environ is None else environ)
        self.environ = env
        self.notifier: Lifecycle = notifier if notifier is not None else SdNotifier()
        self.watchdog_interval = watchdog_interval(env)
        self.handle_signals = handle_signals
        self.store: Store = store if store is not None else StateStore(cfg.state_dir)
        self.node: Node = node or default_node(cfg, self.credentials, self.store)
        if key_resolver is None:
            key_resolver = IdentityKeys(cfg.plc_url)
        # Issuers that are not members of our clusters are refused before any resolution.
        self.verifier = ServiceAuthVerifier(cfg.did, key_resolver, is_known=self.node.is_member)
        self.app = self._build_app()
        self.tcp_address: tuple[str, int] | None = None
        self.web_address: tuple[str, int] | None = None
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.stop_replicas_on_exit = False

    def _build_app(self) -> XrpcApp:
        admin = _gid(self.cfg.control.admin_group)
        reader = _gid(self.cfg.control.group)
        app = XrpcApp(
            lexicons=default_lexicons(),
            verifier=self.verifier,
            is_member=self.node.is_member,
            owner_did=self.cfg.owner,
            admin_gids=frozenset({admin} if admin is not None else ()),
            reader_gids=frozenset({reader} if reader is not None else ()),
        )
        methods.install(
            app,
            self.node,
            on_shutdown=self._shutdown_requested,
            default_cluster=lambda: self.cfg.clusters[0].name if self.cfg.clusters else "default",
            default_bid_window_ms=lambda: self.cfg.scheduling.bid_window_ms,
        )
        return app

    def request_stop(self, stop_replicas: bool = False) -> None:
        self.stop_replicas_on_exit = stop_replicas
        self._stop.set()

    def _shutdown_requested(self, stop_replicas: bool) -> None:
        # Called from a request handler: let its response go out before the servers stop.
        self.stop_replicas_on_exit = stop_replicas

        async def later() -> None:
            await trio.sleep(0.2)
            self._stop.set()

        if self._nursery is not None:
            self._nursery.start_soon(later)
        else:
            self._stop.set()

    def _status(self) -> str:
        return self.node.status_line()

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        log.info(
            "starting: meshlet %s owned by %s, %d member(s)",
            cfg.did,
            cfg.owner,
            len(cfg.members),
        )
        self.notifier.status("starting")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.handle_signals:
                await nursery.start(self._signals)
            await nursery.start(
                serve_unix,
                self.app.unix_handler,
                cfg.listen.control_socket,
            )
            # Group after bind: serve_unix sets mode; chown here where we know the config.
            self._chgrp_socket()
            kept = self._kept_listeners()
            listeners = await nursery.start(
                partial(serve_tcp, sockets=kept),
                self.app.tcp_handler,
                cfg.listen.xrpc_host,
                cfg.listen.xrpc_port,
            )
            if not kept:
                self._keep_listeners(listeners)
            if cfg.web.enabled:
                await self._start_web(nursery)
            run_node = getattr(self.node, "run", None)
            if run_node is not None:
                self.notifier.status("loading the cluster view")
                await nursery.start(run_node)
            sockname = listeners[0].socket.getsockname()
            self.tcp_address = (sockname[0], sockname[1])
            log.info(
                "listening: xrpc on %s:%d, control on %s",
                *self.tcp_address,
                cfg.listen.control_socket,
            )
            if self.watchdog_interval:
                nursery.start_soon(run_watchdog, self.notifier, self.watchdog_interval)
            self.notifier.ready(self._status())
            log.info("ready: %s", self._status())
            nursery.start_soon(self._status_loop)
            task_status.started(self)
            await self._stop.wait()
            log.info("stopping (replicas keep running; they are adopted on the next start)")
            self.notifier.stopping("stopping")
            nursery.cancel_scope.cancel()
        self._nursery = None
        self.notifier.status("stopped")

    def _kept_listeners(self) -> list[socket.socket]:
        """The XRPC listening sockets systemd kept for us across a restart (its file
        descriptor store), if they are bound where the configuration says. Peers' probes
        that arrive while meshletd restarts then wait in the socket's backlog instead of
        being refused, so a restart does not look like a lost host (docs/protocol.md,
        section 13)."""
        fds = inherited_fds(self.environ).get(XRPC_FDNAME, [])
        socks = [socket.socket(fileno=fd) for fd in fds]
        want = (self.cfg.listen.xrpc_host, self.cfg.listen.xrpc_port)
        usable = bool(socks) and all(
            s.type == socket.SOCK_STREAM
            and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            and s.getsockname()[:2] == want
            for s in socks
        )
        if socks and not usable:
            log.info("the kept XRPC socket is not bound to %s:%d: binding anew", *want)
            remove = getattr(self.notifier, "remove_fds", None)
            if remove is not None:
                remove(XRPC_FDNAME)
            for s in socks:
                s.close()
            return []
        if socks:
            log.info("listening on the XRPC socket kept across the restart")
        return socks

    def _keep_listeners(self, listeners: list[trio.SocketListener]) -> None:
        store = getattr(self.notifier, "store_fds", None)
        if store is None or self.cfg.listen.xrpc_port == 0:
            return
        store(XRPC_FDNAME, [ln.socket.fileno() for ln in listeners])

    async def _start_web(self, nursery: trio.Nursery) -> None:
        """The read-only page and /metrics on `[web] listen`. An aid, not the meshlet's job:
        if its address cannot be bound the daemon says so and goes on without it."""
        from meshletd.web.app import WEB_LIMITS, WebApp
        from meshletd.xrpc.http import serve_asgi_tcp

        web = WebApp(self.node)
        try:
            listeners = await nursery.start(
                functools.partial(
                    serve_asgi_tcp,
                    web,
                    self.cfg.web.host,
                    self.cfg.web.port,
                    transport="web",
                    limits=WEB_LIMITS,
                )
            )
        except OSError as e:
            log.error("web page not served: cannot listen on %s: %s", self.cfg.web.listen, e)
            return
        nursery.start_soon(web.run)
        name = listeners[0].socket.getsockname()
        self.web_address = (name[0], name[1])
        log.info("web page on http://%s:%d/", *self.web_address)

    def _chgrp_socket(self) -> None:
        gid = _gid(self.cfg.control.group)
        if gid is None:
            log.warning(
                "group %r does not exist: the control socket is usable by root only",
                self.cfg.control.group,
            )
            return
        try:
            # Under the packaged unit (Group=meshlet, no capabilities, no chown syscalls)
            # the socket is born with the group: nothing to change.
            if os.stat(self.cfg.listen.control_socket).st_gid != gid:
                os.chown(self.cfg.listen.control_socket, -1, gid)
        except OSError as e:
            log.warning("cannot give the control socket to group %s: %s", self.cfg.control.group, e)

    async def _status_loop(self) -> None:
        last = None
        while True:
            line = self._status()
            if line != last:
                self.notifier.status(line)
                last = line
            await trio.sleep(5)

    async def _signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        wanted = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        # A test hook, off unless the unit's environment sets it: SIGUSR2 makes the daemon
        # crash with an exception, as a bug would (the restart tests need a real crash).
        crash_hook = self.environ.get("MESHLET_DEBUG_CRASH") == "1"
        if crash_hook:
            wanted.append(signal.SIGUSR2)
        with trio.open_signal_receiver(*wanted) as sigs:
            task_status.started()
            async for signum in sigs:
                if signum == signal.SIGUSR2 and crash_hook:
                    raise RuntimeError("crash requested with SIGUSR2 (MESHLET_DEBUG_CRASH=1)")
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.request_stop()

    async def reload(self) -> None:
        """Re-read the config file; apply what can change live, keep the rest."""
        self.notifier.reloading()
        log.info("reloading configuration from %s", self.config_path)
        try:
            if self.config_path is None:
                raise ConfigError("no configuration file to reload")
            new = config_mod.load(self.config_path)
            if (new.did, new.owner) != (self.cfg.did, self.cfg.owner):
                raise ConfigError(f"{self.config_path}: did/owner cannot change on reload")
            if new.listen != self.cfg.listen:
                log.warning("listen addresses changed: they apply at the next restart")
            await self.node.reconfigure(new)
            self.cfg = new.model_copy(update={"listen": self.cfg.listen})
            self.app.owner_did = self.cfg.owner
            log.info("configuration reloaded: %d member(s)", len(self.cfg.members))
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e.message)
        except Exception as e:  # e.g. the PDS unreachable: a reload never ends the daemon
            log.error("reload incomplete, the daemon runs on: %s", e)
        self.notifier.ready(self._status())
