"""Human output of meshletctl: rich tables (rich is imported on first use)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


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
        ("version", d.get("version", "?")),
    ]
    width = max(len(k) for k, _ in rows)
    bold, plain = ("\x1b[1m", "\x1b[0m") if _styled() else ("", "")
    print("\n".join(f"{bold}{k}{plain}{' ' * (width - len(k))}  {v}" for k, v in rows))


def _styled() -> bool:
    """Bold keys only on a terminal that wants them (rich's rules: NO_COLOR, TERM=dumb)."""
    import os
    import sys

    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def members(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no members configured (add [[clusters]] to /etc/meshlet/meshlet.toml)")
        return
    t = _table("CLUSTER", "OWNER", "MESHLETS", "VERIFIED", "NOTE")
    for m in items:
        t.add_row(
            m.get("cluster", ""),
            m["ownerDid"],
            "\n".join(m.get("meshletDids", [])) or "-",
            "yes" if m.get("verified") else "no",
            m.get("reason", ""),
        )
    _console().print(t)


def workloads(items: list[dict[str, Any]], placements: bool = False) -> None:
    if not items:
        print("no workloads")
        return
    if placements:
        t = _table("WORKLOAD", "OWNER", "SLOT", "ROUND", "MESHLET", "STATE")
        for w in items:
            reps = sorted(w.get("running", []), key=lambda r: r["slot"])
            if not reps:
                t.add_row(w["name"], w["ownerDid"], "-", "-", "-", "unplaced")
            for r in reps:
                t.add_row(
                    w["name"],
                    w["ownerDid"],
                    str(r["slot"]),
                    str(r.get("round", "")),
                    r.get("meshletDid") or "-",
                    r["state"],
                )
    else:
        t = _table("NAME", "OWNER", "READY", "STATE", "URI")
        for w in items:
            reps = w.get("running", [])
            ready = sum(r["state"] == "running" for r in reps)
            state = "paused" if w.get("paused") else ("running" if ready else "pending")
            t.add_row(w["name"], w["ownerDid"], f"{ready}/{w['replicas']}", state, w["uri"])
    _console().print(t)


def bids(d: dict[str, Any]) -> None:
    console = _console()
    console.print(f"[bold]{d['workload']}[/bold]")
    for rnd in d.get("rounds", []):
        t = _table("MESHLET", "PRIORITY", "COUNTED", title=f"round {rnd['round']}")
        for b in rnd.get("bids", []):
            t.add_row(
                b["meshletDid"], str(b.get("priority", "")), "yes" if b.get("accepted") else "no"
            )
        console.print(t)
        console.print(f"winners: {', '.join(rnd.get('winners', [])) or '-'}")
        if rnd.get("why"):
            console.print(f"why: {rnd['why']}")


def balance(d: dict[str, Any]) -> None:
    t = _table("OWNER", "GAVE (CPU·s)", "TOOK (CPU·s)", "BALANCE")
    for o in d.get("owners", []):
        gave = o.get("gaveMilliCpuSeconds", 0) / 1000
        took = o.get("tookMilliCpuSeconds", 0) / 1000
        t.add_row(o["ownerDid"], f"{gave:g}", f"{took:g}", f"{gave - took:+g}")
    _console().print(t)
    if d.get("halfLifeSeconds"):
        print(f"usage decays with a half-life of {d['halfLifeSeconds']} s")


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
