"""`WriteQueue`: writes submitted without waiting, sent in order in batches through a
`PdsClient`, kept (and journaled) and retried with backoff while the PDS is down; nothing is
dropped except a write the PDS rejects as invalid (a bug: logged with the PDS's reason) or
a bid whose round's deadline passed unwritten. A write whose answer was lost (it may have
been applied) is looked up on the PDS before it is called unwritten.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from meshletd.atproto.pds import MAX_BATCH, PdsClient, PdsRejected, PdsUnavailable, Write
from meshletd.atproto.verify import cid_of, cid_str
from meshletd.errors import AuthRequired, InvalidRecord

log = logging.getLogger("meshletd.pds")


class WriteJournal(Protocol):
    """Where pending writes survive a restart (the daemon's state store)."""

    def load(self) -> list[dict[str, Any]]: ...
    def save(self, pending: list[dict[str, Any]]) -> None: ...


class WriteQueue:
    """Writes submitted without waiting, sent in order, retried while the PDS is down.

    With a `journal`, the pending writes are saved after every change and reloaded on start,
    so a restart while the PDS is down loses nothing either. The journal is saved by a task
    of its own in a worker thread (an fsync'd save took ~6 ms, twice per write, on the
    event loop of the whole daemon): a change reaches it within one save's time, and
    successive changes are saved as one.
    """

    def __init__(
        self,
        client: PdsClient,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        linger_s: float = 0.0,
        journal: WriteJournal | None = None,
        prime: Sequence[str] = (),
        on_dropped: Callable[[Write], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.journal = journal
        self.prime = tuple(prime)
        self.on_dropped = on_dropped
        self.clock = clock
        self.dropped: list[Write] = []  # writes past their `not_after`, never made
        self.pending: deque[Write] = deque(
            Write(w["action"], w["collection"], w["rkey"], w.get("value"), w.get("notAfter"))
            for w in (journal.load() if journal is not None else [])
        )
        # Writes pending when the last run ended may have been applied: the client looks
        # them up before it writes them again or we drop them.
        client.unsure.update(w.key for w in self.pending)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.linger_s = linger_s
        self.failures = 0
        self.rejected: list[tuple[Write, str]] = []
        self._wake = trio.Event()
        self._idle = trio.Event()
        if not self.pending:
            self._idle.set()
        self._journal_due = trio.Event()  # set: the pending writes changed since the save
        self._left = trio.Event()  # set (and replaced) whenever a write leaves the queue

    def _journal(self) -> None:
        if self.journal is not None:
            self._journal_due.set()

    def _journal_entries(self) -> list[dict[str, Any]]:
        return [
            {
                "action": w.action,
                "collection": w.collection,
                "rkey": w.rkey,
                "value": w.value,
                **({"notAfter": w.not_after} if w.not_after is not None else {}),
            }
            for w in self.pending
        ]

    async def _keep_journal(self, journal: WriteJournal) -> None:
        """Save the pending writes whenever they changed, off the event loop; once more,
        on the spot, when the queue stops with a change unsaved."""
        unsaved = False  # a change taken from `_journal_due` is not saved yet
        try:
            while True:
                await self._journal_due.wait()
                self._journal_due = trio.Event()
                unsaved = True
                # (a cancellation may come before the thread runs: then `unsaved` stays)
                await trio.to_thread.run_sync(journal.save, self._journal_entries())
                unsaved = False
        finally:
            if unsaved or self._journal_due.is_set():
                journal.save(self._journal_entries())

    def submit(self, write: Write) -> None:
        """Queue a write. A pending write to the same record is superseded by this one."""
        self.client._validate(write)
        for i, old in enumerate(self.pending):
            if old.key == write.key:
                del self.pending[i]
                self._signal_left()
                break
        self.pending.append(write)
        self._journal()
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def is_pending(self, collection: str, rkey: str) -> bool:
        """Whether a write of this record waits for the PDS."""
        return any(w.key == (collection, rkey) for w in self.pending)

    async def written(self, collection: str, rkey: str) -> bool:
        """Wait while a write of this record waits for the PDS. True once none does (it
        was written, or none was queued); False if the last one was dropped at its
        deadline or refused by the PDS: it will never be on the PDS."""
        key = (collection, rkey)
        while True:
            w = next((w for w in self.pending if w.key == key), None)
            if w is None:
                return True
            while any(p is w for p in self.pending):
                await self._left.wait()
            if any(d is w for d in self.dropped) or any(r is w for r, _ in self.rejected):
                return False

    def _signal_left(self) -> None:
        self._left.set()
        self._left = trio.Event()

    async def flushed(self) -> None:
        """Wait until every submitted write reached the PDS."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.journal is not None:
                nursery.start_soon(self._keep_journal, self.journal)
            await self._send_all(task_status)

    async def _send_all(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        if self.prime:
            try:
                await self.client.prime(self.prime)
            except (PdsUnavailable, PdsRejected, AuthRequired) as e:
                log.warning("pds: could not list our records (%s); puts will look them up", e)
        delay = 0.0
        while True:
            if not self.pending:
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
                # Group commit: the writes of one decision are all queued by now (the core
                # hands them over in one step); those that come while a commit is in flight
                # go together in the next. A linger would delay every write on the way to
                # running (5 ms, twice: issue #18) to spare a commit now and then.
                await trio.sleep(self.linger_s)
            batch: list[Write] = []
            try:
                await self._drop_expired()
                batch = list(self.pending)[:MAX_BATCH]
                if not batch:
                    continue
                await self.client.apply_writes(batch)
            except (PdsUnavailable, AuthRequired) as e:
                self.failures += 1
                delay = min(self.backoff_max_s, delay * 2 if delay else self.backoff_initial_s)
                delay = max(delay, min(getattr(e, "retry_after_s", 0.0), 3600.0))
                log.warning(
                    "pds: %d writes kept for retry in %.1fs (%s)", len(self.pending), delay, e
                )
                await trio.sleep(delay)
                continue
            except (PdsRejected, InvalidRecord) as e:
                if len(batch) == 1:
                    log.error(
                        "pds: write %s/%s rejected, dropped: %s",
                        batch[0].collection,
                        batch[0].rkey,
                        e,
                    )
                    self.rejected.append((batch[0], str(e)))
                    self._remove(batch)
                else:
                    await self._one_by_one(batch)
                continue
            delay = 0.0
            self._remove(batch)

    async def _drop_expired(self) -> None:
        """Drop writes that may no longer be made (their `not_after` passed while the PDS
        was unreachable): a bid published after its round's deadline would be judged by
        its old `createdAt` and could move a slot that was settled without it.

        A write whose last send lost its answer may be on the PDS after all: it is looked
        up first (raises `PdsUnavailable` while the PDS does not answer; the write stays,
        never sent again). One that is there was written: the core keeps its bid."""
        now_ms = int(self.clock() * 1000)
        expired = [w for w in self.pending if w.not_after is not None and w.not_after < now_ms]
        for w in [w for w in expired if w.key in self.client.unsure]:
            if await self._was_applied(w):
                log.warning(
                    "pds: %s/%s was written after all (the PDS applied the request whose "
                    "answer was lost)",
                    w.collection,
                    w.rkey,
                )
                self._remove([w])
                expired.remove(w)
        if not expired:
            return
        for w in expired:
            late = (now_ms - (w.not_after or now_ms)) / 1000
            log.warning(
                "pds: %s/%s dropped unwritten: its round's deadline passed %.1f s ago while "
                "the PDS was unreachable",
                w.collection,
                w.rkey,
                late,
            )
            self.dropped.append(w)
            del self.dropped[:-100]
        self._remove(expired)
        for w in expired:
            if self.on_dropped is not None:
                self.on_dropped(w)

    async def _was_applied(self, w: Write) -> bool:
        got = await self.client.get_record(w.collection, w.rkey)
        if w.action == "delete":
            return got is None
        return got is not None and w.value is not None and got[0] == cid_str(cid_of(w.value))

    async def _one_by_one(self, batch: list[Write]) -> None:
        for w in batch:
            try:
                await self.client.apply_writes([w])
            except (PdsUnavailable, AuthRequired):
                return  # the rest stays queued, in order
            except (PdsRejected, InvalidRecord) as e:
                log.error("pds: write %s/%s rejected, dropped: %s", w.collection, w.rkey, e)
                self.rejected.append((w, str(e)))
            self._remove([w])

    def _remove(self, batch: Sequence[Write]) -> None:
        for w in batch:
            try:
                self.pending.remove(w)
            except ValueError:
                pass  # superseded meanwhile
        self._journal()
        self._signal_left()
