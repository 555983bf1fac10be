"""A replica's log lines from journald, for `farm.meshlet.getLogs`.

`journalctl -o json` gives each entry's cursor and receive time with its text, so a caller
that follows a replica asks for the lines after the cursor it last saw: none is printed
twice and none is skipped, however many arrived in between (it asks again at once when an
answer came back full). The parsing is pure (`entry_of`); `read_unit` runs journalctl.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import trio

from meshletd.daemon.peers import LogPage
from meshletd.errors import InvalidRequest, UpstreamFailure

MAX_LINE = 16384  # the lexicon's bound on one line
# The cursor answered while a unit has written nothing: "from its first entry". A follower
# that started before the first line gets every line, however many come at once. (Journal
# cursors always hold `s=`, so this one cannot be mistaken for one.)
HEAD = "head"


def entry_of(raw: str | bytes) -> tuple[str, dict[str, str]] | None:
    """One `journalctl -o json` line → (its cursor, a getLogs entry `{line, time}`).

    None for a line that is not a journal entry. MESSAGE is text, or a list of byte values
    when it is not UTF-8 (decoded with replacement)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("__CURSOR"), str):
        return None
    message = obj.get("MESSAGE")
    if isinstance(message, list):
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode(errors="replace")
    elif not isinstance(message, str):
        message = ""
    entry = {"line": message.rstrip("\n")[:MAX_LINE]}
    try:
        usec = int(obj["__REALTIME_TIMESTAMP"])
    except (KeyError, TypeError, ValueError):
        pass
    else:
        entry["time"] = rfc3339(usec)
    return obj["__CURSOR"], entry


def rfc3339(usec: int) -> str:
    """Microseconds since the epoch → RFC 3339 UTC with microseconds, `…T10:00:00.123456Z`."""
    t = dt.datetime.fromtimestamp(usec / 1e6, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def journalctl_argv(unit: str, lines: int, cursor: str | None) -> list[str]:
    """Without a cursor the last `lines` entries; with one, every entry after it (the
    reader stops after `lines`: `-n` would keep the newest, and we want the oldest)."""
    argv = ["journalctl", "-u", unit, "-o", "json", "--output-fields=MESSAGE", "--all"]
    argv += ["--no-pager", "-q"]
    if cursor == HEAD:
        return argv
    # `=`: a cursor is never taken for an option, whatever it starts with.
    return [*argv, f"--after-cursor={cursor}"] if cursor else [*argv, "-n", str(lines)]


async def read_unit(unit: str, lines: int, cursor: str | None) -> LogPage:
    """The entries and cursor of a unit's journal: the last `lines`, or at most `lines` of the
    oldest after `cursor`. The cursor answered is the last entry's, else the one given, else
    `HEAD` (the unit has written nothing yet)."""
    proc = await trio.lowlevel.open_process(
        journalctl_argv(unit, lines, cursor),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    entries: list[dict[str, str]] = []
    last = cursor
    buf = b""
    full = False
    try:
        async for chunk in proc.stdout:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                got = entry_of(raw)
                if got is None:
                    continue
                last, entry = got
                entries.append(entry)
                if len(entries) >= lines:
                    full = True
                    break
            if full:
                break
        if not full and buf.strip() and (got := entry_of(buf)) is not None:
            last, entry = got
            entries.append(entry)
        err = b"" if full else await proc.stderr.receive_some(65536)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await proc.stdout.aclose()
        await proc.stderr.aclose()
    if not full and proc.returncode not in (0, None) and not entries:
        why = err.decode(errors="replace").strip()
        if cursor and cursor != HEAD and "cursor" in why.lower():
            raise InvalidRequest(f"not a cursor of this meshlet's journal: {why}")
        raise UpstreamFailure(f"journalctl -u {unit} failed: {why or proc.returncode}")
    return LogPage(tuple(entries), last or HEAD)
