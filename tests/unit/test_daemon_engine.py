"""The engine runs the scheduler core against a (fake) runtime and a write sink: a workload
seen on the firehose ends as a running replica here, and its deletion stops it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio

from meshletd.atproto.pds import PdsUnavailable, Write
from meshletd.atproto.records import record_from_json
from meshletd.atproto.writequeue import WriteQueue
from meshletd.core.actions import StartReplica
from meshletd.core.events import BidAbandoned, SetDraining
from meshletd.core.records import MeshletOwner, Workload, format_datetime_ms
from meshletd.core.scheduler import MeshletIdentity, Scheduler
from meshletd.core.timing import DEFAULT_TIMING
from meshletd.daemon.engine import Engine, replica_id, replica_spec
from meshletd.daemon.http_peers import PING_ANSWER_S, PING_CONNECT_S, PROBE_TIMEOUT_S
from meshletd.runtime import FakeMachine, fake_runtime

ME, OWNER = "did:plc:alicemesh", "did:plc:alice"
T0 = 1_800_000_000.0


@dataclass(frozen=True)
class Ev:
    """The shape of a firehose RecordEvent the engine reads."""

    did: str
    collection: str
    rkey: str
    action: str
    cid: str | None
    record: dict[str, Any] | None

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


def put(did: str, collection: str, rkey: str, record: dict[str, Any]) -> Ev:
    return Ev(did, f"commune.scheduler.{collection}", rkey, "create", "bafy" + rkey, record)


def cluster_records(now_ms: int) -> list[Ev]:
    created = format_datetime_ms(now_ms)
    return [
        put(OWNER, "meshlet", "self", {"meshletDid": ME, "createdAt": created}),
        put(
            ME,
            "meshletOwner",
            "self",
            {
                "ownerDid": OWNER,
                "state": "active",
                "arch": "amd64",
                "createdAt": created,
                "capacity": {"milliCpu": 2000, "memoryMiB": 2048},
            },
        ),
        put(
            ME, "membership", "home", {"cluster": "home", "members": [OWNER], "createdAt": created}
        ),
    ]


def workload(now_ms: int, secrets: bool = False) -> Ev:
    rec = {
        "name": "web",
        "image": "localhost/busybox:latest",
        "replicas": 1,
        "kind": "service",
        "cluster": "home",
        "resources": {"milliCpu": 100, "memoryMiB": 64},
        "args": ["sleep", "60"],
        "env": [{"name": "MODE", "value": "test"}],
        "bidWindowMs": 500,
        "createdAt": format_datetime_ms(now_ms),
    }
    if secrets:
        rec["secrets"] = [{"name": "db"}]
    return put(OWNER, "workload", "3kweb", rec)


async def fetch_secret(workload_uri: str, name: str) -> bytes | None:
    return {"db": b"hunter2"}.get(name)


async def start(
    nursery: trio.Nursery,
    machine: FakeMachine,
    writes: list[Write],
    *,
    complete: bool = True,
) -> Engine:
    """An engine on `machine`; with `complete`, its start-up view (the cluster's records)
    is handed over at once."""
    clock = lambda: T0 + trio.current_time()  # noqa: E731
    sched = Scheduler(MeshletIdentity(did=ME, owner=OWNER, milli_cpu=2000, memory_mib=2048))
    engine = Engine(
        sched,
        fake_runtime(machine),
        writes.append,
        secret=fetch_secret,
        own_record=lambda decided: replace(decided, version="9.9.9", encryption_key="a2V5"),
        clock=clock,
    )
    await nursery.start(engine.run)
    if complete:
        engine.view_complete(cluster_records(int(clock() * 1000)))
    return engine


def as_records(writes: list[Write]) -> list[Ev]:
    """Our own writes as the PDS gives them back (what a restarted meshlet reads)."""
    out: dict[tuple[str, str], Ev] = {}
    for w in writes:
        if w.action == "delete":
            out.pop((w.collection, w.rkey), None)
        elif w.value is not None:
            out[(w.collection, w.rkey)] = Ev(
                ME, w.collection, w.rkey, "create", "bafy" + w.rkey, w.value
            )
    return list(out.values())


async def wait_for(predicate, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_a_workload_seen_becomes_a_running_replica_and_stops_when_deleted(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    writes: list[Write] = []
    engine = await start(nursery, machine, writes)
    ev = workload(int((T0 + trio.current_time()) * 1000))
    engine.record_changed(ev)
    key = (ev.uri, 0)
    await wait_for(lambda: engine.scheduler.replicas().get(key) == "running")
    assert engine.units[key].startswith("meshlet-")
    # Our bid and our status were handed to the PDS writer.
    collections = {w.collection for w in writes}
    assert "commune.scheduler.bid" in collections
    assert "commune.scheduler.workloadStatus" in collections
    # Every record naming the workload names its version (CID) too, as the lexicon requires.
    refs = [w.value["workload"] for w in writes if w.value and "workload" in w.value]
    assert refs and all(r == {"uri": ev.uri, "cid": ev.cid} for r in refs)

    engine.record_changed(Ev(OWNER, ev.collection, ev.rkey, "delete", None, None))
    await wait_for(
        lambda: (
            key not in engine.scheduler.replicas() or engine.scheduler.replicas()[key] != "running"
        )
    )
    await wait_for(lambda: not [r for r in engine.runtime.replicas() if r.state == "running"])


async def test_replicas_are_adopted_on_start(nursery: trio.Nursery, autojump_clock) -> None:
    machine = FakeMachine()
    writes: list[Write] = []
    first = await start(nursery, machine, writes)
    ev = workload(int((T0 + trio.current_time()) * 1000))
    first.record_changed(ev)
    await wait_for(lambda: first.scheduler.replicas().get((ev.uri, 0)) == "running")

    # A new engine on the same machine (meshletd restarted) finds the replica running.
    async with trio.open_nursery() as inner:
        second = await start(inner, machine, [])
        assert [st.replica for st in second.adopted] == [replica_id(ev.uri, 0)]
        inner.cancel_scope.cancel()


def test_the_spec_carries_args_env_and_secrets_but_secrets_never_in_args() -> None:
    ev = workload(1_800_000_000_000, secrets=True)
    wl = record_from_json(ev.uri, ev.cid, ev.record)
    assert isinstance(wl, Workload)
    spec = replica_spec(StartReplica(wl, 0, 0), {"db": b"hunter2"}, "alice")
    assert spec.image == "localhost/busybox:latest" and spec.args == ("sleep", "60")
    assert spec.env == (("MODE", "test"),)
    assert spec.secrets[0].name == "db" and spec.secrets[0].data == b"hunter2"
    assert "hunter2" not in repr(spec)


def test_a_workload_that_needs_no_network_runs_without_one() -> None:
    ev = workload(1_800_000_000_000)
    for needs, podman in (("none", "none"), ("internet", "private"), ("lan", "private")):
        wl = record_from_json(ev.uri, ev.cid, {**ev.record, "network": needs})
        assert isinstance(wl, Workload)
        assert replica_spec(StartReplica(wl, 0, 0), {}, "alice").network == podman


def test_a_spec_without_a_referenced_secret_is_refused() -> None:
    ev = workload(1_800_000_000_000, secrets=True)
    wl = record_from_json(ev.uri, ev.cid, ev.record)
    assert isinstance(wl, Workload)
    with pytest.raises(LookupError, match="'db' is not available"):
        replica_spec(StartReplica(wl, 0, 0), {}, "alice")


async def test_a_replica_whose_secret_cannot_be_had_fails_instead_of_starting(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    engine = await start(nursery, machine, [])
    ev = workload(int((T0 + trio.current_time()) * 1000), secrets=True)
    ev.record["secrets"] = [{"name": "missing"}]
    engine.record_changed(ev)
    await wait_for(lambda: engine.handled > 20 and not engine.runtime.replicas(), 30)
    await trio.sleep(10)
    assert engine.scheduler.replicas().get((ev.uri, 0)) != "running"
    assert not [r for r in engine.runtime.replicas() if r.state == "running"]


async def test_a_restarted_engine_decides_nothing_before_its_view_is_complete_and_keeps_its_replica(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    writes: list[Write] = []
    async with trio.open_nursery() as old:
        first = await start(old, machine, writes)
        ev = workload(int((T0 + trio.current_time()) * 1000))
        first.record_changed(ev)
        await wait_for(lambda: first.scheduler.replicas().get((ev.uri, 0)) == "running")
        await trio.sleep(2)
        old.cancel_scope.cancel()  # meshletd stops; the replica runs on
    container = next(iter(machine.containers))
    started = machine.started

    # Restarted: it adopts the replica, and while its view is incomplete (the PDS has not
    # answered yet) it neither stops nor restarts it, whatever time passes.
    second_writes: list[Write] = []
    second = await start(nursery, machine, second_writes, complete=False)
    assert [st.replica for st in second.adopted] == [replica_id(ev.uri, 0)]
    await trio.sleep(120)
    assert second.handled == 0 and second_writes == []
    assert list(machine.containers) == [container] and machine.started == started

    # The view arrives (cluster records, the workload, our own bid and status): the core
    # sees the replica it runs, of a workload it knows, and keeps it.
    second.view_complete([*cluster_records(int(T0 * 1000)), ev, *as_records(writes)])
    await wait_for(lambda: second.scheduler.replicas().get((ev.uri, 0)) == "running")
    await trio.sleep(120)
    assert list(machine.containers) == [container] and machine.started == started
    assert machine.containers[container].status == "running"
    assert not [w for w in second_writes if w.action == "delete"], second_writes


def reported_status(before: list[Write], after: list[Write]) -> dict[str, Any] | None:
    """The workloadStatus record our repo holds once the writes `before` (the last run) and
    then `after` (this run) are made in order: the write queue keeps only the last write of a
    record, so this, not any one write, is what the cluster ends up reading."""
    for ev in as_records([*before, *after]):
        if ev.collection == "commune.scheduler.workloadStatus":
            return ev.record
    return None


async def reported_failed_and_not_started_again(
    machine: FakeMachine, started: int, before: list[Write], after: list[Write]
) -> None:
    """The job's exit (3) ends up in our repo, stays there, and the job does not run again."""

    def failed() -> bool:
        st = reported_status(before, after)
        return st is not None and st["state"] == "failed"

    await wait_for(failed)
    await trio.sleep(60)  # and nothing decided later undoes it
    st = reported_status(before, after)
    assert st is not None and (st["state"], st["exitCode"]) == ("failed", 3), after
    assert machine.started == started, "the finished job was started again"


async def test_an_exit_while_the_view_is_incomplete_is_reported_once_it_is_complete(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    writes: list[Write] = []
    async with trio.open_nursery() as old:
        first = await start(old, machine, writes)
        ev = workload(int((T0 + trio.current_time()) * 1000))
        assert ev.record is not None
        ev.record["kind"] = "job"
        ev.record["restartPolicy"] = "never"
        first.record_changed(ev)
        await wait_for(lambda: first.scheduler.replicas().get((ev.uri, 0)) == "running")
        await trio.sleep(2)
        old.cancel_scope.cancel()
    started = machine.started
    second_writes: list[Write] = []
    second = await start(nursery, machine, second_writes, complete=False)
    machine.end(next(iter(machine.containers)), 3)  # the job ends while the PDS is away
    await trio.sleep(30)
    assert second_writes == []
    second.view_complete([*cluster_records(int(T0 * 1000)), ev, *as_records(writes)])

    await reported_failed_and_not_started_again(machine, started, writes, second_writes)


async def test_a_job_that_ended_while_meshletd_was_stopped_is_reported_after_the_restart(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    writes: list[Write] = []
    async with trio.open_nursery() as old:
        first = await start(old, machine, writes)
        ev = workload(int((T0 + trio.current_time()) * 1000))
        assert ev.record is not None
        ev.record["kind"] = "job"
        ev.record["restartPolicy"] = "never"
        first.record_changed(ev)
        await wait_for(lambda: first.scheduler.replicas().get((ev.uri, 0)) == "running")
        await trio.sleep(2)
        old.cancel_scope.cancel()
    machine.end(next(iter(machine.containers)), 3)  # the job ends while meshletd is down
    started = machine.started
    second_writes: list[Write] = []
    second = await start(nursery, machine, second_writes, complete=False)
    second.view_complete([*cluster_records(int(T0 * 1000)), ev, *as_records(writes)])

    await reported_failed_and_not_started_again(machine, started, writes, second_writes)


async def test_a_drain_decided_by_the_core_is_written_as_the_publisher_shapes_it(
    nursery: trio.Nursery, autojump_clock
) -> None:
    writes: list[Write] = []
    engine = await start(nursery, FakeMachine(), writes)
    await wait_for(lambda: engine.handled >= 3)
    engine.feed(SetDraining(True))
    await wait_for(lambda: any(w.collection.endswith("meshletOwner") for w in writes))
    (w,) = [w for w in writes if w.collection.endswith("meshletOwner")]
    assert w.value is not None and w.value["state"] == "draining"
    # the publisher's fields (own_record), the core's decision (state and since)
    assert w.value["version"] == "9.9.9" and w.value["encryptionKey"] == "a2V5"
    rec = record_from_json(f"at://{ME}/{w.collection}/self", "cid", w.value)
    assert isinstance(rec, MeshletOwner) and rec.state_since == engine.scheduler.draining_since


async def test_a_pulled_image_shows_in_the_status_with_few_writes_then_running(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    image = "registry.test:5000/team/app@sha256:" + "ab" * 32
    machine.pullable.add(image)
    machine.pull_delay_s = 90.0  # many "layers" over 90 s
    machine.pull_size_bytes = 5 << 20
    writes: list[Write] = []
    engine = await start(nursery, machine, writes)
    ev = workload(int((T0 + trio.current_time()) * 1000))
    ev.record["image"] = image
    engine.record_changed(ev)
    await wait_for(lambda: engine.scheduler.replicas().get((ev.uri, 0)) == "running", 300)
    states = [
        (w.value["state"], w.value.get("message", ""))
        for w in writes
        if w.collection == "commune.scheduler.workloadStatus" and w.value
    ]
    pulling = [m for s, m in states if s == "pulling"]
    assert pulling and "layer 0 of 2" in pulling[0] and image in pulling[0]
    assert len(pulling) <= 1 + 90 // 30  # throttled: one per 30 s at most
    assert states[-1][0] == "running"


BOB, BOB_MESH = "did:plc:bob", "did:plc:bobmesh"


async def _engine_watching_bob(nursery: trio.Nursery, probe) -> Engine:  # type: ignore[no-untyped-def]
    """An engine whose commune is us and bob's meshlet (with an endpoint: it is probed)."""
    now = int(T0 * 1000)
    created = format_datetime_ms(now)
    sched = Scheduler(MeshletIdentity(did=ME, owner=OWNER, milli_cpu=2000, memory_mib=2048))
    engine = Engine(
        sched,
        fake_runtime(FakeMachine()),
        [].append,
        probe=probe,
        clock=lambda: T0 + trio.current_time(),
        probe_timeout_s=PROBE_TIMEOUT_S + 1.0,
    )  # fmt: skip  (the probe's own bounds plus a margin, as meshletd passes)
    await nursery.start(engine.run)
    members = {"cluster": "home", "members": [OWNER, BOB], "createdAt": created}
    engine.view_complete(
        [
            *cluster_records(now)[:2],
            put(ME, "membership", "home", members),
            put(BOB, "meshlet", "self", {"meshletDid": BOB_MESH, "createdAt": created}),
            put(
                BOB_MESH,
                "meshletOwner",
                "self",
                {
                    "ownerDid": BOB,
                    "state": "active",
                    "arch": "amd64",
                    "createdAt": created,
                    "endpoint": "https://bob.example",
                    "capacity": {"milliCpu": 2000, "memoryMiB": 2048},
                },
            ),
            put(BOB_MESH, "membership", "home", members),
        ]
    )
    return engine


async def test_the_journal_says_whom_the_meshlet_suspects_lost_and_why(
    nursery: trio.Nursery, autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    # The first thing an operator looks for when a slot moved off a host that was up.
    up = {BOB_MESH: True}

    async def probe(meshlet: str) -> bool:
        return up.get(meshlet, False)

    await _engine_watching_bob(nursery, probe)
    caplog.set_level("INFO", logger="meshletd.engine")
    await trio.sleep(5)
    assert "suspect" not in caplog.text
    up[BOB_MESH] = False
    await wait_for(lambda: "suspect did:plc:bobmesh lost" in caplog.text)
    assert f"{DEFAULT_TIMING.probe_failures} probes failed in a row" in caplog.text
    up[BOB_MESH] = True
    await wait_for(lambda: "suspect did:plc:bobmesh answers again" in caplog.text)


async def _suspected_after(nursery: trio.Nursery, dies_at: float, probe) -> float:  # type: ignore[no-untyped-def]
    """Seconds from `dies_at` until the engine suspects bob (probes answered until then)."""
    engine = await _engine_watching_bob(nursery, probe)
    await trio.sleep_until(dies_at)
    while BOB_MESH not in engine.scheduler.suspects:
        await trio.sleep(0.01)
    return trio.current_time() - dies_at


@pytest.mark.parametrize("phase", [0.0, 0.1, 0.25, 0.4, 0.49])
async def test_a_powered_off_peer_is_suspected_3_to_3_5_s_after_it_died(
    nursery: trio.Nursery, autojump_clock, phase: float
) -> None:
    # docs/protocol.md section 8: a probe of a host that is gone fails at the 1 s connect
    # timeout; 5 probes 0.5 s apart. Whenever it dies between two probes, 3-3.5 s later.
    dies_at = 10.0 + phase

    async def probe(meshlet: str) -> bool:
        if trio.current_time() < dies_at:
            return True
        await trio.sleep(PING_CONNECT_S)
        return False

    took = await _suspected_after(nursery, dies_at, probe)
    assert 3.0 <= took <= 3.5 + 0.05, took


@pytest.mark.parametrize(("restart_s", "suspected"), [(4.0, False), (6.5, False), (9.0, True)])
async def test_a_restart_behind_the_kept_socket_is_suspected_only_after_about_7_s(
    nursery: trio.Nursery, autojump_clock, restart_s: float, suspected: bool
) -> None:
    # Section 8: during a restart the socket accepts; a probe waits for the new process or
    # fails after PING_ANSWER_S. Probes overlap, so failures begin 5 s into the restart.
    down_at = 10.0
    back_at = down_at + restart_s

    async def probe(meshlet: str) -> bool:
        now = trio.current_time()
        if now < down_at or now >= back_at:
            return True
        if back_at - now < PING_ANSWER_S:
            await trio.sleep_until(back_at)
            return True
        await trio.sleep(PING_ANSWER_S)
        return False

    engine = await _engine_watching_bob(nursery, probe)
    seen = False
    await trio.sleep_until(down_at)
    while trio.current_time() < back_at + PING_ANSWER_S:
        seen = seen or BOB_MESH in engine.scheduler.suspects
        if seen and not suspected:
            break
        await trio.sleep(0.05)
    assert seen == suspected
    if suspected:
        assert BOB_MESH not in engine.scheduler.suspects, "it answers again once it is back"


class DownPds:
    """Our PDS, down until `up` (what the write queue calls)."""

    def __init__(self) -> None:
        self.up = False
        self.unsure: set[tuple[str, str]] = set()
        self.written: list[str] = []

    def _validate(self, w: Write) -> None:
        pass

    async def apply_writes(self, batch: list[Write]) -> None:
        if not self.up:
            raise PdsUnavailable("connection refused")
        self.written += [w.collection.rsplit(".", 1)[-1] for w in batch]


async def _won_with_our_pds_down(
    nursery: trio.Nursery, machine: FakeMachine
) -> tuple[Engine, DownPds, Ev]:
    """An engine whose PDS is down sees a workload and wins its round alone, on a bid the
    PDS does not have."""
    clock = lambda: T0 + trio.current_time()  # noqa: E731
    pds = DownPds()
    engine: Engine | None = None

    def dropped(w: Write) -> None:
        assert engine is not None
        engine.feed(BidAbandoned(f"at://{ME}/{w.collection}/{w.rkey}"))

    queue = WriteQueue(
        pds, backoff_initial_s=0.05, backoff_max_s=0.1, on_dropped=dropped, clock=clock
    )
    await nursery.start(queue.run)
    sched = Scheduler(MeshletIdentity(did=ME, owner=OWNER, milli_cpu=2000, memory_mib=2048))
    engine = Engine(sched, fake_runtime(machine), queue.submit, clock=clock, published=queue)
    await nursery.start(engine.run)
    engine.view_complete(cluster_records(int(clock() * 1000)))
    ev = workload(int(clock() * 1000))
    engine.record_changed(ev)
    await wait_for(lambda: engine.scheduler.placement().get(ev.uri, [None])[0] is not None)
    return engine, pds, ev


async def test_a_replica_won_with_a_bid_still_unwritten_starts_once_the_bid_is_written(
    nursery: trio.Nursery, autojump_clock
) -> None:
    """Chaos: a meshlet whose PDS was stopped counted its own bid, won, ran the job, and
    stopped it seconds later when the bid was dropped, while the slot's real holder ran it
    too. No replica runs on a bid no observer can see yet (docs/protocol.md, section 14)."""
    machine = FakeMachine()
    engine, pds, ev = await _won_with_our_pds_down(nursery, machine)
    await trio.sleep(0.1)
    assert machine.started == 0 and engine._held_starts
    pds.up = True  # the PDS is back before the round's deadline + skew (750 ms)
    await wait_for(lambda: engine.scheduler.replicas().get((ev.uri, 0)) == "running")
    assert machine.started == 1 and pds.written[0] == "bid"


async def test_a_replica_won_with_a_bid_that_is_dropped_unwritten_never_runs(
    nursery: trio.Nursery, autojump_clock
) -> None:
    machine = FakeMachine()
    engine, pds, ev = await _won_with_our_pds_down(nursery, machine)
    # Its deadline passes: the bid is dropped and the core forgets it; it bids again in
    # each replacement round, each won on a bid that never reaches the PDS.
    await trio.sleep(30)
    assert machine.started == 0
    assert engine.scheduler.replicas().get((ev.uri, 0)) != "running"
    pds.up = True  # back: the core bids again, and this time it runs
    await wait_for(lambda: engine.scheduler.replicas().get((ev.uri, 0)) == "running", 120)
    assert machine.started == 1
