"""Human output of meshletctl: rich tables (rich is imported on first use).

Every string shown here may come from another person (workload names, DIDs, reasons, log
lines, peers' states): `safe` escapes what a terminal would act on or reorder, and rich
interprets no markup or emoji codes in them. `--json` prints the exact strings instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

# C0 controls and DEL, C1 controls, and the Unicode bidi controls: embeddings and overrides
# (U+202A-U+202E), isolates (U+2066-U+2069), the marks LRM, RLM (U+200E, U+200F) and ALM
# (U+061C). Line and paragraph separators (U+2028, U+2029) break lines too.
_ESCAPED = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
    **{c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x061C, 0x2028, 0x2029)},
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
}
_KEEP_TAB = {c: e for c, e in _ESCAPED.items() if c != 0x09}


def safe(text: object, keep_tab: bool = False) -> str:
    """`text` as it may be printed: control characters (C0, DEL, C1), newlines and bidi
    controls become visible escapes (`\\n`, `\\x1b`, `\\u202e`); `keep_tab` leaves tabs (log
    lines). Everything else, backslashes included, is printed as it is."""
    return str(text).translate(_KEEP_TAB if keep_tab else _ESCAPED)


def _console() -> Any:
    import os
    import sys

    from rich.console import Console

    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        # A pipe or a file (scripts, grep, ssh without a tty): rich would assume 80 columns
        # and fold handles, DIDs and URIs mid-word; a table is only as wide as its content.
        width = 1000
    return Console(highlight=False, markup=False, emoji=False, soft_wrap=False, width=width)


def _table(*columns: str, title: str | None = None) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def _res(r: dict[str, Any] | None) -> str:
    r = r or {}
    cpu = r.get("milliCpu", 0) / 1000
    return f"{cpu:g} CPU, {r.get('memoryMiB', 0)} MiB"


def _limits(lim: dict[str, Any]) -> str:
    """The slice caps and max replicas in force, e.g. "slice 1.5 CPU, 512 MiB, 300 tasks;
    at most 4 replicas; MemoryMax from an admin drop-in"."""
    tasks = f", {lim['tasksMax']} tasks" if "tasksMax" in lim else ""
    text = (
        f"slice {lim.get('milliCpu', 0) / 1000:g} CPU, {lim.get('memoryMiB', 0)} MiB{tasks}; "
        f"at most {lim.get('maxReplicas', '?')} replicas"
    )
    admin = lim.get("adminSet") or []
    if admin:
        text += f"; {', '.join(map(str, admin))} from an admin drop-in (it wins)"
    if not lim.get("enforced", True):
        text += " (not enforced: no runtime, observing only)"
    return text


def status(d: dict[str, Any]) -> None:
    # Plain text, not a rich table: importing rich costs ~100 ms, most of what
    # `meshletctl status` would take (dev/bench ctl).
    cap = d.get("capacity", {})
    rows = [
        ("meshlet", d["did"]),
        ("owner", d["ownerDid"]),
        ("state", d["state"]),
        ("members", str(d.get("members", 0))),
        ("replicas here", str(d.get("replicas", 0))),
        ("workloads known", str(d.get("workloads", 0))),
        ("capacity", _res(cap.get("total"))),
        ("allocated", _res(cap.get("allocated"))),
        ("free", _res(cap.get("free"))),
        *([("limits", _limits(d["limits"]))] if "limits" in d else []),
        ("version", d.get("version", "?")),
    ]
    width = max(len(k) for k, _ in rows)
    bold, plain = ("\x1b[1m", "\x1b[0m") if _styled() else ("", "")
    print("\n".join(f"{bold}{k}{plain}{' ' * (width - len(k))}  {safe(v)}" for k, v in rows))


def _styled() -> bool:
    """Bold keys only on a terminal that wants them (rich's rules: NO_COLOR, TERM=dumb)."""
    import os
    import sys

    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def _namer(names: dict[str, str] | None) -> Callable[[str | None], str]:
    known = names or {}

    def name(did: str | None) -> str:
        return safe(known.get(did or "", did or "-"))

    return name


