"""The write queue keeps writes in order through outages and restarts; the ledger counts."""

from __future__ import annotations

import threading
import time

import trio

from meshletd.atproto.pds import PdsUnavailable, Write, WriteLedger
from meshletd.atproto.verify import cid_of, cid_str
from meshletd.atproto.writequeue import WriteQueue


class FlakyPds:
    def __init__(self, failures: int):
        self.failures = failures
        self.commits: list[list[tuple[str, str]]] = []
        self.unsure: set[tuple[str, str]] = set()  # as PdsClient: answers lost

    def _validate(self, w):
        pass

    async def apply_writes(self, batch):
        if self.failures:
            self.failures -= 1
            raise PdsUnavailable("connection refused")
        self.commits.append([(w.action, w.rkey) for w in batch])


class DictJournal:
    def __init__(self):
        self.saved: list = []

    def load(self):
        return list(self.saved)

    def save(self, pending):
        self.saved = list(pending)


async def test_writes_survive_an_outage_and_a_restart_in_order(autojump_clock):
    journal = DictJournal()
    pds = FlakyPds(failures=1000)
    q = WriteQueue(pds, backoff_initial_s=0.1, backoff_max_s=1, journal=journal)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        for k in "abc":
            q.submit(Write("put", "x.y.z", k, {"v": 1}))
        q.submit(Write("delete", "x.y.z", "a"))  # supersedes the pending put of a
        await trio.sleep(30)
        assert q.failures > 5 and pds.commits == []
        nursery.cancel_scope.cancel()  # the process stops while the PDS is still down
    assert [w["rkey"] for w in journal.saved] == ["b", "c", "a"]

    pds.failures = 2
    q2 = WriteQueue(pds, backoff_initial_s=0.1, journal=journal)
    async with trio.open_nursery() as nursery:
        await nursery.start(q2.run)
        await q2.flushed()
        nursery.cancel_scope.cancel()
    assert pds.commits == [[("put", "b"), ("put", "c"), ("delete", "a")]]
    assert journal.saved == []


def test_ledger_counts_points_per_hour_and_day():
    now = [86_400 * 10 + 3_600 * 5 + 10.0]
    ledger = WriteLedger(clock=lambda: now[0])
    assert ledger.record(["create", "create", "update", "delete"]) == 9
    now[0] += 3_600
    ledger.record(["delete"])
    assert ledger.points_this_hour() == 1
    assert ledger.points_today() == 10
    assert ledger.summary()["commits"] == 2 and ledger.total_points == 10


