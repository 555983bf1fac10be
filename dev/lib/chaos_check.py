"""dev/chaos's invariant checker: pure functions over what the runner observed.

The runner (dev/lib/chaos_run.py) records
- `Snapshot`s: at time `t` (this machine's CLOCK_MONOTONIC, which the booted hosts share),
  each host's meshletd (main PID, restart count) and replica units (which workload and slot,
  when systemd marked the unit active, the container's id and start time);
- the workload churn (`Workload`: created and deleted when, how many slots, job or service);
- the faults as applied (`Applied`: a chaos_plan.Fault with the times it really began and
  healed);
- job completions a finished job reported itself (`Completion`, by container id);
- the PDS records at the end (`Final`).

`check(...)` returns the issue's report: violations (what, when), the longest time a slot ran
on two meshlets, failover times, lost writes and unscheduled daemon exits. No clock, no I/O.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from chaos_plan import Bounds, Fault, recovery_bound

FENCE_S = 60.0  # docs/protocol.md section 3
ANTI_ENTROPY_S = 30.0
SETTLE_S = 2.0
FIRST_PLACEMENT_S = 25.0  # a new workload: round-0 window, settle, image start (+ load)
STOP_GRACE_S = 15.0
# A job's published completion reaches every meshlet within G (1.5 s) + S: a copy started
# later than this after the runner first read it on a PDS was started against it.
PUBLISHED_SLACK_S = 1.75  # a deleted workload's replicas stop within this (a loaded machine)


@dataclass(frozen=True)
class Replica:
    unit: str
    uri: str  # the workload's at:// URI
    slot: int
    active_since: float  # systemd's ActiveEnterTimestampMonotonic, in seconds
    container: str = ""  # podman's container id ("" when podman did not list it yet)
    started: str = ""  # the container's start time as podman reports it


@dataclass(frozen=True)
class HostView:
    person: str
    ok: bool  # False: the host could not be read (down, or the read failed)
    boot: int = 0  # identifies one boot of the host (its leader PID)
    daemon_pid: int = 0
    daemon_restarts: int = 0
    daemon_state: str = ""
    replicas: tuple[Replica, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    t: float
    hosts: dict[str, HostView]


@dataclass(frozen=True)
class Workload:
    uri: str
    owner: str  # the person who published it
    slots: int
    job: bool
    created: float  # when `meshletctl run` returned
    deleted: float | None = None  # when `meshletctl stop` was asked (and returned)
    # `meshletctl stop` failed (e.g. the owner's PDS was down). meshletd does not queue an
    # owner's delete: it landed only if the PDS applied it before the error (a timeout), so
    # `check` treats the workload as live when its record is still there at the end.
    stop_failed: bool = False


@dataclass(frozen=True)
class Applied:
    fault: Fault
    began: float  # monotonic, just before the fault was injected
    healed: float  # monotonic, once it was undone (== began for instant faults)


@dataclass(frozen=True)
class Completion:
    uri: str
    container: str
    t: float


@dataclass(frozen=True)
class Status:
    meshlet: str  # the person whose meshlet wrote it
    uri: str
    slot: int
    state: str
    round: int = 0


@dataclass(frozen=True)
class Final:
    """The records on the PDSes at the end, read after the quiet tail."""

    workloads: frozenset[str]  # URIs of the workload records that exist
    statuses: tuple[Status, ...]


@dataclass
class Violation:
    what: str
    when: float  # seconds after the churn began

    def as_json(self) -> dict[str, Any]:
        return {"what": self.what, "when_s": round(self.when, 1)}


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    max_overreplication_s: float = 0.0
    failovers: list[float] = field(default_factory=list)
    failovers_nat: list[float] = field(default_factory=list)
    lost_writes: int = 0
    daemon_crashes: int = 0
    recoveries: list[tuple[str, float | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pct(xs: Iterable[float], p: float) -> float | None:
    """The p-th percentile (nearest rank), None for no samples."""
    s = sorted(xs)
    if not s:
        return None
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * p / 100) - 1))]


# -- helpers over snapshots ------------------------------------------------------------------


def _running(s: Snapshot) -> dict[tuple[str, int], set[str]]:
    """(uri, slot) -> the people whose host runs a replica of it in `s`."""
    out: dict[tuple[str, int], set[str]] = defaultdict(set)
    for h in s.hosts.values():
        if h.ok:
            for r in h.replicas:
                out[(r.uri, r.slot)].add(h.person)
    return out


def _complete(s: Snapshot, up: Iterable[str]) -> bool:
    return all(s.hosts.get(p) is not None and s.hosts[p].ok for p in up)


def desired_slots(
    t: float, workloads: Sequence[Workload], done_jobs: dict[str, float]
) -> set[tuple[str, int]]:
    """Slots that must run at `t`: workloads published long enough ago, not deleted, not a
    job that already finished."""
    out: set[tuple[str, int]] = set()
    for w in workloads:
        if w.created + FIRST_PLACEMENT_S > t or (w.deleted is not None and w.deleted <= t):
            continue
        if w.job and w.uri in done_jobs and done_jobs[w.uri] <= t:
            continue
        out.update((w.uri, s) for s in range(w.slots))
    return out


# -- the invariants ------------------------------------------------------------------------


def over_replication(
    snaps: Sequence[Snapshot],
    workloads: Sequence[Workload],
    bound_s: float,
    t0: float,
    notes: list[str] | None = None,
) -> tuple[float, list[Violation]]:
    """Longest stretch a slot ran on two hosts at once, and the stretches beyond `bound_s`."""
    notes = [] if notes is None else notes
    deleted = {w.uri: w.deleted for w in workloads if w.deleted is not None}
    since: dict[tuple[str, int], float] = {}
    longest: dict[tuple[str, int], float] = {}
    for s in snaps:
        running = _running(s)
        for key, hosts in running.items():
            gone = deleted.get(key[0])
            if len(hosts) >= 2 and not (gone is not None and gone <= s.t):
                start = since.setdefault(key, s.t)
                longest[key] = max(longest.get(key, 0.0), s.t - start)
            else:
                since.pop(key, None)
        for key in [k for k in since if k not in running]:
            since.pop(key)
    worst = max(longest.values(), default=0.0)
    if worst > 0:
        (u, sl), _ = max(longest.items(), key=lambda kv: kv[1])
        notes.append(f"longest over-replication: {u.rsplit('/', 1)[-1]}#{sl} {worst:.1f} s")
    out = [
        Violation(f"slot {u}#{sl} ran on two meshlets for {d:.1f} s (bound {bound_s:.0f} s)", 0)
        for (u, sl), d in sorted(longest.items())
        if d > bound_s
    ]
    return worst, out


def recovery(
    snaps: Sequence[Snapshot],
    faults: Sequence[Applied],
    workloads: Sequence[Workload],
    done_jobs: dict[str, float],
    nat: Sequence[str],
    bounds: Bounds,
    t0: float,
) -> tuple[list[tuple[str, float | None]], list[Violation]]:
    """After each fault, every desired slot runs again within the fault's recovery bound:
    held at the first snapshot that read every up host after the deadline."""
    out: list[Violation] = []
    times: list[tuple[str, float | None]] = []
    for a in faults:
        f = a.fault
        start = a.began if f.kind == "power-off" else a.healed
        deadline = start + recovery_bound(f, nat, bounds)
        # the first moment every slot desired at the deadline ran (for the figures)
        need_at_deadline = desired_slots(deadline, workloads, done_jobs)
        first_ok = None
        checked = False
        for s in snaps:
            if s.t < start:
                continue
            up = [p for p, h in s.hosts.items() if h.ok]
            running = _running(s)
            need = desired_slots(s.t, workloads, done_jobs) & need_at_deadline
            missing = sorted(k for k in need if not running.get(k))
            if not missing and first_ok is None:
                first_ok = s.t - start
            if s.t >= deadline and _complete(s, up) and not checked:
                checked = True
                if missing:
                    names = ", ".join(f"{u.rsplit('/', 1)[1]}#{sl}" for u, sl in missing[:5])
                    out.append(
                        Violation(
                            f"after {f.describe()}: {len(missing)} slot(s) not running "
                            f"{s.t - start:.1f} s after it healed (bound "
                            f"{deadline - start:.0f} s): {names}",
                            s.t - t0,
                        )
                    )
            if checked and first_ok is not None:
                break
        times.append((f.describe(), first_ok))
    return times, out


def failovers(
    snaps: Sequence[Snapshot],
    faults: Sequence[Applied],
    done_jobs: dict[str, float],
    workloads: Sequence[Workload] = (),
) -> tuple[list[float], list[str]]:
    """For each power-off: per slot its host ran (and no one else did), seconds until a
    replica of it was active again (systemd's activation time); and the slots never seen
    running again (a workload its owner deleted before that counts as neither)."""
    deleted = {w.uri: w.deleted for w in workloads if w.deleted is not None}
    samples: list[float] = []
    missing: list[str] = []
    for a in faults:
        f = a.fault
        if f.kind != "power-off":
            continue
        before = [s for s in snaps if s.t <= a.began and s.hosts.get(f.target, None)]
        before = [s for s in before if s.hosts[f.target].ok]
        if not before:
            continue
        last = before[-1]
        running = _running(last)
        lost = [k for k, hosts in running.items() if hosts == {f.target} and k[0] not in done_jobs]
        for key in lost:
            found = None
            for s in snaps:
                if s.t <= a.began:
                    continue
                for h in s.hosts.values():
                    if not h.ok:
                        continue
                    for r in h.replicas:
                        if (r.uri, r.slot) == key and r.active_since > a.began:
                            found = r.active_since
                if found is not None:
                    break
            gone = deleted.get(key[0])
            if gone is not None and (found is None or gone < found):
                continue
            if found is None:
                if key[0] not in done_jobs:
                    missing.append(f"{key[0].rsplit('/', 1)[1]}#{key[1]} after {f.describe()}")
            else:
                samples.append(found - a.began)
    return samples, missing


def daemon_exits(
    snaps: Sequence[Snapshot], faults: Sequence[Applied], t0: float, slack_s: float = 3.0
) -> list[Violation]:
    """meshletd exits on a host (a new main PID or a restart counted within one boot) that no
    scheduled kill -9 explains."""
    kills: dict[str, list[float]] = defaultdict(list)
    for a in faults:
        if a.fault.kind == "kill-daemon":
            kills[a.fault.target].append(a.began)
    out = []
    prev: dict[str, HostView] = {}
    prev_t: dict[str, float] = {}
    for s in snaps:
        for p, h in s.hosts.items():
            if not h.ok:
                continue
            q = prev.get(p)
            if q is not None and q.boot == h.boot:
                restarted = h.daemon_restarts > q.daemon_restarts or (
                    h.daemon_pid != q.daemon_pid and q.daemon_pid and h.daemon_pid
                )
                if restarted:
                    lo = prev_t[p] - slack_s
                    explained = [k for k in kills[p] if lo <= k <= s.t]
                    if explained:
                        kills[p].remove(explained[0])
                    else:
                        out.append(
                            Violation(
                                f"meshletd on {p} exited unscheduled (pid {q.daemon_pid} -> "
                                f"{h.daemon_pid}, restarts {q.daemon_restarts} -> "
                                f"{h.daemon_restarts})",
                                s.t - t0,
                            )
                        )
            if h.daemon_state == "failed":
                out.append(Violation(f"meshletd on {p} is failed", s.t - t0))
            prev[p] = h
            prev_t[p] = s.t
    return out


def replica_disturbances(
    snaps: Sequence[Snapshot],
    workloads: Sequence[Workload],
    t0: float,
) -> list[Violation]:
    """A replica (unit + container) that stopped or restarted while its host stayed up,
    without the owner deleting the workload, the replica exiting by itself (a job), or the
    slot moving to another meshlet (make-before-break: another host ran the slot first, or
    within a few seconds)."""
    by_uri = {w.uri: w for w in workloads}
    out = []
    seen: dict[tuple[str, str], tuple[Replica, float, int]] = {}  # (host, unit) -> last seen
    ran_on: dict[tuple[str, int], list[tuple[float, str]]] = defaultdict(list)
    for s in snaps:
        for (u, sl), hosts in _running(s).items():
            for p in hosts:
                ran_on[(u, sl)].append((s.t, p))

    def moved(key: tuple[str, int], host: str, since: float, until: float) -> bool:
        return any(
            p != host and since - FENCE_S <= t <= until + STOP_GRACE_S
            for t, p in ran_on.get(key, ())
        )

    def explained(r: Replica, host: str, first: float, t: float) -> bool:
        w = by_uri.get(r.uri)
        if w is None or w.job:
            return True  # jobs end by themselves; unknown workloads are not the churn's
        if w.deleted is not None and w.deleted <= t + 1:
            return True
        return moved((r.uri, r.slot), host, first, t)

    first_seen: dict[tuple[str, str, str], float] = {}
    for s in snaps:
        for p, h in s.hosts.items():
            if not h.ok:
                continue
            now = {r.unit: r for r in h.replicas}
            for (host, unit), (r, _, boot) in list(seen.items()):
                if host != p:
                    continue
                if boot != h.boot:
                    seen.pop((host, unit))  # powered off: a new disk, nothing carries over
                    continue
                cur = now.get(unit)
                ident = (host, unit, r.container or str(r.active_since))
                first = first_seen.get(ident, s.t)
                if cur is None:
                    if not explained(r, p, first, s.t):
                        out.append(
                            Violation(
                                f"replica {unit} on {p} stopped (slot {r.slot} of "
                                f"{r.uri.rsplit('/', 1)[1]}) with no owner stop, exit or move",
                                s.t - t0,
                            )
                        )
                    seen.pop((host, unit))
                elif (cur.active_since != r.active_since) or (
                    r.container and cur.container and cur.container != r.container
                ):
                    if not explained(r, p, first, s.t):
                        out.append(
                            Violation(
                                f"replica {unit} on {p} restarted (container "
                                f"{r.container[:12]} started {r.started} -> "
                                f"{cur.container[:12]} started {cur.started})",
                                s.t - t0,
                            )
                        )
            for unit, r in now.items():
                prev = seen.get((p, unit))
                if prev is not None and not r.container and prev[0].container:
                    r = prev[0]  # podman missed it this time: keep what we knew
                seen[(p, unit)] = (r, s.t, h.boot)
                first_seen.setdefault((p, unit, r.container or str(r.active_since)), s.t)
    return out


def jobs(
    workloads: Sequence[Workload],
    completions: Sequence[Completion],
    final: Final | None,
    end: float,
    job_s: float,
    t0: float,
    snaps: Sequence[Snapshot] = (),
    published: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> tuple[dict[str, float], list[Violation]]:
    """Every job ran to completion (it reported itself, or its `succeeded` status is on the
    PDS), and no job was started again after its completion was published (docs/protocol.md
    section 10: jobs run at least once; `published` = when the runner first read a terminal
    status of the job on a PDS; a replica started more than `PUBLISHED_SLACK_S` later is a
    violation). A job completed by two containers is counted in `notes` (at least once
    allows it). Returns when each job first completed."""
    published = published or {}
    notes = [] if notes is None else notes
    done: dict[str, float] = {}
    who: dict[str, set[str]] = defaultdict(set)
    for c in sorted(completions, key=lambda c: c.t):
        done.setdefault(c.uri, c.t)
        who[c.uri].add(c.container)
    succeeded = {st.uri for st in (final.statuses if final else ()) if st.state == "succeeded"}
    started: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for s in snaps:
        for p, h in s.hosts.items():
            if h.ok:
                for r in h.replicas:
                    started[r.uri].append((r.active_since, p))
    out = []
    twice = 0
    for w in workloads:
        if not w.job:
            continue
        name = w.uri.rsplit("/", 1)[1]
        if len(who[w.uri]) > 1:
            twice += 1
        at = published.get(w.uri)
        if at is not None:
            late = sorted({(t, p) for t, p in started[w.uri] if t > at + PUBLISHED_SLACK_S})
            if late:
                t, p = late[0]
                out.append(
                    Violation(
                        f"job {name} started again on {p} {t - at:.1f} s after its completion "
                        "was published",
                        t - t0,
                    )
                )
        if w.deleted is not None and w.uri not in done:
            continue  # the churn stopped it
        if w.uri not in done and w.uri not in succeeded and w.created + job_s + 120 < end:
            out.append(Violation(f"job {name} never ran to completion", end - t0))
    if twice:
        notes.append(f"jobs completed by two or more containers (at least once): {twice}")
    return done, out


def lost_writes(
    last: Snapshot | None,
    workloads: Sequence[Workload],
    done_jobs: dict[str, float],
    final: Final | None,
    end: float,
    t0: float,
) -> list[Violation]:
    """At the end, after the quiet tail: every record meshletd meant to write is there.
    - a workload `meshletctl run` published exists, one `meshletctl stop` deleted does not;
    - a replica running on a meshlet has that meshlet's `running` status;
    - a job that completed has a `succeeded` status;
    - no status is left for a workload whose record is gone (the delete was meant too)."""
    if final is None or last is None:
        return [Violation("the final records could not be read", end - t0)]
    out = []

    def lost(what: str) -> None:
        out.append(Violation(f"lost write: {what}", end - t0))

    for w in workloads:
        name = w.uri.rsplit("/", 1)[1]
        if w.deleted is None and w.uri not in final.workloads:
            lost(f"workload {name} published by {w.owner} is not on the PDS")
        if w.deleted is not None and w.uri in final.workloads and not w.stop_failed:
            lost(f"workload {name} deleted by {w.owner} is still on the PDS")
    statuses = {(st.meshlet, st.uri, st.slot): st for st in final.statuses}
    deleted = {w.uri for w in workloads if w.deleted is not None}
    for p, h in last.hosts.items():
        if not h.ok:
            continue
        for r in h.replicas:
            if r.uri in deleted:
                continue
            st = statuses.get((p, r.uri, r.slot))
            if st is None or st.state not in ("running", "succeeded"):
                lost(
                    f"{p} runs {r.uri.rsplit('/', 1)[1]}#{r.slot} but its status says "
                    f"{st.state if st else 'nothing'}"
                )
    for uri in done_jobs:
        if uri in deleted:
            continue
        if not any(st.uri == uri and st.state == "succeeded" for st in final.statuses):
            lost(f"job {uri.rsplit('/', 1)[1]} completed but no `succeeded` status")
    for st in final.statuses:
        if st.uri in deleted and st.uri not in final.workloads:
            lost(f"{st.meshlet}'s status of deleted {st.uri.rsplit('/', 1)[1]}#{st.slot}")
    return out


def lived_on(
    workloads: Sequence[Workload], final: Final | None, notes: list[str]
) -> list[Workload]:
    """A `meshletctl stop` that failed (its owner's PDS unreachable: meshletctl said so and
    nothing queues it) and whose record is still on the PDS at the end deleted nothing: the
    workload lived on, and every invariant holds for it, as for any live one. (Counted as
    deleted, its replicas were invisible to the checker from the failed stop on.)"""
    if final is None:
        return list(workloads)
    out = []
    kept = 0
    for w in workloads:
        if w.stop_failed and w.deleted is not None and w.uri in final.workloads:
            w = replace(w, deleted=None, stop_failed=False)
            kept += 1
        out.append(w)
    if kept:
        notes.append(f"workloads whose stop failed and that lived on (checked as live): {kept}")
    return out


def check(
    snaps: Sequence[Snapshot],
    workloads: Sequence[Workload],
    faults: Sequence[Applied],
    completions: Sequence[Completion],
    final: Final | None,
    *,
    nat: Sequence[str],
    bounds: Bounds,
    t0: float,
    end: float,
    job_s: float,
    published: dict[str, float] | None = None,
) -> Report:
    """Every invariant of the issue over one run."""
    rep = Report()
    workloads = lived_on(workloads, final, rep.notes)
    done, v_jobs = jobs(workloads, completions, final, end, job_s, t0, snaps, published, rep.notes)
    longest_cut = max(
        (a.healed - a.began for a in faults if a.fault.kind in ("cut", "cut-both", "cut-pds")),
        default=0.0,
    )
    bound = longest_cut + ANTI_ENTROPY_S + FENCE_S + SETTLE_S
    rep.max_overreplication_s, v_over = over_replication(snaps, workloads, bound, t0, rep.notes)
    rep.recoveries, v_rec = recovery(snaps, faults, workloads, done, nat, bounds, t0)
    reach: list[float] = []
    natted: list[float] = []
    nat_faults = [a for a in faults if a.fault.target in nat]
    other = [a for a in faults if a.fault.target not in nat]
    reach, miss_a = failovers(snaps, other, done, workloads)
    natted, miss_b = failovers(snaps, nat_faults, done, workloads)
    rep.failovers, rep.failovers_nat = reach, natted
    v_miss = [Violation(f"slot never ran again: {m}", end - t0) for m in miss_a + miss_b]
    v_daemon = daemon_exits(snaps, faults, t0)
    rep.daemon_crashes = len(v_daemon)
    v_rep = replica_disturbances(snaps, workloads, t0)
    v_lost = lost_writes(snaps[-1] if snaps else None, workloads, done, final, end, t0)
    rep.lost_writes = len(v_lost)
    rep.violations = sorted(
        v_over + v_rec + v_miss + v_daemon + v_rep + v_jobs + v_lost, key=lambda v: v.when
    )
    return rep
