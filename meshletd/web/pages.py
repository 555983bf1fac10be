"""What each page shows, from the node's read model: plain dicts for the templates.

No I/O and no HTML here (templates/ render; jinja2 escapes every value). The node is the
daemon's `Node` (daemon/node.py); the page also uses the read model's `meshlets()`,
`rounds(uri)` and `workload_record(uri)` where the node has them.
"""

from __future__ import annotations

from typing import Any, Protocol

from meshletd.errors import MeshletError

# A slot's state in a few words, for filters and colours.
LIVE = ("running", "starting", "pulling")


class Source(Protocol):
    """What the page reads (the `Node` protocol, read-only, and the read model's extras)."""

    @property
    def did(self) -> str: ...

    @property
    def owner(self) -> str: ...

    def summary(self) -> dict[str, Any]: ...
    def members(self) -> list[dict[str, Any]]: ...
    def workloads(
        self, owner: str | None = None, everything: bool = True
    ) -> list[dict[str, Any]]: ...
    def workload(self, uri: str) -> dict[str, Any]: ...
    def balance(self) -> dict[str, Any]: ...


def _pct(used: int, total: int) -> int:
    if total <= 0:
        return 100 if used > 0 else 0
    return max(0, min(100, round(100 * used / total)))


def meshlets_of(node: Source) -> list[dict[str, Any]]:
    fn = getattr(node, "meshlets", None)
    if fn is not None:
        return list(fn())
    cap = node.summary().get("capacity", {})
    return [
        {
            "meshletDid": node.did,
            "ownerDid": node.owner,
            "self": True,
            "verified": True,
            "ownerClaims": True,
            "namesOwner": True,
            "consentsTo": [],
            "state": node.summary().get("state", "active"),
            "capacity": cap.get("total", {}),
            "allocated": cap.get("allocated", {}),
            "slots": 0,
            "reason": "",
            "labels": [],
            "endpoint": None,
        }
    ]


def record_of(node: Source, uri: str) -> dict[str, Any]:
    fn = getattr(node, "workload_record", None)
    if fn is None:
        return {}
    try:
        rec = fn(uri)
    except MeshletError:
        return {}
    return rec if isinstance(rec, dict) else {}


def members_page(node: Source) -> dict[str, Any]:
    """People (owner DIDs, per cluster) and their meshlets, with both directions of the link,
    their state and capacity bars."""
    meshlets = meshlets_of(node)
    for m in meshlets:
        cap, used = m.get("capacity") or {}, m.get("allocated") or {}
        m["bars"] = [
            {
                "what": label,
                "used": int(used.get(key, 0)),
                "total": int(cap.get(key, 0)),
                "unit": unit,
                "pct": _pct(int(used.get(key, 0)), int(cap.get(key, 0))),
            }
            for key, label, unit in (("milliCpu", "CPU", "mCPU"), ("memoryMiB", "memory", "MiB"))
        ]
    by_owner: dict[str, list[dict[str, Any]]] = {}
    for m in meshlets:
        by_owner.setdefault(m["ownerDid"], []).append(m)
    people: dict[str, dict[str, Any]] = {}
    for row in node.members():
        p = people.setdefault(
            row["ownerDid"],
            {"ownerDid": row["ownerDid"], "clusters": [], "reasons": [], "verified": False},
        )
        p["clusters"].append(row.get("cluster", ""))
        p["verified"] = p["verified"] or bool(row.get("verified"))
        if row.get("reason"):
            p["reasons"].append(row["reason"])
    me = node.owner
    people.setdefault(me, {"ownerDid": me, "clusters": [], "reasons": [], "verified": True})
    out = []
    for owner, p in people.items():
        p["meshlets"] = by_owner.get(owner, [])
        p["self"] = owner == me
        out.append(p)
    out.sort(key=lambda p: (not p["self"], p["ownerDid"]))
    states: dict[str, int] = {}
    for m in meshlets:
        states[m["state"]] = states.get(m["state"], 0) + 1
    return {"people": out, "states": states, "meshlet_count": len(meshlets)}


