"""Hostile workload records written straight to a PDS against a running commune of three
meshletd processes (issue #15, points 1, 2 and 6, end to end on the reference PDS/PLC).

At db8aa19 the deeply nested records left every meshletd restarting in a loop, the specs
podman refuses were bid on and placed, and a workload created decades ago ran on all three
meshlets at once. Here: every meshletd keeps running (same process, never exited), no slot
runs on two meshlets, and each invalid record is listed to its owner with field and reason.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.hostile_records import WORKLOAD, ancient, hostile
from tests.hostile_records import put_record as write_record

_n = itertools.count()

CONFIG = """
did = "{did}"
owner = "{owner}"
pds = "{pds}"
plc_url = "{plc}"
state_dir = "{base}/state"
backend = "atproto"
runtime = "fake"
[[clusters]]
name = "home"
members = {members}
[listen]
xrpc = "127.0.0.1:0"
control_socket = "{base}/control.sock"
"""


HOSTILE = hostile()
ANCIENT = ancient()


class Meshletd:
    def __init__(self, base: Path, owner, mesh, members: list[str], plc: str) -> None:
        self.base, self.owner, self.mesh = base, owner, mesh
        base.mkdir(parents=True)
        cfg = base / "meshlet.toml"
        cfg.write_text(
            CONFIG.format(
                did=mesh.did,
                owner=owner.did,
                pds=mesh.pds_url,
                plc=plc,
                base=base,
                members="[" + ", ".join(f'"{m}"' for m in members) + "]",
            )
        )
        creds = base / "credentials.toml"
        creds.write_text(
            f'meshlet-app-password = "{mesh.app_password}"\n'
            f'owner-app-password = "{owner.app_password}"\n'
        )
        os.chmod(creds, 0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env["MESHLET_CREDENTIALS"] = str(creds)
        self.log = base / "meshletd.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshletd", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
            env=env,
        )
        self.ctl = httpx.AsyncClient(
            base_url="http://localhost/xrpc",
            transport=httpx.AsyncHTTPTransport(uds=str(base / "control.sock")),
            timeout=10,
        )

    async def get(self, nsid: str, **params) -> dict:
        r = await self.ctl.get(f"/{nsid}", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def stop(self) -> None:
        await self.ctl.aclose()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def put_record(account, collection: str, rkey: str, value: dict) -> None:
    await trio.to_thread.run_sync(write_record, account, collection, rkey, value)


async def until(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not await predicate():
            await trio.sleep(0.5)
        return
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(HOSTILE, id="points-2-and-6"),
        pytest.param(ANCIENT, id="point-1"),
    ],
)
async def test_hostile_records_leave_every_meshletd_running_and_are_shown_to_their_owner(
    devnet, tmp_path: Path, records: dict
) -> None:
    k = next(_n)
    people = []
    for i in range(3):
        owner = await devnet.create_account_async(f"hso{i}x{k}", pds=i % 2)
        mesh = await devnet.create_account_async(f"hsm{i}x{k}", pds=i % 2)
        people.append((owner, mesh))
    owners = [o.did for o, _ in people]
    nodes = [
        Meshletd(tmp_path / f"m{i}", o, m, [d for d in owners if d != o.did], devnet.plc_url)
        for i, (o, m) in enumerate(people)
    ]
    try:
        for node in nodes:
            with trio.fail_after(60):
                while not (node.base / "control.sock").exists():
                    assert node.alive(), node.log.read_text()[-3000:]
                    await trio.sleep(0.2)
        pids = [n.proc.pid for n in nodes]

        async def formed() -> bool:
            for n in nodes:
                members = (await n.get("farm.meshlet.ctl.listMembers"))["members"]
                if sum(len(m.get("meshletDids", [])) for m in members if m["verified"]) < 2:
                    return False
            return True

        await until(formed, 90, "the commune to form")

        alice = people[0][0]
        for rkey, (value, _) in records.items():
            await put_record(alice, WORKLOAD, rkey, value)

        async def fine_runs() -> bool:
            total = 0
            for n in nodes:
                total += (await n.get("farm.meshlet.ctl.getStatus"))["replicas"]
            return total >= 1

        await until(fine_runs, 60, "the valid workload to run")
        await trio.sleep(15)  # long enough for a crash loop or a double start to show

        # 1. every meshletd still runs, in the process it started in
        for n in nodes:
            assert n.alive(), n.log.read_text()[-3000:]
        assert [n.proc.pid for n in nodes] == pids
        for n in nodes:
            log = n.log.read_text()
            assert "RecursionError" not in log and "Traceback" not in log, log[-3000:]

        # 2. no slot on two meshlets: each valid 1-replica workload runs once at most
        valid = [rkey for rkey, (_, field) in records.items() if field is None]
        local = [(await n.get("farm.meshlet.ctl.getStatus"))["replicas"] for n in nodes]
        assert 1 <= sum(local) <= len(valid), local
        for rkey in valid:
            uri = f"at://{alice.did}/{WORKLOAD}/{rkey}"
            st = await nodes[0].get("farm.meshlet.getWorkloadStatus", uri=uri)
            runners = {r.get("meshletDid") for r in st["replicas"] if r["state"] == "running"}
            assert len(runners) <= 1, (rkey, st)

        # 3. each invalid record is listed to its owner with the field and the reason
        async def all_listed() -> bool:
            got = await nodes[0].get("farm.meshlet.listWorkloads", owner=alice.did)
            return len(got.get("invalid", [])) >= len(records) - len(valid)

        await until(all_listed, 30, "every invalid record to be listed")
        got = await nodes[0].get("farm.meshlet.listWorkloads", owner=alice.did)
        invalid = {i["uri"].rsplit("/", 1)[1]: i["problem"] for i in got.get("invalid", [])}
        for rkey, (_, field) in records.items():
            if field is None:
                assert rkey not in invalid
                continue
            assert rkey in invalid, (rkey, sorted(invalid))
            assert invalid[rkey]["field"].startswith(field), (rkey, invalid[rkey])
            assert invalid[rkey]["reason"]
        listed = {w["uri"].rsplit("/", 1)[1] for w in got["workloads"]}
        assert "fine" in listed
    finally:
        for n in nodes:
            await n.stop()
