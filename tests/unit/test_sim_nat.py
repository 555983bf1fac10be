"""The simulator's hosts without inbound reachability (behind NAT): nobody can probe them,
they live by their lease (docs/protocol.md, section 8)."""

from __future__ import annotations

from meshletd.sim.world import Config, run


def test_half_the_hosts_behind_nat_under_chaos_converge_and_fail_over_within_the_bounds() -> None:
    r = run(Config(meshlets=12, workloads=20, seed=9, faults="chaos", hours=0.3, nat=0.5))
    assert r["nat_meshlets"] == 6
    assert r["converged"] and r["violations"] == []
    assert r["failovers_nat"] > 0
    assert r["failover_nat_p99_s"] <= r["failover_nat_bound_s"]
    if r["failovers"]:
        assert r["failover_p99_s"] <= 10


def test_a_commune_where_no_host_has_inbound_reachability_converges_under_chaos() -> None:
    r = run(Config(meshlets=10, workloads=20, seed=3, faults="chaos", hours=0.3, nat=1.0))
    assert r["nat_meshlets"] == 10
    assert r["converged"] and r["violations"] == []
    assert r["failovers"] == 0 and r["failovers_nat"] > 0
    assert r["failover_nat_p99_s"] <= r["failover_nat_bound_s"]


def test_healthy_hosts_behind_nat_are_never_failed_over_without_faults() -> None:
    r = run(Config(meshlets=10, workloads=30, seed=2, hours=0.5, nat=0.5))
    assert r["converged"] and r["violations"] == []
    assert r["failovers_nat"] == 0 and r["needless_moves"] == 0


def test_the_lease_costs_what_the_protocol_says() -> None:
    """One update (2 points) per renewal interval per host behind NAT, nothing else."""
    day = 24.0
    base = run(Config(meshlets=6, workloads=0, seed=1, hours=day / 24))
    nat = run(Config(meshlets=6, workloads=0, seed=1, hours=day / 24, nat=1.0))
    per_day = 86_400_000 // 90_000 * 2  # 1 920
    extra = nat["write_points_per_meshlet_day"] - base["write_points_per_meshlet_day"]
    assert abs(extra - per_day) <= 3 * 24  # the first write is a create (3), per hour run