async def test_a_bid_past_its_round_s_deadline_is_dropped_and_the_rest_is_written(
    autojump_clock,
):
    """A bid queued while the PDS is unreachable is dropped once its `not_after` passed
    (docs/protocol.md section 14); every other write reaches the PDS when it is back."""
    pds = FlakyPds(failures=1000)
    dropped: list[Write] = []
    q = WriteQueue(
        pds,
        backoff_initial_s=0.5,
        backoff_max_s=2,
        on_dropped=dropped.append,
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        deadline_ms = int((trio.current_time() + 5) * 1000)
        q.submit(Write("put", "commune.scheduler.bid", "b1", {"v": 1}, not_after=deadline_ms))
        q.submit(Write("put", "commune.scheduler.workloadStatus", "s1", {"v": 1}))
        await trio.sleep(4)
        assert [w.rkey for w in q.pending] == ["b1", "s1"] and not dropped
        await trio.sleep(4)  # the deadline passes while the PDS is still down
        assert [w.rkey for w in q.pending] == ["s1"]
        assert [w.rkey for w in dropped] == ["b1"]
        pds.failures = 0  # the PDS is back
        await q.flushed()
        nursery.cancel_scope.cancel()
    assert pds.commits == [[("put", "s1")]]


async def test_a_bid_written_in_time_is_not_dropped(autojump_clock):
    pds = FlakyPds(failures=2)
    dropped: list[Write] = []
    q = WriteQueue(pds, backoff_initial_s=0.5, on_dropped=dropped.append, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        deadline_ms = int((trio.current_time() + 30) * 1000)
        q.submit(Write("put", "commune.scheduler.bid", "b1", {"v": 1}, not_after=deadline_ms))
        await q.flushed()
        nursery.cancel_scope.cancel()
    assert pds.commits == [[("put", "b1")]] and not dropped


class SlowJournal(DictJournal):
    """An fsync'd save that takes a while, and the threads it ran on."""

    def __init__(self):
        super().__init__()
        self.threads: list[str] = []

    def save(self, pending):
        self.threads.append(threading.current_thread().name)
        time.sleep(0.02)
        super().save(pending)


async def test_the_journal_is_saved_off_the_event_loop_and_submitting_never_waits_for_it():
    journal = SlowJournal()
    q = WriteQueue(FlakyPds(failures=1000), backoff_initial_s=0.1, journal=journal)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        t = time.perf_counter()
        for k in "abcdefghij":
            q.submit(Write("put", "x.y.z", k, {"v": 1}))
        assert time.perf_counter() - t < 0.01  # ten saves in place would take 0.2 s
        while [w["rkey"] for w in journal.saved] != list("abcdefghij"):
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    main = threading.main_thread().name
    assert journal.threads and main not in journal.threads
    assert len(journal.threads) < 10  # successive changes saved as one


async def test_a_write_submitted_just_before_the_queue_stops_is_in_the_journal():
    for settle in (0, 1, 2, 3):  # stop at each point of the save task's loop
        journal = DictJournal()
        q = WriteQueue(FlakyPds(failures=1000), journal=journal)
        async with trio.open_nursery() as nursery:
            await nursery.start(q.run)
            q.submit(Write("put", "x.y.z", "a", {"v": 1}))
            for _ in range(settle):
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        assert [w["rkey"] for w in journal.saved] == ["a"], settle


async def test_writes_queued_together_or_while_a_commit_is_in_flight_share_a_commit(
    autojump_clock,
):
    class SlowPds(FlakyPds):
        async def apply_writes(self, batch):
            await trio.sleep(0.02)  # a commit takes a while
            await super().apply_writes(batch)

    pds = SlowPds(failures=0)
    q = WriteQueue(pds)
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        q.submit(Write("put", "x.y.z", "a", {"v": 1}))  # one decision: two writes
        q.submit(Write("put", "x.y.z", "b", {"v": 1}))
        await trio.sleep(0.005)
        for k in "cd":  # queued during the first commit
            q.submit(Write("put", "x.y.z", k, {"v": 1}))
        await q.flushed()
        nursery.cancel_scope.cancel()
    assert pds.commits == [[("put", "a"), ("put", "b")], [("put", "c"), ("put", "d")]]


class LostAnswerPds(FlakyPds):
    """A PDS whose answers are lost (a read timeout) for the next `lost` commits, which it
    applies or not (`applies`), then unreachable for `down` more tries; it can be asked
    what it holds."""

    def __init__(self, *, lost: int, applies: bool, down: int):
        super().__init__(failures=0)
        self.lost, self.applies, self.down = lost, applies, down
        self.held: dict[tuple[str, str], dict] = {}
        self.lookups: list[str] = []
        self.lookup_fails = 0

    async def apply_writes(self, batch):
        if self.lost:
            self.lost -= 1
            if self.applies:
                self.held.update({w.key: w.value for w in batch})
            self.unsure.update(w.key for w in batch)
            raise PdsUnavailable("applyWrites: ReadTimeout", maybe_applied=True)
        if self.down:
            self.down -= 1
            raise PdsUnavailable("applyWrites: ConnectTimeout")
        self.held.update({w.key: w.value for w in batch})
        self.commits.append([(w.action, w.rkey) for w in batch])

    async def get_record(self, collection, rkey):
        self.lookups.append(rkey)
        if self.lookup_fails:
            self.lookup_fails -= 1
            raise PdsUnavailable("getRecord: ConnectTimeout")
        self.unsure.discard((collection, rkey))
        value = self.held.get((collection, rkey))
        return None if value is None else (cid_str(cid_of(value)), value)


async def _bid_past_its_deadline(pds: LostAnswerPds) -> tuple[WriteQueue, list[Write]]:
    dropped: list[Write] = []
    q = WriteQueue(
        pds, backoff_initial_s=0.5, backoff_max_s=2, on_dropped=dropped.append,
        clock=trio.current_time,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        deadline_ms = int((trio.current_time() + 3) * 1000)
        q.submit(Write("put", "commune.scheduler.bid", "b1", {"v": 1}, not_after=deadline_ms))
        await trio.sleep(10)  # the deadline passes; the PDS answers again
        q.submit(Write("put", "commune.scheduler.workloadStatus", "s1", {"v": 1}))
        await q.flushed()
        nursery.cancel_scope.cancel()
    return q, dropped


async def test_a_bid_whose_answer_was_lost_but_that_the_pds_applied_is_kept(autojump_clock):
    """chaos seed 3: a bid's applyWrites timed out, the queue dropped it at its round's
    deadline and the core forgot it, yet the PDS had it. A write whose answer was lost is
    looked up before it is called unwritten."""
    pds = LostAnswerPds(lost=1, applies=True, down=3)
    pds.lookup_fails = 1  # the PDS does not answer the first lookup either
    q, dropped = await _bid_past_its_deadline(pds)
    assert dropped == [] and q.dropped == []
    assert pds.lookups == ["b1", "b1"]
    assert pds.commits == [[("put", "s1")]]  # never sent again past its deadline
    assert pds.unsure == set()


async def test_a_bid_whose_answer_was_lost_and_that_the_pds_never_got_is_dropped(
    autojump_clock,
):
    pds = LostAnswerPds(lost=2, applies=False, down=3)
    _, dropped = await _bid_past_its_deadline(pds)
    assert [w.rkey for w in dropped] == ["b1"]
    assert pds.lookups == ["b1"]
    assert ("commune.scheduler.bid", "b1") not in pds.held
    assert pds.commits == [[("put", "s1")]]


async def test_a_bid_refused_outright_is_dropped_without_a_lookup(autojump_clock):
    """A connection that was never made cannot have written anything: no lookup."""
    pds = LostAnswerPds(lost=0, applies=False, down=5)
    _, dropped = await _bid_past_its_deadline(pds)
    assert [w.rkey for w in dropped] == ["b1"] and pds.lookups == []


async def test_a_wait_for_a_bid_ends_true_when_it_is_written_and_false_when_dropped(
    autojump_clock,
):
    """What the engine waits on before it starts a replica won with a bid that is still
    unwritten (docs/protocol.md, section 14)."""
    pds = FlakyPds(failures=1000)
    q = WriteQueue(pds, backoff_initial_s=0.5, backoff_max_s=1, clock=trio.current_time)
    outcomes: dict[str, bool] = {}

    async def wait(rkey: str) -> None:
        outcomes[rkey] = await q.written("commune.scheduler.bid", rkey)

    async with trio.open_nursery() as nursery:
        await nursery.start(q.run)
        now_ms = int(trio.current_time() * 1000)
        q.submit(Write("put", "commune.scheduler.bid", "b1", {"v": 1}, not_after=now_ms + 3000))
        q.submit(Write("put", "commune.scheduler.bid", "b2", {"v": 1}, not_after=now_ms + 60_000))
        assert q.is_pending("commune.scheduler.bid", "b1")
        nursery.start_soon(wait, "b1")
        nursery.start_soon(wait, "b2")
        await trio.sleep(10)  # b1's deadline passes while the PDS is down
        assert outcomes == {"b1": False}
        # b2 is written again with a newer value meanwhile: the wait follows the newest.
        q.submit(Write("put", "commune.scheduler.bid", "b2", {"v": 2}, not_after=now_ms + 60_000))
        await trio.sleep(5)
        assert "b2" not in outcomes
        pds.failures = 0
        await q.flushed()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert outcomes == {"b1": False, "b2": True}
    assert pds.commits == [[("put", "b2")]]
    assert await q.written("commune.scheduler.bid", "b3")  # nothing queued: nothing to wait
