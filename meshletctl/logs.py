"""`meshletctl logs`: which lines to print, and how, without I/O of its own.

The daemon answers `farm.meshlet.getLogs` with entries (`{line, time}`) and a cursor, for a
replica on this machine or on the meshlet hosting it; one code path prints both, so the
output is the same wherever the replica runs. Following asks for the lines after the last
cursor, and asks again at once while answers come back full: nothing is printed twice or
skipped, however many lines arrive between polls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

Entry = dict[str, str]
# (lines, cursor) → a getLogs answer: {entries?, lines, cursor?}
Query = Callable[[int, str | None], dict[str, Any]]

PAGE = 1000  # lines asked per poll when following with a cursor
INTERVAL = 1.0  # seconds between polls when nothing was waiting


def entries_of(answer: dict[str, Any]) -> list[Entry]:
    """The entries of an answer; a meshletd from before entries only sends `lines`."""
    if "entries" in answer:
        return list(answer["entries"])
    return [{"line": str(x)} for x in answer.get("lines", [])]


def follow(
    query: Query,
    lines: int,
    sleep: Callable[[float], None],
    *,
    page: int = PAGE,
    interval: float = INTERVAL,
) -> Iterator[Entry]:
    """The last `lines` entries, then every newer one as it is written (never returns)."""
    answer = query(lines, None)
    cursor: str | None = answer.get("cursor")
    window = entries_of(answer)
    yield from window
    while True:
        if cursor is not None:
            answer = query(page, cursor)
            new = entries_of(answer)
            cursor = answer.get("cursor") or cursor
            yield from new
            if len(new) >= page:
                continue  # more are waiting: no pause
        else:
            # No cursor yet: the replica had written nothing, or the meshlet hosting it
            # predates cursors (then the new lines are those past the previous window).
            answer = query(lines, None)
            latest = entries_of(answer)
            yield from latest[_overlap(window, latest) :]
            window = latest
            cursor = answer.get("cursor")
        sleep(interval)


def _overlap(before: list[Entry], after: list[Entry]) -> int:
    """The longest end of `before` that `after` starts with: how much of `after` was seen."""
    for k in range(min(len(before), len(after)), 0, -1):
        if before[-k:] == after[:k]:
            return k
    return 0


def text(entry: Entry, timestamps: bool) -> str:
    """A line as printed: plain, or after its RFC 3339 time (like `kubectl logs
    --timestamps`); a line whose meshlet gave no time is printed plain. Control and bidi
    characters are escaped (`render.safe`; tabs are kept): `--json` has the exact line."""
    from meshletctl.render import safe

    if timestamps and entry.get("time"):
        return f"{safe(entry['time'])} {safe(entry['line'], keep_tab=True)}"
    return safe(entry["line"], keep_tab=True)


def json_line(entry: Entry) -> str:
    """One JSON object per line (`--json --follow`): `{"time": …, "line": …}`."""
    return json.dumps({k: entry[k] for k in ("time", "line") if k in entry})
