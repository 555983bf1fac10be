"""meshletd daemons of the devnet, run in this process on the in-memory fake runtime
(records, firehose, rounds and the control socket are real), shared by the devnet tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from pydantic import SecretStr

from meshletd.config import Cluster, Config, Contribution, Control, Credentials, Listen
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.policy_settings import PolicySettings
from meshletd.xrpc.testing import check_output_against_lexicon

BID = "commune.scheduler.bid"


def fake_runtime_config(tmp: Path, owner: Any, mesh: Any, plc_url: str, **fields: Any) -> Config:
    """The configuration of `owner`'s meshlet `mesh` (devnet accounts), its socket and
    state below `tmp`, on the fake runtime; `fields` add to or replace the rest."""
    base: dict[str, Any] = {
        "did": mesh.did,
        "owner": owner.did,
        "pds": mesh.pds_url,
        "plc_url": plc_url,
        "clusters": [Cluster(name="home", members=[])],
        "listen": Listen(xrpc="127.0.0.1:0", control_socket=tmp / "control.sock"),
        "control": Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        "state_dir": tmp / "state",
        "runtime": "fake",
    }
    return Config(**{**base, **fields})


async def start_daemon(
    nursery: trio.Nursery, cfg: Config, owner: Any, mesh: Any
) -> tuple[Daemon, httpx.AsyncClient]:
    """Start meshletd with both app passwords; its control client (answers checked
    against the lexicons)."""
    creds = Credentials(
        meshlet_app_password=SecretStr(mesh.app_password),
        owner_app_password=SecretStr(owner.app_password),
    )
    daemon = Daemon(cfg, creds, notifier=RecordingNotifier(), handle_signals=False, environ={})
    with trio.fail_after(60):
        await nursery.start(daemon.run)
    ctl = httpx.AsyncClient(
        base_url="http://localhost/xrpc",
        transport=httpx.AsyncHTTPTransport(uds=str(cfg.listen.control_socket)),
        event_hooks={"response": [check_output_against_lexicon]},
    )
    return daemon, ctl


@dataclass
class Host:
    daemon: Daemon
    did: str  # the meshlet
    owner: str
    pds: str
    ctl: httpx.AsyncClient

    def running(self) -> set[tuple[str, int]]:
        engine = self.daemon.node.engine  # type: ignore[attr-defined]
        if engine is None:
            return set()
        return {k for k, st in engine.scheduler.replicas().items() if st == "running"}

    async def run(self, name: str, **extra: Any) -> str:
        record = {
            "name": name,
            "image": "localhost/busybox:latest",
            "args": ["sleep", "600"],
            "resources": {"milliCpu": 100, "memoryMiB": 32},
            "replicas": 1,
            "kind": "service",
            "bidWindowMs": 1500,
            **extra,
        }
        r = await self.ctl.post("/farm.meshlet.ctl.createWorkload", json={"record": record})
        assert r.status_code == 200, r.text
        return str(r.json()["uri"])

    async def set_policy(self, key: str, value: str) -> None:
        r = await self.ctl.post("/farm.meshlet.ctl.setPolicy", json={"key": key, "value": value})
        assert r.status_code == 200, r.text

    async def bids_for(self, uri: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            got = await http.get(
                f"{self.pds}/xrpc/com.atproto.repo.listRecords",
                params={"repo": self.did, "collection": BID, "limit": 100},
            )
        return [r["value"] for r in got.json()["records"] if r["value"]["workload"]["uri"] == uri]


async def start_host(
    nursery: trio.Nursery,
    tmp: Path,
    owner: Any,
    mesh: Any,
    members: list[str],
    plc_url: str,
    policy: PolicySettings | None,
) -> Host:
    """A meshletd of `owner` on `mesh` lending 1000 milli-CPU and 1 GiB, consenting to
    `members`, with `policy` as its meshlet.toml [policy]."""
    cfg = fake_runtime_config(
        tmp,
        owner,
        mesh,
        plc_url,
        clusters=[Cluster(name="home", members=members)],
        contribution=Contribution(milli_cpu=1000, memory_mib=1024),
        policy=policy,
    )
    daemon, ctl = await start_daemon(nursery, cfg, owner, mesh)
    return Host(daemon, mesh.did, owner.did, mesh.pds_url, ctl)


async def wait_until(predicate, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.1)
