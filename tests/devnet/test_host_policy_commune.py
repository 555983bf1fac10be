"""Host policies between two real meshletd daemons on the reference PDS (issue #16, docs/
protocol.md section 21): a refused image source is never bid on, a lending window, an
eviction that moves a replica make-before-break, and a per-owner cap. Both daemons run the
in-memory fake runtime; everything else (records, firehose, rounds) is real."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshletd.atproto.records import now_datetime
from meshletd.core.actions import PutRecord
from meshletd.core.records import WorkloadStatus, parse_datetime_ms
from meshletd.policy_settings import PolicySettings
from tests.devnet.daemons import Host, start_host, wait_until

_n = itertools.count()


@dataclass
class Commune:
    alice: Host  # alice's meshlet: the one whose policy each test sets
    bob: Host  # bob's meshlet, no policy


@pytest.fixture
async def commune_factory(devnet, tmp_path: Path, nursery: trio.Nursery):
    made: list[Host] = []

    async def make(alice_policy: PolicySettings | None) -> Commune:
        k = next(_n)
        alice = await devnet.create_account_async(f"hpal{k}", pds=0)
        alice_mesh = await devnet.create_account_async(f"hpalm{k}", pds=0)
        bob = await devnet.create_account_async(f"hpbo{k}", pds=1)
        bob_mesh = await devnet.create_account_async(f"hpbom{k}", pds=1)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = await start_host(
            nursery, tmp_path / "a", alice, alice_mesh, [bob.did], devnet.plc_url, alice_policy
        )
        made.append(a)
        b = await start_host(
            nursery, tmp_path / "b", bob, bob_mesh, [alice.did], devnet.plc_url, None
        )
        made.append(b)
        c = Commune(a, b)

        async def verified() -> bool:
            for h in (a, b):
                got = (await h.ctl.get("/farm.meshlet.ctl.listMembers")).json()["members"]
                if not (got and got[0]["verified"]):
                    return False
            return True

        await wait_until(verified, 30)
        return c

    yield make
    for h in made:
        await h.ctl.aclose()
        h.daemon.request_stop()


async def test_a_refused_image_source_is_never_bid_on(commune_factory) -> None:
    c: Commune = await commune_factory(PolicySettings(images=["registry.example:5000/**"]))
    # bob's workload of two replicas, from a source alice's meshlet does not accept (the
    # fake runtime has localhost/busybox only)
    uri = await c.bob.run("miner", replicas=2)

    async def on_bob() -> bool:
        return (uri, 0) in c.bob.running() or (uri, 1) in c.bob.running()

    await wait_until(on_bob)
    await trio.sleep(4)  # well past round 0's close and the first chained round
    assert not {k for k in c.alice.running() if k[0] == uri}
    assert await c.alice.bids_for(uri) == []  # not even a decline: it never bid
    assert len(await c.bob.bids_for(uri)) >= 1


async def test_outside_its_lending_window_a_meshlet_takes_no_new_work(commune_factory) -> None:
    minute = (parse_datetime_ms(now_datetime()) % 86_400_000) // 60_000
    # closed from now for two hours (every day), open otherwise
    start, end = (minute + 120) % 1440, minute
    closed = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    c: Commune = await commune_factory(PolicySettings(schedule=[closed] if end else None))
    if not end:
        pytest.skip("the minute of the day is 0: no window ends here")
    uri = await c.bob.run("web", replicas=2)

    async def one_on_bob() -> bool:
        return any(k[0] == uri for k in c.bob.running())

    await wait_until(one_on_bob)
    await trio.sleep(4)
    assert not {k for k in c.alice.running() if k[0] == uri}
    alice_bids = await c.alice.bids_for(uri)
    assert alice_bids and all(b["slots"] == 0 for b in alice_bids)  # declines only
    # the window opens (always): the unfilled slot comes to alice's meshlet
    await c.alice.set_policy("schedule", "")

    async def one_on_alice() -> bool:
        return any(k[0] == uri for k in c.alice.running())

    await wait_until(one_on_alice, 40)


async def test_an_eviction_moves_the_replica_elsewhere_make_before_break(commune_factory) -> None:
    c: Commune = await commune_factory(None)
    uri = await c.bob.run("svc")

    async def placed() -> bool:
        return (uri, 0) in c.alice.running() or (uri, 0) in c.bob.running()

    await wait_until(placed)
    host, other = (c.alice, c.bob) if (uri, 0) in c.alice.running() else (c.bob, c.alice)
    # The statuses the evicting meshletd decides to write. (Its PDS may only ever hold the
    # last of them: the write queue keeps the newest write of a record, and with the fake
    # runtime the move can be over before "moving (evicted)" leaves; full runs saw that.)
    engine = host.daemon.node.engine  # type: ignore[attr-defined]
    perform = engine._perform
    reasons: set[str] = set()

    def decided(actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, PutRecord) and isinstance(a.record, WorkloadStatus):
                reasons.add(a.record.message or "")
        perform(actions)

    engine._perform = decided
    await host.set_policy("evict", c.bob.owner)
    seen: list[tuple[bool, bool]] = []

    async def moved() -> bool:
        seen.append(((uri, 0) in host.running(), (uri, 0) in other.running()))
        return seen[-1] == (False, True)

    with trio.fail_after(60):
        while not await moved():
            await trio.sleep(0.01)
    # never a moment without a running copy: the new one ran before the old one stopped
    assert all(h or o for h, o in seen), seen
    assert any(h and o for h, o in seen), seen
    assert any(m.startswith("moving (evicted)") for m in reasons), reasons
    # and it is not placed back on the evicting meshlet
    await trio.sleep(3)
    assert (uri, 0) not in host.running() and (uri, 0) in other.running()


async def test_a_per_owner_cap_limits_what_one_owner_holds(commune_factory) -> None:
    # a tenth of 1000 milli-CPU: one 100 milli-CPU replica of bob's, not two
    c: Commune = await commune_factory(PolicySettings(default_share=100))
    avoid = {"constraints": {"avoidMeshlets": [c.bob.did]}}
    first = await c.bob.run("one", **avoid)
    second = await c.bob.run("two", **avoid)

    async def one_placed() -> bool:
        return any(k[0] in (first, second) for k in c.alice.running())

    await wait_until(one_placed)
    await trio.sleep(5)
    mine = {k[0] for k in c.alice.running()}
    assert len(mine & {first, second}) == 1, mine
    # alice's own workloads are not capped by bob's share
    own = await c.alice.run("mine", constraints={"avoidMeshlets": [c.bob.did]})

    async def own_runs() -> bool:
        return (own, 0) in c.alice.running()

    await wait_until(own_runs)