def members(items: list[dict[str, Any]], names: dict[str, str] | None = None) -> None:
    if not items:
        print("no members configured (add [[clusters]] to /etc/meshlet/meshlet.toml)")
        return
    name = _namer(names)
    t = _table("CLUSTER", "OWNER", "MESHLETS", "VERIFIED", "NOTE")
    for m in items:
        t.add_row(
            safe(m.get("cluster", "")),
            name(m["ownerDid"]),
            "\n".join(name(d) for d in m.get("meshletDids", [])) or "-",
            "yes" if m.get("verified") else "no",
            _named(m.get("reason", ""), name),
        )
    _console().print(t)


_TERMINAL = ("succeeded", "failed", "exited")


def _slot_rows(w: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """slot -> the row that says how the slot is served: its owner of the highest round (a
    host that lost the slot reports a lower one), else the pending row."""
    best: dict[int, dict[str, Any]] = {}
    for r in w.get("running", []):
        s = int(r["slot"])
        key = (r.get("meshletDid") is not None, r.get("round", -1))
        old = best.get(s)
        if old is None or key > (old.get("meshletDid") is not None, old.get("round", -1)):
            best[s] = r
    return dict(sorted(best.items()))


def replica_state(r: dict[str, Any]) -> str:
    """A replica's state in words: `failed (exit 3)`, `running`, `pending`…"""
    state = str(r.get("state", "?"))
    code = r.get("exitCode")
    if code is not None and state in _TERMINAL:
        return safe(f"{state} (exit {code})")
    if r.get("health") and state in ("running", "failing"):
        return safe(f"{state} ({r['health']})")  # its health check's verdict
    return safe(state)


def workload_state(w: dict[str, Any]) -> str:
    """One word (or a short count) for the whole workload, for the summary table."""
    if w.get("paused"):
        return "paused"
    rows = list(_slot_rows(w).values())
    want = int(w.get("replicas", len(rows)))
    if not rows:
        return "pending"
    if len(rows) == want and all(r.get("state") in _TERMINAL for r in rows):
        codes = [r.get("exitCode") for r in rows]
        bad = [c for c in codes if c not in (None, 0)]
        if bad or any(r.get("state") == "failed" for r in rows):
            return safe(f"failed (exit {bad[0]})") if bad else "failed"
        return "succeeded"
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("state", "?"))] = counts.get(str(r.get("state", "?")), 0) + 1
    if want - len(rows) > 0:
        counts["pending"] = counts.get("pending", 0) + want - len(rows)
    if list(counts) == ["running"]:
        return "running"
    if len(counts) == 1:
        return safe(next(iter(counts)))
    return safe(", ".join(f"{n} {st}" for st, n in sorted(counts.items(), key=lambda kv: -kv[1])))


# States whose host message is shown under the table.
MESSAGE_STATES = ("failing", "failed", "pending", "pulling")


def _notes(items: list[dict[str, Any]], name: Callable[[str | None], str]) -> list[str]:
    """One line per slot that has a reason (pending, lost, moving): printed under the table
    as plain text, so a narrow terminal or a pipe never splits it mid-word."""
    out = []
    for w in items:
        rows = _slot_rows(w)
        for slot, r in rows.items():
            label = safe(w["name"]) if w.get("replicas", 1) == 1 else f"{safe(w['name'])}[{slot}]"
            # the scheduler's reason, or the host's own message: why it is handed off
            # (failing) or why it did not start yet (e.g. its image did not pull); when the
            # row that serves the slot says nothing, what an earlier holder of it said
            said = r.get("message") if r.get("state") in MESSAGE_STATES else ""
            if not said and r.get("state") in MESSAGE_STATES:
                said = next(
                    (
                        o["message"]
                        for o in w.get("running", [])
                        if int(o["slot"]) == slot
                        and o.get("state") in MESSAGE_STATES
                        and o.get("message")
                    ),
                    "",
                )
            why = r.get("reason") or said
            if why:
                out.append(f"{label} {replica_state(r)}: {_named(why, name)}")
            if r.get("failedVersion") and r.get("message"):
                out.append(f"{label} {_named(r['message'], name)}")
        out.extend(_update_notes(w, rows, name))
    return out


