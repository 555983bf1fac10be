"""dev/chaos --seed N --minutes M [--hosts 4] [--nat K]: the real stack under faults.

Brings up the local atproto network (dev/devnet) and a commune of HOSTS meshlets on booted
hosts with their own addresses (tests/system/commune.py; the first K behind NAT), keeps a
workload churn going (services and jobs published and stopped by every owner), injects the
fault schedule `chaos_plan.plan(seed, ...)` (reproducible from the seed) and observes every
host's meshletd and replica units every few seconds. At the end it reads the PDS records and
hands everything to the invariant checker (chaos_check.py). Last line: one JSON object.

Jobs report their own completion: the container's last step is an HTTP GET to a small
server on the network's gateway, naming the job and the container (its hostname), so a job
run to completion twice is seen even when the host that ran it first is gone.

The hosts behind NAT renew their lease every `--lease-renew` s (default 4) and it is valid
`--lease-valid` s (default 20; meshletd wants at least renew + 15 s), as in
tests/system/test_commune_nat.py, so that a run of a few minutes sees lease-based
failovers; the bound follows (docs/protocol.md section 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import random
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from chaos_check import (  # noqa: E402
    Applied,
    Completion,
    Final,
    HostView,
    Replica,
    Snapshot,
    Status,
    Workload,
    check,
    pct,
)
from chaos_plan import Bounds, Fault, plan  # noqa: E402

from meshletd.runtime.naming import workload_tag  # noqa: E402
from tests.system.commune import (  # noqa: E402
    MORE_PEOPLE,
    PEOPLE,
    UNIT,
    Commune,
    commune_session,
    wait_for,
)

IMAGE = "localhost/busybox:latest"
WORKLOAD = "commune.scheduler.workload"
STATUS = "commune.scheduler.workloadStatus"
UNIT_RE = re.compile(r"^meshlet-.+-(?P<rkey>[^-]+)-(?P<slot>\d+)-(?P<tag>[0-9a-f]{32})\.service$")
PROBE = str(HERE / "chaos_probe.py")
SNAPSHOT_EVERY_S = 2.0
JOB_S = 15  # how long a job runs
MAX_REPLICAS = 10  # live replicas the churn keeps at most (4 hosts x 8 would fit)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the job witness -------------------------------------------------------------------------


class Witness:
    """An HTTP server on the gateway: GET /done/<job name>/<container> records a completion."""

    def __init__(self, host: str) -> None:
        self.hits: list[tuple[str, str, float]] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "done":
                    hits.append((parts[1], parts[2], time.monotonic()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# -- what the runner shares between its threads --------------------------------------------


@dataclass
class World:
    commune: Commune
    people: list[str]
    nat: list[str]
    t0: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    snaps: list[Snapshot] = field(default_factory=list)
    workloads: dict[str, Workload] = field(default_factory=dict)  # by URI
    by_unit_key: dict[tuple[str, str], str] = field(default_factory=dict)  # (rkey, tag) -> uri
    jobs_by_name: dict[str, str] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    powered_off: set[str] = field(default_factory=set)
    published: dict[str, float] = field(default_factory=dict)  # job uri -> first seen done
    stop: threading.Event = field(default_factory=threading.Event)

    def add_workload(self, w: Workload, name: str) -> None:
        did, _, rkey = w.uri.removeprefix("at://").partition("/")
        rkey = rkey.rsplit("/", 1)[1]
        with self.lock:
            self.workloads[w.uri] = w
            self.by_unit_key[(rkey, workload_tag(did, rkey))] = w.uri
            if w.job:
                self.jobs_by_name[name] = w.uri


# -- observing -------------------------------------------------------------------------------


def read_host(world: World, person: str) -> HostView:
    c = world.commune
    if person in world.powered_off or not c.is_up(person):
        return HostView(person, ok=False)
    m = c[person]
    try:
        boot = m.host.leader_pid
        done = m.run("python3", PROBE, timeout=30)
        if done.returncode != 0:
            return HostView(person, ok=False)
        got = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception:
        return HostView(person, ok=False)
    if person in world.powered_off:
        return HostView(person, ok=False)
    replicas = []
    for u in got["units"]:
        hit = UNIT_RE.match(u["unit"])
        if not hit:
            continue
        uri = world.by_unit_key.get((hit["rkey"], hit["tag"]), f"unknown:{hit['rkey']}")
        replicas.append(
            Replica(
                u["unit"],
                uri,
                int(hit["slot"]),
                u["since"] / 1e6,
                u.get("container", ""),
                u.get("started", ""),
            )
        )
    return HostView(
        person,
        True,
        boot,
        got["daemon_pid"],
        got["daemon_restarts"],
        got["daemon_state"],
        tuple(replicas),
    )


def read_published(world: World, person: str, t: float) -> None:
    """Note when a terminal status (a job's completion) is first seen on person's PDS."""
    m = world.commune[person]
    try:
        recs = list_records(m.mesh.pds_url, m.did, STATUS, timeout=5)
    except Exception:
        return  # that PDS is down or cut: read again next time
    with world.lock:
        for r in recs:
            v = r["value"]
            if v.get("state") in ("succeeded", "failed"):
                world.published.setdefault(v["workload"]["uri"], t)


def observe(world: World) -> None:
    with ThreadPoolExecutor(len(world.people)) as pool:
        while not world.stop.is_set():
            t = time.monotonic()
            views = list(pool.map(lambda p: read_host(world, p), world.people))
            snap = Snapshot(t, {v.person: v for v in views})
            with world.lock:
                world.snaps.append(snap)
            seen = time.monotonic()
            list(pool.map(lambda p, at=seen: read_published(world, p, at), world.people))
            world.stop.wait(max(0.0, SNAPSHOT_EVERY_S - (time.monotonic() - t)))


# -- the workload churn ----------------------------------------------------------------------


def churn(world: World, rng: random.Random, witness: Witness, until: float) -> None:
    """Every few seconds one owner publishes a service or a job, or stops a service."""
    c = world.commune
    n = 0
    while not world.stop.is_set() and time.monotonic() < until:
        world.stop.wait(rng.uniform(4, 10))
        owner = rng.choice(world.people)
        if owner in world.powered_off or not c.is_up(owner):
            continue
        now = time.monotonic()
        with world.lock:
            live = [w for w in world.workloads.values() if w.deleted is None]
        services = [w for w in live if not w.job]
        replicas = sum(w.slots for w in services) + sum(
            1 for w in live if w.job and now - w.created < JOB_S + 60
        )
        mine = [w for w in services if w.owner == owner and now - w.created > 60]
        roll = rng.random()
        n += 1
        try:
            if mine and (roll < 0.3 or replicas >= MAX_REPLICAS):
                w = rng.choice(mine)
                asked = time.monotonic()
                failed = False
                try:
                    c[owner].ctl_json("stop", w.uri, timeout=60)
                except Exception as e:
                    log(f"churn: {owner}: stop failed: {' '.join(str(e).split())[:300]}")
                    if "DaemonUnavailable" in str(e):
                        continue  # nothing was asked of meshletd: it is still wanted
                    failed = True  # it may or may not be deleted (the owner wanted it)
                with world.lock:
                    world.workloads[w.uri] = Workload(
                        w.uri, w.owner, w.slots, w.job, w.created, asked, failed
                    )
            elif replicas >= MAX_REPLICAS:
                continue
            elif roll < 0.65:
                slots = rng.choice((1, 1, 2))
                name = f"svc{n}"
                out = c[owner].ctl_json(
                    "run", "--name", name, "--replicas", str(slots), "--cpu", "50",
                    "--memory", "16", IMAGE, "--", "sleep", "1000000", timeout=60,
                )  # fmt: skip
                world.add_workload(
                    Workload(out["uri"], owner, slots, False, time.monotonic()), name
                )
            else:
                name = f"job{n}"
                report = (
                    f"sleep {JOB_S}; for i in 1 2 3 4 5 6 7 8 9 10; do "
                    f"wget -q -O /dev/null {witness.url}/done/{name}/$(hostname) && exit 0; "
                    "sleep 2; done; exit 0"
                )
                out = c[owner].ctl_json(
                    "run", "--name", name, "--kind", "job", "--restart", "never", "--cpu", "50",
                    "--memory", "16", IMAGE, "--", "sh", "-c", report, timeout=60,
                )  # fmt: skip
                world.add_workload(Workload(out["uri"], owner, 1, True, time.monotonic()), name)
        except Exception as e:  # the owner's PDS or meshletd may be down: a real failure
            log(f"churn: {owner}: {' '.join(str(e).split())[:400]}")


# -- faults ----------------------------------------------------------------------------------


def inject(world: World, f: Fault) -> Applied:
    """Apply `f`, wait its duration, undo it; the times it really began and healed."""
    c = world.commune
    began = time.monotonic()
    if f.kind in ("cut", "cut-both"):
        c.cut(f.target, f.peer, both=f.kind == "cut-both")
        time.sleep(f.duration)
        c.heal(f.target, f"cut-to-{c[f.peer].host.name}")
        if f.kind == "cut-both":
            c.heal(f.peer, f"cut-to-{c[f.target].host.name}")
    elif f.kind == "cut-pds":
        c.cut_from_pds(f.target)
        time.sleep(f.duration)
        port = c.devnet.pds_port(c.devnet.pds_index(c[f.target].mesh.pds_url))
        c.heal(f.target, f"cut-port-{port}")
    elif f.kind == "stop-pds":
        c.stop_pds(f.target)
        time.sleep(f.duration)
        c.start_pds(f.target)
    elif f.kind == "kill-firehose":
        c.kill_firehoses()
    elif f.kind == "kill-daemon":
        c[f.target].run("systemctl", "kill", "--kill-who=main", "-s", "KILL", UNIT, timeout=60)
    elif f.kind == "power-off":
        # A pulled plug sends nothing more: the host's links to its peers are cut first, so
        # no FIN or RST of its dying processes tells a peer (dev/hostenv's abrupt power-off
        # kills the processes before it removes the network, and the kernel closes their
        # connections meanwhile). The peers' probes then meet what a real power loss gives.
        world.powered_off.add(f.target)
        began = time.monotonic()
        with ThreadPoolExecutor(len(world.people)) as pool:  # all at once: one call's time
            list(
                pool.map(
                    lambda p: c[f.target].host.cut_link(c[p].host),
                    [p for p in world.people if p != f.target],
                )
            )
        c.power_off(f.target)
        time.sleep(f.duration)
        try:
            c.power_on(f.target)
        finally:
            world.powered_off.discard(f.target)
    else:
        raise ValueError(f"unknown fault {f.kind}")
    return Applied(f, began, time.monotonic())


# -- the end: records on the PDSes ---------------------------------------------------------


def list_records(
    pds_url: str, repo: str, collection: str, timeout: float = 20
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = ""
    while True:
        q = {"repo": repo, "collection": collection, "limit": "100"}
        if cursor:
            q["cursor"] = cursor
        url = f"{pds_url}/xrpc/com.atproto.repo.listRecords?{urllib.parse.urlencode(q)}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            page = json.load(r)
        out += page.get("records", [])
        cursor = page.get("cursor") or ""
        if not cursor or not page.get("records"):
            return out


def read_final(world: World) -> Final:
    c = world.commune
    uris: set[str] = set()
    statuses = []
    for p in world.people:
        m = c[p]
        uris.update(r["uri"] for r in list_records(m.owner.pds_url, m.owner_did, WORKLOAD))
        for r in list_records(m.mesh.pds_url, m.did, STATUS):
            v = r["value"]
            statuses.append(
                Status(p, v["workload"]["uri"], int(v["slot"]), v["state"], int(v["round"]))
            )
    return Final(frozenset(uris), tuple(statuses))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dev/chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--nat", type=int, default=1, help="how many hosts are behind NAT")
    ap.add_argument("--lease-renew", type=float, default=4.0)
    ap.add_argument("--lease-valid", type=float, default=20.0)
    ap.add_argument("--plan", action="store_true", help="print the schedule and exit")
    ap.add_argument("--record", help="save what the run observed (JSON) in this file")
    ap.add_argument("--recheck", metavar="FILE", help="check a saved run again, run nothing")
    ap.add_argument("--logs", help="save each host's meshletd journal in this folder at the end")
    a = ap.parse_args(argv)
    if a.recheck:
        return report(Record.load(a.recheck))
    if a.seed is None or a.minutes is None:
        ap.error("--seed and --minutes are required")
    if a.hosts < 2 or a.hosts > len(PEOPLE) + len(MORE_PEOPLE):
        ap.error("--hosts must be 2..8")
    people = list((PEOPLE + MORE_PEOPLE)[: a.hosts])
    nat = people[len(people) - a.nat :] if a.nat else []
    bounds = Bounds(lease_valid_s=a.lease_valid)
    faults = plan(a.seed, a.minutes, people, nat, bounds=bounds)
    if a.plan:
        for f in faults:
            print(f.describe())
        return 0
    log(f"seed {a.seed}: {len(faults)} faults over {a.minutes:g} min; {people}, NAT: {nat}")
    scheduling = {
        "lease_renew_ms": int(a.lease_renew * 1000),
        "lease_valid_ms": int(a.lease_valid * 1000),
    }
    names = [f"chaos-{p[:2]}-{os.getpid()}"[:31] for p in people]
    # Jobs report to the witness on the hosts' gateway, a LAN address: the hosts lend with
    # the `lan` grant (docs/protocol.md section 21; under the default, internet only, the
    # network rules drop those reports and no job completes: 0 in the full run of bbcca30).
    with commune_session(
        people=people,
        nat=nat,
        names=names,
        scheduling=scheduling,
        policy={"network": "lan"},
        trace=bool(a.logs),  # the rounds' bids and writes, in the journals kept
    ) as (
        devnet,
        commune,
    ):
        for m in commune:
            wait_for(
                lambda m=m: m.ctl_json("status")["members"] == len(people) - 1, 120, "the cluster"
            )
        world = World(commune, people, nat)
        for p in people:  # one steady service per owner, so the first fault finds replicas
            out = commune[p].ctl_json(
                "run", "--name", "steady", "--cpu", "50", "--memory", "16", IMAGE, "--",
                "sleep", "1000000", timeout=60,
            )  # fmt: skip
            world.add_workload(Workload(out["uri"], p, 1, False, time.monotonic()), "steady")
        gateway = devnet.host
        witness = Witness(gateway)
        rng = random.Random(a.seed * 7919 + 1)
        world.t0 = t0 = time.monotonic()
        end = t0 + a.minutes * 60
        observer = threading.Thread(target=observe, args=(world,), daemon=True)
        observer.start()
        churner = threading.Thread(
            target=churn, args=(world, rng, witness, end - 60 - JOB_S), daemon=True
        )
        churner.start()
        try:
            for f in faults:
                wait = t0 + f.at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                log(f"fault {f.describe()}")
                try:
                    world.applied.append(inject(world, f))
                except Exception as e:
                    world.errors.append(f"{f.describe()}: {e}")
                    log(f"fault {f.describe()} failed: {e}")
            time.sleep(max(0.0, end - time.monotonic()))
        finally:
            world.stop.set()
            churner.join(timeout=90)
            observer.join(timeout=60)
        world.stop.clear()
        if a.logs:
            Path(a.logs).mkdir(parents=True, exist_ok=True)
            for m in commune:
                if commune.is_up(m.person):
                    text = m.run(
                        "journalctl", "-u", UNIT, "--no-pager", "-o", "short-iso", timeout=120
                    ).stdout
                    (Path(a.logs) / f"{m.person}.journal").write_text(text)
                    # why anything is pending, as this meshlet sees it
                    text = m.ctl("workloads", "--all", timeout=120).stdout
                    (Path(a.logs) / f"{m.person}.workloads").write_text(text)
            # Each live workload's rounds and bids (declines too), as one meshlet sees them.
            seer = next((m for m in commune if commune.is_up(m.person)), None)
            with world.lock:
                live = [w.uri for w in world.workloads.values() if w.deleted is None]
            if seer is not None:
                detail = {}
                for uri in live:
                    done = seer.ctl("bids", "--json", uri, timeout=60)
                    detail[uri] = done.stdout if done.returncode == 0 else done.stderr
                (Path(a.logs) / f"{seer.person}.bids.json").write_text(json.dumps(detail))
        last = Snapshot(time.monotonic(), {p: read_host(world, p) for p in people})
        world.snaps.append(last)
        try:
            final: Final | None = read_final(world)
        except Exception as e:
            world.errors.append(f"reading the final records: {e}")
            final = None
        witness.close()
        completions = [
            Completion(world.jobs_by_name[n], cid, t)
            for n, cid, t in witness.hits
            if n in world.jobs_by_name
        ]
        record = Record(
            world.snaps,
            list(world.workloads.values()),
            world.applied,
            completions,
            final,
            nat,
            bounds,
            t0,
            last.t,
            world.errors,
            {"seed": a.seed, "hosts": a.hosts, "minutes": a.minutes},
            dict(world.published),
        )
        if a.record:
            record.save(a.record)
    return report(record)


@dataclass
class Record:
    """Everything a run observed: the checker's input (`--record FILE` saves it, `--recheck
    FILE` checks it again, e.g. after a fix of the checker)."""

    snaps: list[Snapshot]
    workloads: list[Workload]
    applied: list[Applied]
    completions: list[Completion]
    final: Final | None
    nat: list[str]
    bounds: Bounds
    t0: float
    end: float
    errors: list[str]
    meta: dict[str, Any]
    published: dict[str, float] = field(default_factory=dict)

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), default=sorted))

    @classmethod
    def load(cls, path: str) -> Record:
        d = json.loads(Path(path).read_text())
        snaps = [
            Snapshot(
                s["t"],
                {
                    p: HostView(**{**h, "replicas": tuple(Replica(**r) for r in h["replicas"])})
                    for p, h in s["hosts"].items()
                },
            )
            for s in d["snaps"]
        ]
        fin = d["final"]
        final = (
            None
            if fin is None
            else Final(frozenset(fin["workloads"]), tuple(Status(**x) for x in fin["statuses"]))
        )
        return cls(
            snaps,
            [Workload(**w) for w in d["workloads"]],
            [Applied(Fault(**x["fault"]), x["began"], x["healed"]) for x in d["applied"]],
            [Completion(**c) for c in d["completions"]],
            final,
            d["nat"],
            Bounds(**d["bounds"]),
            d["t0"],
            d["end"],
            d["errors"],
            d["meta"],
            d.get("published", {}),
        )


def report(r: Record) -> int:
    """Check the run and print what was found; the last line is the JSON summary."""
    rep = check(
        r.snaps,
        r.workloads,
        r.applied,
        r.completions,
        r.final,
        nat=r.nat,
        bounds=r.bounds,
        t0=r.t0,
        end=r.end,
        job_s=JOB_S,
        published=r.published,
    )
    world = r  # the names below read as before
    completions = r.completions
    nat = r.nat
    for what, took in rep.recoveries:
        log(f"recovered {what}: {'never' if took is None else f'{took:.1f} s'}")
    for n in rep.notes:
        log(n)
    for v in rep.violations:
        log(f"VIOLATION at {v.when:.0f} s: {v.what}")
    for e in world.errors:
        log(f"ERROR {e}")
    result = {
        "seed": r.meta["seed"],
        "hosts": r.meta["hosts"],
        "nat_hosts": len(nat),
        "minutes": r.meta["minutes"],
        "faults_injected": len(world.applied),
        "faults_by_kind": {
            k: sum(1 for x in world.applied if x.fault.kind == k)
            for k in sorted({x.fault.kind for x in world.applied})
        },
        "workloads": len(r.workloads),
        "jobs_completed": len({c.uri for c in completions}),
        "snapshots": len(world.snaps),
        "violations": [v.as_json() for v in rep.violations]
        + [{"what": f"runner error: {e}", "when_s": None} for e in world.errors],
        "max_overreplication_s": round(rep.max_overreplication_s, 1),
        "failover_p50_s": _r(pct(rep.failovers, 50)),
        "failover_p99_s": _r(pct(rep.failovers, 99)),
        "failovers": len(rep.failovers),
        "failover_nat_p99_s": _r(pct(rep.failovers_nat, 99)),
        "failovers_nat": len(rep.failovers_nat),
        "lost_writes": rep.lost_writes,
        "daemon_crashes": rep.daemon_crashes,
    }
    print(json.dumps(result), flush=True)
    return 0 if not result["violations"] else 1


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


if __name__ == "__main__":
    sys.exit(main())
