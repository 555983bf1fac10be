"""python -m meshletd.sim: run the deterministic simulator and print its figures."""

from __future__ import annotations

import argparse
import json
import os
import sys

from meshletd.core import Timing

from .world import Config, Sim

_kept: list[Sim] = []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshletd.sim", description=__doc__)
    p.add_argument("--meshlets", type=int, default=50)
    p.add_argument("--workloads", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", choices=("none", "chaos"), default="none")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument(
        "--arrivals-per-day",
        type=float,
        default=0.0,
        help="extra workload arrivals per day, each deleted after a random lifetime",
    )
    p.add_argument("--lifetime-hours", type=float, default=12.0)
    p.add_argument(
        "--nat",
        type=float,
        default=0.0,
        help="fraction of meshlets without inbound reachability (behind NAT; 1 = all)",
    )
    p.add_argument(
        "--updates",
        type=int,
        default=0,
        help="new versions of running services published during the run (a quarter never run)",
    )
    p.add_argument(
        "--free-riders",
        type=float,
        default=0.0,
        help="fraction of owners whose meshlets lend nothing (drained all along)",
    )
    p.add_argument(
        "--min-contribution",
        default="",
        help="MODE:PERMILLE[:DAYS] (after|refuse) every contributor's host policy sets",
    )
    p.add_argument(
        "--probe-interval-ms",
        type=int,
        default=Timing().probe_interval_ms,
        help="liveness probe interval (local; long runs without faults can probe less)",
    )
    p.add_argument("--cpu-milli", type=int, default=16_000, help="each meshlet's CPU")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    cfg = Config(
        meshlets=a.meshlets,
        workloads=a.workloads,
        seed=a.seed,
        faults=a.faults,
        hours=a.hours,
        arrivals_per_day=a.arrivals_per_day,
        lifetime_hours=a.lifetime_hours,
        nat=a.nat,
        free_riders=a.free_riders,
        min_contribution=a.min_contribution,
        timing=Timing(probe_interval_ms=a.probe_interval_ms),
        cpu_milli=a.cpu_milli,
        updates=a.updates,
    )
    sim = Sim(cfg)
    figures = sim.run()
    # Run as a program, the process ends right after printing: freeing the simulated
    # cluster's millions of objects one by one (seconds at 1 000 meshlets) would be wasted.
    if __name__ == "__main__":
        _kept.append(sim)
    if a.json:
        print(json.dumps(figures, sort_keys=False))
    else:
        for k, v in figures.items():
            print(f"{k:32} {v}")
    return 0 if figures["converged"] and not figures["violations"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
