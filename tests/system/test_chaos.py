"""A short chaos run on the real stack (issue 14): `dev/chaos --seed 2 --minutes 3` brings up
the local atproto network and four meshlets on their own networks (one behind NAT), keeps
services and jobs of every owner coming and going, pulls the plug on alice's host 30 s in
and boots it again, and checks every invariant throughout (dev/lib/chaos_check.py). The long
runs are `dev/bench chaos` (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.system.hostenv import PROJECT, host_kind, nspawn_available

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots four hosts of its own: dev/hostenv hosts only"
)


def test_a_short_chaos_run_breaks_no_invariant_and_replaces_the_powered_off_host() -> None:
    if not nspawn_available():
        pytest.fail("dev/chaos needs root and systemd-nspawn (dev/test installs it)", False)
    assert (
        subprocess.run(
            [str(PROJECT / "dev" / "chaos"), "--seed", "2", "--minutes", "3", "--plan"],
            capture_output=True, text=True, check=True,
        ).stdout.split()[0].startswith("power-off(alice")
    )  # fmt: skip
    done = subprocess.run(
        [str(PROJECT / "dev" / "chaos"), "--seed", "2", "--minutes", "3"],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    print(done.stdout[-4000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["violations"] == [], done.stdout[-4000:]
    assert result["faults_injected"] == 1
    assert result["failovers"] == 0 or result["failover_p99_s"] <= 10
    assert result["daemon_crashes"] == 0 and result["lost_writes"] == 0
    assert result["jobs_completed"] >= 1
    assert done.returncode == 0
