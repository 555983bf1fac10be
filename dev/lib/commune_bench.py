"""What the end-to-end benches (dev/benches/latency, writes) share: the PDS firehose replayed
and priced, meshletd's timing trace read from each host's journal, percentiles.

Times are wall-clock seconds (CLOCK_REALTIME): the hosts are containers on this machine's
kernel, so meshletd's trace, systemd's timestamps and the PDS's `time` share one clock.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PRICE = {"create": 3, "update": 2, "delete": 1}
TRACE_RE = re.compile(r"^meshletd\.trace: (\S+) t=(\d+\.\d+)\s*(.*)$")


def pct(xs: Iterable[float], p: float) -> float:
    """The p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def wall_of_monotonic(mono: float) -> float:
    """A CLOCK_MONOTONIC reading (e.g. systemd's ...TimestampMonotonic) as wall-clock time."""
    return mono + (time.time() - time.monotonic())


# -- the PDS side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One op of one commit, as the PDS sequenced it."""

    seq: int
    time: float  # the PDS's sequencing time (ms precision)
    repo: str
    action: str  # create | update | delete
    collection: str
    rkey: str
    record: dict[str, Any] | None  # the record value for creates/updates

    @property
    def points(self) -> int:
        return PRICE[self.action]

    @property
    def uri(self) -> str:
        return f"at://{self.repo}/{self.collection}/{self.rkey}"


def replay_firehose(pds_url: str, dids: set[str]) -> list[Op]:
    """Every op committed to `dids` on this PDS, from its firehose replayed from seq 0."""
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    from meshletd.atproto.frames import decode_frame
    from meshletd.atproto.verify import cid_bytes, decode_car

    url = pds_url.replace("http://", "ws://", 1) + "/xrpc/com.atproto.sync.subscribeRepos"
    ops: list[Op] = []

    async def replay() -> None:
        async with open_websocket_url(f"{url}?cursor=0", max_message_size=2**24) as ws:
            while True:
                with trio.move_on_after(3) as idle:
                    try:
                        raw = await ws.get_message()
                    except ConnectionClosed:
                        return
                if idle.cancelled_caught:
                    return  # the backlog is drained
                header, body = decode_frame(raw)
                if header.get("t") != "#commit" or body.get("repo") not in dids:
                    continue
                at = dt.datetime.fromisoformat(body["time"].replace("Z", "+00:00")).timestamp()
                try:
                    _, blocks = decode_car(body["blocks"])
                except Exception:
                    blocks = {}
                for op in body.get("ops") or ():
                    coll, _, rkey = op["path"].partition("/")
                    rec = None
                    cid = op.get("cid")
                    if cid is not None and blocks:
                        key = cid_bytes(cid) if isinstance(cid, str) else bytes(cid)
                        got = blocks.get(key)
                        rec = got if isinstance(got, dict) else None
                    ops.append(Op(body["seq"], at, body["repo"], op["action"], coll, rkey, rec))

    trio.run(replay)
    return ops


# -- meshletd's trace --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line of meshletd's timing trace (meshletd/trace.py) on one meshlet."""

    who: str  # the person whose meshlet logged it
    step: str
    t: float
    fields: dict[str, str] = field(default_factory=dict)


def read_trace(m: Any, since: float | None = None) -> list[Step]:
    """meshletd's trace lines from m's journal (needs a commune started with trace=True)."""
    args = ["journalctl", "-u", "meshletd.service", "-o", "json", "--no-pager"]
    if since is not None:
        args += ["--since", f"@{since - 1:.0f}"]
    out = m.run(*args, timeout=120).stdout
    steps = []
    for line in out.splitlines():
        try:
            msg = json.loads(line).get("MESSAGE")
        except ValueError:
            continue
        if not isinstance(msg, str) or not (hit := TRACE_RE.match(msg)):
            continue
        fields = dict(kv.split("=", 1) for kv in hit.group(3).split() if "=" in kv)
        steps.append(Step(m.person, hit.group(1), float(hit.group(2)), fields))
    return steps


def first(steps: Iterable[Step], step: str, who: str | None = None, **match: str) -> Step | None:
    """The earliest step named `step` (by `who`) whose fields match; `key` matches one of a
    comma-separated list of record keys."""
    best = None
    for s in steps:
        if s.step != step or (who is not None and s.who != who):
            continue
        ok = True
        for k, v in match.items():
            got = s.fields.get(k, "")
            if k == "key":
                ok = v in got.split(",")
            else:
                ok = got == v
            if not ok:
                break
        if ok and (best is None or s.t < best.t):
            best = s
    return best