def _update_notes(
    w: dict[str, Any], rows: dict[int, dict[str, Any]], name: Callable[[str | None], str]
) -> list[str]:
    """A rolling update under way (how many slots run the wanted version), and the last
    update rolled back with its reason (docs/protocol.md, section 25)."""
    out = []
    want = w.get("version")
    known = [r for r in rows.values() if r.get("version")]
    if want and known and any(r["version"] != want for r in known):
        done = sum(1 for r in known if r["version"] == want)
        out.append(
            f"{safe(w['name'])} updating: {done} of {len(rows)} slot(s) at version {safe(want)}"
        )
    if w.get("rollback"):
        out.append(f"{safe(w['name'])} {_named(w['rollback'], name)}")
    return out


def _named(text: str, name: Callable[[str | None], str]) -> str:
    """Replace the DIDs in a sentence by the names the caller knows them by."""
    import re

    pattern = r"did:(?:plc|web):[A-Za-z0-9._:%-]+[A-Za-z0-9]"
    return "".join(
        name(part) if i % 2 else safe(part)
        for i, part in enumerate(re.split(f"({pattern})", str(text)))
    )


def workloads(
    items: list[dict[str, Any]],
    placements: bool = False,
    names: dict[str, str] | None = None,
) -> None:
    """`names`: DID -> handle (or other short name) for display; DIDs stay in --json.
    Items with a `problem` are records the daemon ignores as invalid: listed under the
    table with the field and the reason."""
    invalid = [w for w in items if "problem" in w]
    items = [w for w in items if "problem" not in w]
    name = _namer(names)
    if not items:
        print("no workloads")
        _invalid(invalid, name, placements)
        return

    if placements:
        t = _table("WORKLOAD", "OWNER", "SLOT", "ROUND", "MESHLET", "STATE")
        for w in items:
            reps = sorted(w.get("running", []), key=lambda r: (r["slot"], -r.get("round", -1)))
            if not reps:
                t.add_row(safe(w["name"]), name(w["ownerDid"]), "-", "-", "-", "unplaced")
            for r in reps:
                t.add_row(
                    safe(w["name"]),
                    name(w["ownerDid"]),
                    safe(r["slot"]),
                    safe(r.get("round", "")),
                    name(r.get("meshletDid")),
                    replica_state(r),
                )
    else:
        t = _table("NAME", "OWNER", "READY", "STATE")
        for w in items:
            ready = sum(r.get("state") == "running" for r in _slot_rows(w).values())
            t.add_row(
                safe(w["name"]),
                name(w["ownerDid"]),
                safe(f"{ready}/{w['replicas']}"),
                workload_state(w),
            )
    _console().print(t)
    notes = _notes(items, name)
    if notes:
        print()
        print("\n".join(notes))
    _invalid(invalid, name, placements)


def _invalid(items: list[dict[str, Any]], name: Callable[[str | None], str], owners: bool) -> None:
    """One line per ignored record: its name (or URI), the field and the reason."""
    if not items:
        return
    print()
    print(f"not run, invalid ({len(items)}; `meshletctl stop NAME` deletes one of yours):")
    for w in items:
        p = w.get("problem", {})
        label = safe(w["name"]) if w.get("name") else safe(w["uri"])
        if owners:
            label += f" ({name(w.get('ownerDid'))})"
        field = safe(p.get("field", "")) or "the record"
        line = f"{label} invalid: {field}: {_named(p.get('reason', ''), name)}"
        print(line + (f" ({safe(w['uri'])})" if w.get("name") else ""))


def bids(d: dict[str, Any], names: dict[str, str] | None = None) -> None:
    name = _namer(names)
    console = _console()
    from rich.text import Text

    console.print(Text(safe(d["workload"]), style="bold"))
    for rnd in d.get("rounds", []):
        t = _table("MESHLET", "PRIORITY", "COUNTED", title=safe(f"round {rnd['round']}"))
        for b in rnd.get("bids", []):
            t.add_row(
                name(b["meshletDid"]),
                safe(b.get("priority", "")),
                "yes" if b.get("accepted") else "no",
            )
        console.print(t)
        console.print(f"winners: {', '.join(name(w) for w in rnd.get('winners', [])) or '-'}")
        if rnd.get("why"):
            console.print(f"why: {_named(rnd['why'], name)}")


