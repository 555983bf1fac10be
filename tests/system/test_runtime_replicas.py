"""The runtime on a real booted systemd host: limits, journal, secrets, adoption, contract.

Each test runs one check of tests/system/host_scripts/runtime_checks.py inside the host (as
root, as meshletd would run); the check prints what it measured as its last line.
"""

from __future__ import annotations

import json

import pytest

from meshletd.runtime.testing import CONTRACT
from tests.system.hostenv import LocalHost, NspawnHost

CHECKS = "tests/system/host_scripts/runtime_checks.py"


def run_check(host: NspawnHost | LocalHost, name: str, *args: str) -> dict:
    done = host.run(host.python, CHECKS, name, *args, timeout=600)
    if done.returncode != 0:
        # Leave the host clean for the next test, then report the failure.
        host.run(host.python, CHECKS, "cleanup", timeout=300)
        pytest.fail(f"check {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(name, result)
    return result


@pytest.mark.parametrize("contract", [c.__name__.removeprefix("contract_") for c in CONTRACT])
def test_real_runtime_keeps_the_runtime_contract(
    systemd_host: NspawnHost | LocalHost, contract: str
) -> None:
    run_check(systemd_host, f"contract:{contract}")


def test_a_start_is_seen_when_systemd_ends_its_job_and_the_daemon_runs_meanwhile(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "start_job_wait")
    for manager in ("system", "user"):
        seen = got[manager]
        # Not before READY (0.6 s after the start), and then active.
        assert seen["ready_waited_s"] >= 0.5 and seen["ready_state"] == "active", got
        # meshletd goes on meanwhile: a 10 ms timer kept firing through the 0.6 s.
        assert seen["ticks_while_waiting"] >= 25, got
        assert seen["fail_waited_s"] < 5 and seen["fail_state"] == "failed", got
        # A unit still starting: back after the timeout given (0.5 s), not its 5 s.
        assert 0.4 <= seen["slow_waited_s"] < 4 and seen["slow_state"] == "activating", got
        assert seen["missing_waited_s"] < 5, got


def test_memory_cpu_and_task_limits_are_enforced_and_an_oom_kill_is_reported(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "limits")
    assert got["oom_event"] == "ReplicaOomKilled"
    assert 0.15 <= got["cpu_measured"] <= 0.23
    # The replica started at the launch quota; once running, the kernel has the workload's.
    assert got["cfs_quota_at_running"].split()[0] == "20000", got
    assert got["tasks_current"] <= got["tasks_max"] and got["fork_errors"] > 0


def test_a_replica_whose_cpu_quota_cannot_be_set_is_stopped_and_reported_failed(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "cpu_quota_failure")
    assert got["event"] == "ReplicaFailed" and "CPU quota could not be set" in got["message"]


def test_a_cpu_quota_systemd_rounds_on_daemon_reload_is_set_exactly_again(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "cpu_quota_after_daemon_reload")
    assert got["after_a_poll"] == [5_000, 15_000, 250_000], got


def test_container_output_is_in_the_units_journal_once_and_secrets_stay_out_of_the_unit(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "journal_once_and_secrets")
    assert got["journal_lines_per_output_line"] == 1


def test_five_replicas_survive_a_sigkilled_meshletd_and_are_adopted_once(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "adopt_after_sigkill", "5")
    assert got["adopted"] == 5


def test_many_starts_in_a_row_all_reach_running(systemd_host: NspawnHost | LocalHost) -> None:
    assert run_check(systemd_host, "stress")["started"] == 12


def test_the_slice_caps_what_all_replicas_together_may_take(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "slice_cap")
    assert got["measured_total"] <= 0.33


def test_the_contribution_caps_the_slice_an_admin_dropin_survives_and_a_hog_is_contained(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "slice_contribution")
    # [contribution] milli_cpu = 700, memory_mib = 160, tasks_max = 500
    assert got["shown"] == [
        "CPUQuotaPerSecUSec=700ms",
        f"MemoryMax={160 << 20}",
        "TasksMax=500",
    ], got
    # The hog's unit would allow 1 GiB: the slice's 160 MiB killed it, nothing else.
    assert got["hog_event"] == "ReplicaOomKilled" and not got["hog_survived"], got
    # ... at the slice's cap (peak near 160 MiB), far below its own unit's 1 GiB + overhead.
    assert 0.9 * (160 << 20) <= got["hog_peak_bytes"] <= 1.05 * (160 << 20), got
    assert got["bystander"] == "active" and got["host"] in ("running", "degraded"), got
    # The admin's TasksMax=321 drop-in wins over the config's 500; the rest still holds.
    assert "TasksMax=321" in got["shown_with_dropin"], got
    assert f"MemoryMax={160 << 20}" in got["shown_with_dropin"], got
    assert got["admin_keys"] == ["TasksMax"]


def test_the_user_manager_fallback_runs_adopts_and_logs_replicas_too(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "user_manager")
    assert got["journal_once"] and "user@" in got["cgroup"]