def workload_state(view: dict[str, Any]) -> str:
    """One word for a workload: paused, running (every slot), partial, pending, done."""
    if view.get("paused"):
        return "paused"
    rows = [r for r in view.get("running", []) if r.get("state") not in ("stopping", "lost")]
    slots = {r.get("slot") for r in rows}
    live = {r.get("slot") for r in rows if r.get("state") in LIVE}
    if rows and all(r.get("state") == "exited" for r in rows):
        return "done"
    if len(live) >= int(view.get("replicas", 1)):
        return "running"
    if live:
        return "partial"
    if any(r.get("state") == "failed" for r in rows) and len(slots) >= int(view.get("replicas", 1)):
        return "failed"
    return "pending"


PAGE_SIZE = 50  # workloads per page: a phone scrolls through that many; rendering stays short


def workloads_page(
    node: Source, owner: str = "", state: str = "", meshlet: str = "", page: int = 1
) -> dict[str, Any]:
    """Every workload, filtered by owner, state and meshlet (each optional), `PAGE_SIZE`
    per page."""
    matching = []
    owners: set[str] = set()
    meshlets: set[str] = set()
    states: set[str] = set()
    everything = node.workloads(None, True)
    for v in everything:
        st = workload_state(v)
        hosts = {r["meshletDid"] for r in v.get("running", []) if r.get("meshletDid")}
        owners.add(v["ownerDid"])
        meshlets |= hosts
        states.add(st)
        if owner and v["ownerDid"] != owner:
            continue
        if state and st != state:
            continue
        if meshlet and meshlet not in hosts:
            continue
        matching.append((v, st))
    pages_n = max(1, -(-len(matching) // PAGE_SIZE))
    page = min(max(1, page), pages_n)
    rows = []
    for v, st in matching[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
        rec = record_of(node, v["uri"])
        rows.append(
            {
                **v,
                "state": st,
                "kind": str(rec.get("kind", "")),
                "slots": sorted(
                    v.get("running", []), key=lambda r: (r.get("slot", 0), r.get("round", 0))
                ),
            }
        )
    first = (page - 1) * PAGE_SIZE + 1 if rows else 0
    return {
        "rows": rows,
        "filters": {"owner": owner, "state": state, "meshlet": meshlet},
        "owners": sorted(owners),
        "meshlets": sorted(meshlets),
        "states": sorted(states),
        "total": len(everything),
        "matching": len(matching),
        "page": page,
        "pages": pages_n,
        "first": first,
        "last": first + len(rows) - 1 if rows else 0,
    }


def workload_page(node: Source, uri: str) -> dict[str, Any]:
    """One workload: its record, its slots and status rows, and its history by rounds."""
    v = node.workload(uri)
    rec = record_of(node, v["uri"])
    rounds = rounds_of(node, v["uri"])
    history = []
    for r in rounds:
        for slot, winner in sorted(r["winners"].items()):
            history.append(
                {
                    "round": r["round"],
                    "slot": slot,
                    "meshletDid": winner,
                    "what": "placed" if r["round"] == 0 else "failed over (replacement round)",
                }
            )
    for row in v.get("running", []):
        if row.get("state") == "exited":
            history.append(
                {
                    "round": row.get("round", 0),
                    "slot": row.get("slot", 0),
                    "meshletDid": row.get("meshletDid", ""),
                    "what": f"exited with code {row.get('exitCode', '?')}",
                }
            )
    history.sort(key=lambda h: (h["round"], h["slot"]))
    return {
        "w": v,
        "state": workload_state(v),
        "record": rec,
        "slots": sorted(v.get("running", []), key=lambda r: (r.get("slot", 0), r.get("round", 0))),
        "history": history,
        "slot_numbers": list(range(int(v.get("replicas", 1)))),
    }


def rounds_of(node: Source, uri: str) -> list[dict[str, Any]]:
    fn = getattr(node, "rounds", None)
    if fn is None:
        return []
    return list(fn(uri).get("rounds", []))


RULE_ROUND0 = (
    "Round 0: the counting bids are ordered by (-priority, score); walking the ordered bids "
    "in layers, in layer k each bid whose capacity exceeds k takes the next free slot "
    "(slot 0 first). Capacity is 1, or min(slots, replicas) when the workload allows "
    "packing. So without packing no meshlet gets two slots of one workload."
)
RULE_REPLACEMENT = "Round r ≥ 1: the first bid in the order wins slot s."
RULE_FENCING = (
    "Fencing: the owner of slot s is the winner of the highest closed round of s that had a "
    "winner. A round without a winner leaves the previous owner in place."
)
RULE_COUNTS = (
    "A bid counts in its round iff A ≤ createdAt ≤ D, slots ≥ 1, free ≥ resources, and its "
    "meshlet is eligible. Declines (slots = 0) never count but open or answer a round."
)


def _why_won(bids: list[dict[str, Any]], winner: str) -> str:
    counting = [b for b in bids if b["counts"]]
    mine = next((b for b in counting if b["meshletDid"] == winner), None)
    if mine is None:
        return "the winner's bid is not among the bids this meshlet has seen"
    ahead = [b for b in counting if b["rank"] < mine["rank"]]
    ties = [b for b in counting if b["priority"] == mine["priority"] and b is not mine]
    if not ahead and not ties:
        return f"highest fair-share priority ({mine['priority']}) among the counting bids"
    if not ahead:
        return (
            f"tied on priority {mine['priority']} with {len(ties)} other bid(s); "
            "lowest rendezvous score breaks the tie"
        )
    return (
        f"{len(ahead)} bid(s) ranked ahead took earlier slots (layered walk); "
        f"this was the next in order (priority {mine['priority']})"
    )


def rounds_page(node: Source, uri: str, slot: int | None) -> dict[str, Any]:
    """Every round of the workload (or of one slot: round 0 and that slot's replacement
    rounds), each bid ranked as docs/protocol.md section 6 orders them, the winners and the
    rule that made them win."""
    v = node.workload(uri)
    rec = record_of(node, v["uri"])
    raw = rec.get("resources")
    res = raw if isinstance(raw, dict) else {}
    need = {k: int(res.get(k, 0)) for k in ("milliCpu", "memoryMiB") if isinstance(res.get(k), int)}
    rounds = []
    for r in rounds_of(node, v["uri"]):
        if slot is not None and r["slot"] not in (-1, slot):
            continue
        bids = []
        for rank, b in enumerate(r["bids"]):
            why_not = []
            if b["slots"] < 1:
                why_not.append("declines (slots = 0)")
            if not b.get("eligible", True):
                why_not.append("not an eligible member")
            free = b.get("free") or {}
            short = [k for k, n in need.items() if k in free and free[k] < n]
            if short:
                why_not.append("free < resources (" + ", ".join(short) + ")")
            bids.append(
                {
                    **b,
                    "rank": rank,
                    "counts": not why_not,
                    "why_not": "; ".join(why_not),
                    "score_hex": f"{b['score']:016x}",
                }
            )
        winners = {int(s): m for s, m in r["winners"].items()}
        shown = {s: m for s, m in winners.items() if slot is None or s == slot}
        rounds.append(
            {
                "round": r["round"],
                "slot": r["slot"],
                "bids": bids,
                "winners": [
                    {"slot": s, "meshletDid": m, "why": _why_won(bids, m)}
                    for s, m in sorted(shown.items())
                ],
                "rule": RULE_ROUND0 if r["round"] == 0 else RULE_REPLACEMENT,
                "offers": sum(1 for b in bids if b["slots"] >= 1),
                "declines": sum(1 for b in bids if b["slots"] < 1),
            }
        )
    return {
        "w": v,
        "slot": slot,
        "rounds": rounds,
        "rule_counts": RULE_COUNTS,
        "rule_fencing": RULE_FENCING,
        "need": need,
    }


def fairshare_page(node: Source) -> dict[str, Any]:
    """Per owner: what their meshlets lent, what their workloads used elsewhere (decayed
    milli-CPU seconds) and the resulting priority; bars for an inline SVG plot."""
    b = node.balance()
    owners = b.get("owners", [])
    top = max(
        [1]
        + [int(o.get("gaveMilliCpuSeconds", 0)) for o in owners]
        + [int(o.get("tookMilliCpuSeconds", 0)) for o in owners]
    )
    rows = []
    for i, o in enumerate(owners):
        gave, took = int(o.get("gaveMilliCpuSeconds", 0)), int(o.get("tookMilliCpuSeconds", 0))
        rows.append(
            {
                **o,
                "gave": gave,
                "took": took,
                "priority": o.get("priority", 0),
                "y": 8 + i * 34,
                "gave_w": round(300 * gave / top),
                "took_w": round(300 * took / top),
            }
        )
    history = usage_history(node)
    return {
        "balance": b,
        "rows": rows,
        "svg_height": 16 + 34 * len(rows),
        "plots": history_plots(history, [str(o.get("ownerDid", "")) for o in owners]),
        "periods": len(history),
        "first_period": _stamp(history[0]["start"]) if history else "",
        "last_period": _stamp(history[-1]["end"]) if history else "",
        "plot": {"w": PLOT_W, "h": PLOT_H, "left": PLOT_LEFT, "top": PLOT_TOP},
    }


HISTORY_PERIODS = 48  # the plot shows at most this many recent usage periods
PLOT_W, PLOT_H, PLOT_LEFT, PLOT_TOP = 560, 110, 70, 10


def usage_history(node: Source) -> list[dict[str, Any]]:
    """Per period (`[periodStart, periodEnd)` of the usage records this meshlet holds), what
    each owner lent (their meshlets hosted others' work) and used (their work ran on others'
    meshlets), in milli-CPU seconds of that period, not decayed. The same accounting as the
    ledger (core/fairshare.py `balances`): use on one's own meshlet counts as neither, a
    meshlet whose owner is unknown is left out. Records are grouped by period start (the
    core aligns periods to the usage period length), oldest first."""
    read = getattr(node, "read", None)
    followed, view = getattr(read, "followed", None), getattr(read, "view", None)
    if read is None or followed is None or view is None:
        return []
    owner_of = {m: rec.owner for m, rec in view.owners.items()}
    length = max(1, int(read.local.cfg.scheduling.usage_period_ms))
    periods: dict[int, dict[str, Any]] = {}
    for u in followed.usages.values():
        host = owner_of.get(u.meshlet)
        if host is None:
            continue
        start = u.period_start - u.period_start % length
        p = periods.setdefault(start, {"start": start, "end": start, "lent": {}, "used": {}})
        p["end"] = max(p["end"], u.period_end)
        for e in u.entries:
            if e.owner == host:
                continue
            p["used"][e.owner] = p["used"].get(e.owner, 0) + e.milli_cpu_seconds
            p["lent"][host] = p["lent"].get(host, 0) + e.milli_cpu_seconds
    return [periods[k] for k in sorted(periods)][-HISTORY_PERIODS:]


def _stamp(ms: int) -> str:
    from meshletd.core.records import format_datetime_ms

    return format_datetime_ms(ms)[:16].replace("T", " ")


def history_plots(history: list[dict[str, Any]], owners: list[str]) -> list[dict[str, Any]]:
    """One small plot per owner over `usage_history`: lent and used per period as two
    polylines (SVG points computed here; the template escapes every label)."""
    if not history:
        return []
    n = len(history)
    step = (PLOT_W - PLOT_LEFT - 10) / max(1, n - 1)
    plots = []
    for owner in owners:
        lent = [int(p["lent"].get(owner, 0)) for p in history]
        used = [int(p["used"].get(owner, 0)) for p in history]
        top = max([1, *lent, *used])

        def y(v: int, top: int = top) -> float:
            return round(PLOT_TOP + (PLOT_H - 2 * PLOT_TOP) * (1 - v / top), 1)

        def points(values: list[int]) -> str:
            return " ".join(f"{PLOT_LEFT + i * step:.1f},{y(v):.1f}" for i, v in enumerate(values))

        plots.append(
            {
                "ownerDid": owner,
                "top": top,
                "lent_points": points(lent),
                "used_points": points(used),
                "lent_total": sum(lent),
                "used_total": sum(used),
                "dots": [
                    {
                        "x": round(PLOT_LEFT + i * step, 1),
                        "start": _stamp(p["start"]),
                        "end": _stamp(p["end"]),
                        "lent": lent[i],
                        "used": used[i],
                        "lent_y": y(lent[i]),
                        "used_y": y(used[i]),
                    }
                    for i, p in enumerate(history)
                ],
            }
        )
    return plots
