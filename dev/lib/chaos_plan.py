"""dev/chaos's fault schedule: a pure function of the seed (no clock, no I/O).

`plan(seed, minutes, people, nat)` lists the faults of one run, one after the other: each
starts at `at` seconds after the workload churn began, lasts `duration` seconds (0 for the
instant ones) and is followed by a quiet gap at least as long as the bound within which every
slot must run again (`recovery_bound`), so the checker can hold each fault to its own bound.
The same seed, length and people always give the same schedule (`random.Random(seed)`).

Kinds (the knobs of dev/hostenv and dev/devnet, tests/system/commune.py):
  cut          the link from `target` to `peer` is cut one way for `duration`
  cut-both     the link is cut both ways
  cut-pds      `target` is cut from its meshlet's PDS (peers and the other PDS reachable)
  stop-pds     the PDS of `target`'s meshlet is stopped (data kept) and started again
  kill-firehose  every firehose connection of every PDS is closed (instant)
  kill-daemon  meshletd on `target` gets SIGKILL; systemd restarts it (instant)
  power-off    `target`'s host is powered off (every process SIGKILLed) for `duration`,
               then boots again with a fresh disk and meshletd reinstalled
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = (
    "cut",
    "cut-both",
    "cut-pds",
    "stop-pds",
    "kill-firehose",
    "kill-daemon",
    "power-off",
)
# How often each kind is drawn (power-offs are the expensive ones: a reboot and a reinstall).
WEIGHTS = {
    "cut": 3,
    "cut-both": 3,
    "cut-pds": 2,
    "stop-pds": 2,
    "kill-firehose": 2,
    "kill-daemon": 3,
    "power-off": 3,
}
DURATION_S = {  # (shortest, longest) of each kind that lasts
    "cut": (10, 45),
    "cut-both": (10, 45),
    "cut-pds": (10, 60),
    "stop-pds": (15, 60),
    "power-off": (20, 60),
}
GAP_S = (5, 20)  # extra quiet after a fault's recovery bound, drawn per fault
POWER_ON_S = 40  # what booting and reinstalling a host may take, before its recovery counts


@dataclass(frozen=True)
class Bounds:
    """The failover bounds (docs/protocol.md sections 8 and 9) the checker holds slots to."""

    reachable_s: float = 10.0  # section 9: "Target <= 10 s" for a host its watchers reach
    lease_valid_s: float = 150.0  # V of the meshlets behind NAT
    start_s: float = 5.0  # an image start on this machine

    @property
    def nat_s(self) -> float:
        """Section 8: a host behind NAT is replaced within V + 5.5 s + the start (5 probe
        intervals of 0.5 s, then the replacement round's W + settle = 3 s)."""
        return self.lease_valid_s + 5.5 + self.start_s


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the churn began
    kind: str
    target: str = ""  # a person (whose host, meshletd or PDS)
    peer: str = ""  # the other end of a cut link
    duration: float = 0.0

    @property
    def heals_at(self) -> float:
        return self.at + self.duration

    def describe(self) -> str:
        who = f"{self.target}->{self.peer}" if self.peer else self.target
        return f"{self.kind}({who or 'all'}, {self.duration:g} s)@{self.at:g}s"


def recovery_bound(f: Fault, nat: Sequence[str], b: Bounds) -> float:
    """Seconds after `f` heals (a power-off: after it began) within which every slot runs."""
    if f.kind == "power-off":
        return b.nat_s if f.target in nat else b.reachable_s
    if f.target in nat and f.kind in ("cut-pds", "stop-pds"):
        # Its lease could not be renewed meanwhile: its watchers may have moved its slots,
        # which takes a lease-based failover.
        return b.nat_s
    return b.reachable_s + b.start_s


def settled_at(f: Fault, nat: Sequence[str], b: Bounds) -> float:
    """When every slot must run again after `f` (seconds after the churn began)."""
    if f.kind == "power-off":
        return f.at + recovery_bound(f, nat, b)
    return f.heals_at + recovery_bound(f, nat, b)


def plan(
    seed: int,
    minutes: float,
    people: Sequence[str],
    nat: Sequence[str] = (),
    *,
    bounds: Bounds | None = None,
    warmup_s: float = 30.0,
    tail_s: float = 60.0,
) -> list[Fault]:
    """The faults of a run of `minutes`, drawn from `seed`: the first after `warmup_s`, none
    whose recovery would end later than `tail_s` before the end."""
    b = bounds or Bounds()
    rng = random.Random(seed)
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    end = minutes * 60 - tail_s
    faults: list[Fault] = []
    t = warmup_s
    while True:
        kind = rng.choices(kinds, weights)[0]
        target = rng.choice(list(people)) if kind != "kill-firehose" else ""
        peer = ""
        if kind in ("cut", "cut-both"):
            peer = rng.choice([p for p in people if p != target])
        lo, hi = DURATION_S.get(kind, (0, 0))
        duration = float(rng.randint(lo, hi)) if hi else 0.0
        f = Fault(float(t), kind, target, peer, duration)
        done = settled_at(f, nat, b)
        if f.kind == "power-off":
            done = max(done, f.heals_at + POWER_ON_S + b.reachable_s)
        done += rng.randint(*GAP_S)
        if done > end:
            break
        faults.append(f)
        t = done
    return faults
