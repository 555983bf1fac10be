"""The simulator's commune with free riders (docs/protocol.md section 23): every meshlet
still computes one placement with the rule in force, and the figures say what each owner
received against what it lent."""

from __future__ import annotations

import pytest

from meshletd.core import Timing
from meshletd.sim.world import Config, run


def commune(rule: str) -> dict:
    return run(
        Config(
            meshlets=8,
            workloads=10,
            hours=6,
            arrivals_per_day=150,
            free_riders=0.25,
            min_contribution=rule,
            cpu_milli=4000,
            timing=Timing(probe_interval_ms=30_000),
        )
    )


@pytest.mark.parametrize("rule", ["", "after:500:7", "refuse:500:7"])
def test_a_commune_with_free_riders_converges_under_every_mode(rule: str) -> None:
    got = commune(rule)
    assert got["converged"] and got["violations"] == []
    assert got["free_riders"] == 2
    riders = [o for o in got["share_received_vs_lent"].values() if o["free_rider"]]
    assert len(riders) == 2 and all(o["lent_cpu_h"] == 0 for o in riders)
    assert 0 < got["free_rider_share"] < 1


def test_refusing_hosts_give_free_riders_less_than_no_rule() -> None:
    assert (
        commune("refuse:500:7")["free_rider_received_cpu_h"]
        < commune("")["free_rider_received_cpu_h"]
    )


def test_without_free_riders_the_run_has_no_commons_figures() -> None:
    got = run(Config(meshlets=5, workloads=5, hours=0.05))
    assert "free_rider_share" not in got and got["converged"]