def _ratio(permille: object) -> str:
    return "-" if not isinstance(permille, int) else f"{permille / 1000:.3g}"


def endpoints(d: dict[str, Any], names: dict[str, str] | None = None) -> None:
    name = _namer(names)
    t = _table("SLOT", "PORT", "ENDPOINT", "MESHLET", "STATE", "HEALTH", title=safe(d["workload"]))
    for e in d.get("endpoints", []):
        address = str(e["address"])
        host = f"[{address}]" if ":" in address else address
        t.add_row(
            safe(e["slot"]),
            safe(f"{e['name']}/{e.get('protocol', 'tcp')}"),
            safe(f"{host}:{e['port']}"),
            name(e["meshletDid"]),
            safe(e.get("state", "")),
            safe(e.get("health", "-")),
        )
    _console().print(t)


def balance(d: dict[str, Any], names: dict[str, str] | None = None) -> None:
    name = _namer(names)
    t = _table(
        "OWNER",
        "GAVE (CPU·s)",
        "TOOK (CPU·s)",
        "BALANCE",
        "PRIORITY",
        "LENT (CPU·h)",
        "USED (CPU·h)",
        "RATIO",
        "STANDING",
        "SERVED",
    )
    for o in d.get("owners", []):
        gave = o.get("gaveMilliCpuSeconds", 0) / 1000
        took = o.get("tookMilliCpuSeconds", 0) / 1000
        prio = o.get("priority")
        t.add_row(
            name(o["ownerDid"]),
            f"{gave:g}",
            f"{took:g}",
            f"{gave - took:+g}",
            "" if prio is None else safe(prio),
            f"{o.get('lentMilliCpuSeconds', 0) / 3_600_000:.2f}",
            f"{o.get('usedMilliCpuSeconds', 0) / 3_600_000:.2f}",
            _ratio(o.get("ratioPermille")),
            safe(o.get("standing", "")),
            safe(o.get("served", "")),
        )
    _console().print(t)
    if d.get("halfLifeSeconds"):
        at = f" as of {d['at']}" if d.get("at") else ""
        print(safe(f"usage decays with a half-life of {d['halfLifeSeconds']} s{at}"))
    rule = d.get("minContribution")
    if isinstance(rule, dict):
        print(
            safe(
                f"this host asks owners to lend {_ratio(rule.get('ratioPermille'))} x what "
                f"they use over {rule.get('periodDays')} days; those below come "
                + ("not at all" if rule.get("mode") == "refuse" else "after contributors")
            )
        )
    elif d.get("periodDays"):
        print(safe(f"lent and used over {d['periodDays']} days; this host sets no minimum"))


def usage(d: dict[str, Any], names: dict[str, str] | None = None) -> None:
    name = _namer(names)
    t = _table("DAY (UTC)", "OWNER", "CPU·h", "MEMORY (GiB·h)", "PERIODS")
    for r in d.get("rows", []):
        t.add_row(
            safe(r.get("day", "")),
            name(r.get("ownerDid")),
            f"{r.get('milliCpuSeconds', 0) / 3_600_000:.2f}",
            f"{r.get('memoryMiBSeconds', 0) / 1024 / 3600:.2f}",
            safe(r.get("periods", "")),
        )
    _console().print(t)
    if not d.get("rows"):
        print(safe(f"no usage records of this meshlet in the last {d.get('days', '?')} days"))


@contextlib.contextmanager
def drain_progress(total: int, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A live progress bar of replicas moved away; `update(done, left)`."""
    if not enabled:
        yield lambda done, left: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("draining"),
        BarColumn(),
        TextColumn("{task.fields[left]} replica(s) left"),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("drain", total=total, left=total)

        def update(done: int, left: int) -> None:
            progress.update(task, completed=done, left=left)

        yield update
