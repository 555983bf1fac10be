"""What `meshletctl workloads` tells a person: pending with why, lost hosts, finished jobs,
handles instead of DIDs."""

from __future__ import annotations

from typing import Any

import pytest

from meshletctl import render

ALICE, BOBMESH, CAROLMESH = "did:plc:alice", "did:plc:bobmesh", "did:plc:carolmesh"
NAMES = {ALICE: "alice.test", BOBMESH: "bob-mesh.test"}


def view(name: str, replicas: int, *rows: dict[str, Any], **kw: Any) -> dict[str, Any]:
    running = [{"workload": f"at://{ALICE}/w/{name}", **r} for r in rows]
    return {"uri": f"at://{ALICE}/w/{name}", "name": name, "ownerDid": ALICE,
            "replicas": replicas, "running": running, **kw}  # fmt: skip


HUGE = view(
    "huge",
    1,
    {
        "slot": 0,
        "state": "pending",
        "reason": "round 0 closed without a winner: not enough free capacity for 1500 milli-CPU"
        f" / 32 MiB (largest free seen: 1000 milli-CPU / 512 MiB on {BOBMESH})",
    },
)
FAILED_JOB = view("job", 1, {"slot": 0, "round": 0, "meshletDid": BOBMESH, "state": "failed",
                             "exitCode": 3})  # fmt: skip
# Slot 1 moved from a powered-off host (round 0) to carol (round 1); slot 0's host is lost.
MOVED = view(
    "ticker",
    2,
    {"slot": 0, "round": 0, "meshletDid": BOBMESH, "state": "lost",
     "reason": f"its host {BOBMESH} is suspected lost (probes fail)"},
    {"slot": 1, "round": 1, "meshletDid": CAROLMESH, "state": "running"},
    {"slot": 1, "round": 0, "meshletDid": BOBMESH, "state": "lost"},
)  # fmt: skip


@pytest.mark.parametrize(
    ("w", "state"),
    [
        (HUGE, "pending"),
        (FAILED_JOB, "failed (exit 3)"),
        (
            view(
                "ok",
                1,
                {"slot": 0, "round": 0, "meshletDid": BOBMESH, "state": "succeeded", "exitCode": 0},
            ),
            "succeeded",
        ),
        (MOVED, "1 lost, 1 running"),
        (view("new", 2), "pending"),
        ({**HUGE, "paused": True}, "paused"),
    ],
)
def test_the_summary_state_of_a_workload(w: dict[str, Any], state: str) -> None:
    assert render.workload_state(w) == state


def test_a_pending_workload_says_why_under_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    render.workloads([HUGE], names=NAMES)
    out = capsys.readouterr().out
    assert "pending" in out and "0/1" in out
    (note,) = [line for line in out.splitlines() if line.startswith("huge pending:")]
    assert "not enough free capacity for 1500 milli-CPU" in note
    assert "bob-mesh.test" in note and BOBMESH not in note  # handles, not DIDs


def test_a_failed_job_shows_failed_with_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    render.workloads([FAILED_JOB])
    assert "failed (exit 3)" in capsys.readouterr().out
    render.workloads([FAILED_JOB], placements=True)
    assert "failed (exit 3)" in capsys.readouterr().out


def test_a_lost_host_does_not_count_as_ready(capsys: pytest.CaptureFixture[str]) -> None:
    render.workloads([MOVED], names=NAMES)
    out = capsys.readouterr().out
    assert "1/2" in out and "ticker[0] lost: its host bob-mesh.test is suspected" in out


def test_placements_show_handles_where_known_and_dids_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    render.workloads([MOVED], placements=True, names=NAMES)
    out = capsys.readouterr().out
    assert "alice.test" in out and "bob-mesh.test" in out and CAROLMESH in out
    assert ALICE not in out


def test_piped_tables_never_fold_a_did(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    long = "did:web:a-rather-long-host-name.of-some-commune-member.example.org"
    w = view("web", 1, {"slot": 0, "round": 0, "meshletDid": long, "state": "running"})
    render.workloads([w], placements=True)
    assert long in capsys.readouterr().out


def test_an_update_under_way_a_failed_slot_and_a_rollback_are_said_under_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rolling = view(
        "web",
        2,
        {"slot": 0, "meshletDid": BOBMESH, "state": "running", "version": "v2"},
        {"slot": 1, "meshletDid": CAROLMESH, "state": "running", "version": "v1"},
        version="v2",
    )
    failed = view(
        "api",
        1,
        {
            "slot": 0,
            "meshletDid": BOBMESH,
            "state": "running",
            "version": "v1",
            "failedVersion": "v9",
            "message": "update to version v9 failed: it could not start",
        },
        version="v1",
        rollback="update to version v9 rolled back: it could not start",
    )
    render.workloads([rolling, failed], names=NAMES)
    out = capsys.readouterr().out
    assert "web updating: 1 of 2 slot(s) at version v2" in out
    assert "api update to version v9 failed: it could not start" in out
    assert "api update to version v9 rolled back: it could not start" in out


def test_a_failing_replica_says_why_and_health_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    flaky = view(
        "flaky",
        1,
        {"slot": 0, "round": 0, "meshletDid": BOBMESH, "state": "failing", "health": "unhealthy",
         "message": "unhealthy (exit 137); handed off after 3 tries"},
    )  # fmt: skip
    render.workloads([flaky], placements=True, names=NAMES)
    out = capsys.readouterr().out
    assert "flaky failing (unhealthy): unhealthy (exit 137); handed off after 3 tries" in out


def test_endpoints_are_one_row_per_port(capsys: pytest.CaptureFixture[str]) -> None:
    render.endpoints(
        {
            "workload": f"at://{ALICE}/w/web",
            "endpoints": [
                {"slot": 0, "meshletDid": BOBMESH, "name": "http", "address": "10.251.4.3",
                 "port": 20000, "protocol": "tcp", "state": "running", "health": "healthy"},
                {"slot": 1, "meshletDid": CAROLMESH, "name": "http", "address": "fd00::3",
                 "port": 20001, "protocol": "tcp", "state": "running"},
            ],
        },
        NAMES,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "10.251.4.3:20000" in out and "[fd00::3]:20001" in out
    assert "bob-mesh.test" in out and "healthy" in out


def test_a_slot_whose_new_holder_failed_silently_says_what_the_earlier_one_said(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A full run: the image could not be pulled on bob's meshlet (handed off after 3 tries);
    # carol's copy failed too and her row, the one that serves the slot, has no message.
    missing = view(
        "missing",
        1,
        {"slot": 0, "round": 0, "meshletDid": BOBMESH, "state": "failing",
         "message": "ImageNotFound: 10.0.0.1:5000/alice/nope:v1 not found; handed off"},
        {"slot": 0, "round": 1, "meshletDid": CAROLMESH, "state": "failed", "exitCode": -1},
    )  # fmt: skip
    render.workloads([missing], placements=False, names=NAMES)
    out = capsys.readouterr().out
    assert "missing failed (exit -1): ImageNotFound: 10.0.0.1:5000/alice/nope:v1" in out
