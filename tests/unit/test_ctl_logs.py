"""`meshletctl logs`: following prints every line once, however many arrive between polls.

A fake getLogs server (`FakeLog`) answers like meshletd does (the last lines, or the oldest
after a cursor); the journal parsing of the hosting meshletd is checked on real
`journalctl -o json` output shapes.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from meshletctl import cli
from meshletctl import logs as lg
from meshletd.daemon import journal


class Stop(Exception):
    pass


class FakeLog:
    """A replica's log behind getLogs: cursors are opaque strings (`c<index>`), as a
    journal cursor is; `legacy` answers like a meshletd from before cursors (lines only)."""

    def __init__(self, n: int = 0, legacy: bool = False) -> None:
        self.entries: list[dict[str, str]] = []
        self.legacy = legacy
        self.calls: list[tuple[int, str | None]] = []
        self.write(n)

    def write(self, n: int) -> None:
        for _ in range(n):
            i = len(self.entries)
            self.entries.append({"line": f"tick {i}", "time": f"2026-11-27T10:00:{i % 60:02}Z"})

    def query(self, lines: int, cursor: str | None) -> dict[str, Any]:
        self.calls.append((lines, cursor))
        if self.legacy:
            assert cursor is None, "a cursor was sent to a meshletd that gave none"
            return {"lines": [e["line"] for e in self.entries[-lines:]]}
        start = max(len(self.entries) - lines, 0) if cursor is None else int(cursor[1:])
        got = self.entries[start : start + lines]
        end = start + len(got)
        return {"lines": [e["line"] for e in got], "entries": got, "cursor": f"c{end}"}


def collect(log: FakeLog, lines: int, bursts: list[int], page: int = lg.PAGE) -> list[str]:
    """Follow `log`; between polls the replica writes the next burst; stop after them."""
    todo = list(bursts)

    def sleep(_: float) -> None:
        if not todo:
            raise Stop
        log.write(todo.pop(0))

    out: list[str] = []
    with pytest.raises(Stop):
        for e in lg.follow(log.query, lines, sleep, page=page):
            out.append(e["line"])
    return out


def ticks(a: int, b: int) -> list[str]:
    return [f"tick {i}" for i in range(a, b)]


def test_follow_prints_the_last_lines_then_each_new_line_once() -> None:
    log = FakeLog(10)
    assert collect(log, 3, [1, 0, 2, 1]) == ticks(7, 14)


def test_follow_keeps_printing_once_the_window_is_full() -> None:
    # The bug of counting lines: after -n lines, nothing new was ever printed.
    log = FakeLog(5)
    assert collect(log, 5, [1] * 20) == ticks(0, 25)


def test_a_burst_larger_than_n_between_polls_is_printed_whole() -> None:
    log = FakeLog(4)
    assert collect(log, 2, [50, 3]) == ticks(2, 57)


def test_a_burst_larger_than_a_page_is_fetched_without_waiting() -> None:
    log = FakeLog(0)
    assert collect(log, 5, [1, 23, 0], page=10) == ticks(0, 24)
    # The burst of 23 took three polls in a row (10, 10, 3), then one pause.
    assert [c for _, c in log.calls] == [None, "c0", "c0", "c1", "c11", "c21", "c24"]


def test_follow_of_a_replica_that_printed_nothing_yet_starts_at_its_first_line() -> None:
    log = FakeLog(0)
    assert collect(log, 3, [0, 5, 2]) == ticks(0, 7)


def test_follow_of_a_meshletd_without_cursors_prints_new_lines_once() -> None:
    log = FakeLog(6, legacy=True)
    assert collect(log, 4, [1, 2, 0, 3]) == ticks(2, 12)


def test_timestamps_prefix_each_line_with_its_rfc3339_time() -> None:
    e = {"line": "tick 1", "time": "2026-11-27T10:00:01.000002Z"}
    assert lg.text(e, False) == "tick 1"
    assert lg.text(e, True) == "2026-11-27T10:00:01.000002Z tick 1"
    assert lg.text({"line": "old"}, True) == "old"
    assert json.loads(lg.json_line(e)) == e


# -- the command, against the fake server --------------------------------------------------


class FakeClient:
    """A ControlClient whose daemon knows one workload of the owner, with `log`."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def query(self, nsid: str, **params: Any) -> dict[str, Any]:
        if nsid == "farm.meshlet.getLogs":
            assert params["uri"] == "at://did:plc:alice/commune.scheduler.workload/t"
            return self.log.query(params["lines"], params.get("cursor"))
        raise AssertionError(f"unexpected {nsid}")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLog:
    log = FakeLog(10)
    monkeypatch.setattr(cli, "_client", lambda: FakeClient(log))
    bursts = [3, 0, 12]

    def sleep(_: float) -> None:
        if not bursts:
            raise KeyboardInterrupt
        log.write(bursts.pop(0))

    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=sleep))  # the command's clock only
    return log


