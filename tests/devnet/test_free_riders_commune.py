"""The free-rider rule between three real meshletd daemons on the reference PDS (issue #16,
docs/protocol.md section 23): alice's meshlet sets minContribution mode "refuse"; bob used
2 CPU-hours of carol's machine and lent nothing (a free rider), carol lent them (a
contributor). alice's meshlet never bids for bob's workload, and carol's is placed on it.

The history is one usage record in carol's meshlet repo, written as carol's meshletd writes
them (the daemons would need two hours of running to write it themselves); everything else
(records, firehose, rounds, balance) is real. The daemons run the in-memory fake runtime."""

from __future__ import annotations

import itertools
from pathlib import Path

import trio

from meshletd.atproto.records import now_datetime
from meshletd.core.records import format_datetime_ms, parse_datetime_ms
from meshletd.policy_settings import MinContributionSettings, PolicySettings
from tests.devnet.daemons import Host, start_host, wait_until
from tests.hostile_records import put_record

_n = itertools.count()
HOUR = 3_600_000


async def test_a_refusing_host_never_bids_for_a_free_rider_and_serves_a_contributor(
    devnet, tmp_path: Path, nursery: trio.Nursery
) -> None:
    k = next(_n)
    people = {}
    for name, pds in (("al", 0), ("bo", 1), ("ca", 0)):
        owner = await devnet.create_account_async(f"fr{name}{k}", pds=pds)
        mesh = await devnet.create_account_async(f"fr{name}m{k}", pds=pds)
        people[name] = (owner, mesh)
    dids = {n: p[0].did for n, p in people.items()}
    refuse = PolicySettings(
        min_contribution=MinContributionSettings(ratio_permille=500, period_days=7, mode="refuse")
    )
    hosts: dict[str, Host] = {}
    for name, (owner, mesh) in people.items():
        (tmp_path / name).mkdir()
        others = [d for n, d in dids.items() if n != name]
        hosts[name] = await start_host(
            nursery,
            tmp_path / name,
            owner,
            mesh,
            others,
            devnet.plc_url,
            refuse if name == "al" else None,
        )
    alice, bob, carol = hosts["al"], hosts["bo"], hosts["ca"]
    try:

        async def verified() -> bool:
            for h in hosts.values():
                got = (await h.ctl.get("/farm.meshlet.ctl.listMembers")).json()["members"]
                if len(got) < 2 or not all(m["verified"] for m in got):
                    return False
            return True

        await wait_until(verified, 60)
        # bob used 2 CPU-hours on carol's machine in a three-hour period that ended before
        # the current hour (carol's 1000 milli-CPU could serve 3 CPU-hours in it)
        now = parse_datetime_ms(now_datetime())
        end = now - now % HOUR - 60_000
        usage = {
            "$type": "commune.scheduler.usage",
            "periodStart": format_datetime_ms(end - 3 * HOUR),
            "periodEnd": format_datetime_ms(end),
            "entries": [
                {"ownerDid": bob.owner, "milliCpuSeconds": 7_200_000, "memoryMiBSeconds": 0}
            ],
            "createdAt": format_datetime_ms(end),
        }
        await trio.to_thread.run_sync(
            put_record, people["ca"][1], "commune.scheduler.usage", f"u{end - 3 * HOUR}", usage
        )

        async def bob_below() -> bool:
            got = (await alice.ctl.get("/farm.meshlet.ctl.getBalance")).json()
            rows = {o["ownerDid"]: o for o in got["owners"]}
            b, c = rows.get(bob.owner, {}), rows.get(carol.owner, {})
            return b.get("served") == "refused" and c.get("standing") == "contributor"

        await wait_until(bob_below, 60)
        # Both workloads avoid bob's and carol's meshlets: only alice's may host them.
        avoid = {"avoidMeshlets": [bob.did, carol.did]}
        rider = await bob.run("rider", constraints=avoid)
        lender = await carol.run("lender", constraints=avoid)

        async def lender_on_alice() -> bool:
            return (lender, 0) in alice.running()

        await wait_until(lender_on_alice, 60)
        await trio.sleep(8)  # past the rider's round 0 and two chained rounds
        assert (rider, 0) not in alice.running()
        assert all(b["slots"] == 0 for b in await alice.bids_for(rider))  # never an offer
        assert any(b["slots"] >= 1 for b in await alice.bids_for(lender))
    finally:
        for h in hosts.values():
            await h.ctl.aclose()
            h.daemon.request_stop()
