"""The simulator with rolling updates (docs/protocol.md, section 25): owners publish new
versions of running services, a quarter of which never run; under chaos every slot ends at
the version its record asks for, no update stops an old replica before its new one runs,
and the old and new replica of a slot run side by side at most update_timeout_ms."""

from __future__ import annotations

from meshletd.sim.world import Config, Sim


def test_every_slot_converges_to_its_record_s_version_under_chaos() -> None:
    for seed in (1, 2):
        f = Sim(
            Config(meshlets=16, workloads=30, seed=seed, faults="chaos", hours=0.2, updates=12)
        ).run()
        assert f["violations"] == [] and f["update_violations"] == [], f["violations"]
        assert f["converged"]
        assert f["updates"] == 12 and f["updates_rolled_back"] >= 1
        assert f["update_side_by_side_max_s"] <= f["update_side_by_side_bound_s"]


def test_a_run_without_updates_reports_none_and_draws_nothing_for_them() -> None:
    a = Sim(Config(meshlets=8, workloads=12, seed=4, hours=0.1)).run()
    assert "updates" not in a and a["converged"] and a["violations"] == []