URI = "at://did:plc:alice/commune.scheduler.workload/t"


def test_logs_follow_prints_plain_lines_and_exits_130_on_interrupt(fake: FakeLog) -> None:
    r = CliRunner().invoke(cli.app, ["logs", URI, "-f", "-n", "4"])
    assert r.exit_code == 130, r.output
    assert r.stdout.splitlines() == ticks(6, 25)


def test_logs_timestamps_and_json_carry_each_line_s_time(fake: FakeLog) -> None:
    r = CliRunner().invoke(cli.app, ["logs", URI, "-n", "2", "--timestamps"])
    assert r.stdout.splitlines() == ["2026-11-27T10:00:08Z tick 8", "2026-11-27T10:00:09Z tick 9"]
    r = CliRunner().invoke(cli.app, ["logs", URI, "-n", "2", "--json"])
    doc = json.loads(r.stdout)
    assert doc["entries"] == fake.entries[8:10] and doc["lines"] == ticks(8, 10)
    assert doc["uri"] == URI and doc["slot"] == 0 and doc["cursor"] == "c10"
    r = CliRunner().invoke(cli.app, ["logs", URI, "-n", "1", "-f", "--json"])
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert got == fake.entries[9:25] and all(set(x) == {"time", "line"} for x in got)


# -- the hosting meshletd's side: journal entries ------------------------------------------


def test_journal_entries_carry_the_message_time_and_cursor() -> None:
    raw = json.dumps(
        {
            "__CURSOR": "s=abc;i=12;b=def;m=1;t=5f;x=9",
            "__REALTIME_TIMESTAMP": "1795773600123456",
            "MESSAGE": "tick 7",
        }
    )
    assert journal.entry_of(raw) == (
        "s=abc;i=12;b=def;m=1;t=5f;x=9",
        {"line": "tick 7", "time": "2026-11-27T10:00:00.123456Z"},
    )


def test_a_binary_message_is_decoded_and_a_non_entry_ignored() -> None:
    raw = json.dumps({"__CURSOR": "c", "MESSAGE": [104, 105, 255]})
    assert journal.entry_of(raw) == ("c", {"line": "hi\ufffd"})
    assert journal.entry_of("-- No entries --") is None
    assert journal.entry_of(json.dumps({"MESSAGE": "x"})) is None


def test_journalctl_is_asked_for_the_tail_or_everything_after_the_cursor() -> None:
    tail = journal.journalctl_argv("meshlet-x.service", 5, None)
    assert tail[-2:] == ["-n", "5"] and "-o" in tail and "json" in tail
    after = journal.journalctl_argv("meshlet-x.service", 5, "-s=1;i=2")
    assert after[-1] == "--after-cursor=-s=1;i=2" and "-n" not in after


def test_an_empty_journal_answers_a_cursor_that_reads_from_the_first_line() -> None:
    argv = journal.journalctl_argv("meshlet-x.service", 5, journal.HEAD)
    assert "-n" not in argv and not any(a.startswith("--after-cursor") for a in argv)
