"""The read model: what `meshletctl workloads`, `bids` and `status` show, from the records
followed and the scheduler core's answers (here fixed by a fake)."""

from __future__ import annotations

from typing import Any

import pytest

from meshletctl import render
from meshletd.atproto.frames import Refusal
from tests.unit.daemon_parts import (
    BOB,
    BOB_MESH,
    ME,
    OWNER,
    STAMP,
    WORKLOAD,
    parts,
    put,
    workload_value,
)

URI = f"at://{OWNER}/{WORKLOAD}/3kweb"
RECORD = workload_value(replicas=3)


def status(meshlet_slot: int, state: str, round_: int = 0) -> dict[str, object]:
    return {
        "workload": {"uri": URI, "cid": "bafyreiabcdefgh"},
        "slot": meshlet_slot,
        "round": round_,
        "state": state,
        "updatedAt": STAMP,
    }


def test_slots_show_where_they_run_how_they_do_and_why_others_wait() -> None:
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", RECORD))
    p.feed(put(BOB_MESH, "workloadStatus", "s1", status(1, "running")))
    engine = p.schedule()
    engine.scheduler.slots[URI] = ((0, ME), (0, BOB_MESH), None)
    engine.scheduler.local[(URI, 0)] = "running"
    engine.scheduler.reasons[URI] = {2: "no meshlet has 100 mCPU free"}
    engine.units[(URI, 0)] = "meshlet-web-0.service"
    here, there, pending = p.read.workload("web")["running"]
    assert here == {
        "workload": URI,
        "slot": 0,
        "round": 0,
        "meshletDid": ME,
        "state": "running",
        "unit": "meshlet-web-0.service",
    }
    assert there["meshletDid"] == BOB_MESH and there["state"] == "running"
    assert pending == {
        "workload": URI,
        "slot": 2,
        "state": "pending",
        "reason": "no meshlet has 100 mCPU free",
    }
    assert p.read.summary()["replicas"] == 1
    assert p.read.capacity()["allocated"]["milliCpu"] == 100


def test_a_suspected_host_shows_its_replica_lost_and_a_moved_slot_stopping() -> None:
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", {**RECORD, "replicas": 1}))
    p.feed(put(BOB_MESH, "workloadStatus", "s1", status(0, "running")))
    engine = p.schedule()
    engine.scheduler.slots[URI] = ((0, BOB_MESH),)
    engine.scheduler.suspects.add(BOB_MESH)
    (slot,) = p.read.workload(URI)["running"]
    assert slot["state"] == "lost"
    # The slot moved to us in round 1: bob's status is a replica on its way out.
    engine.scheduler.suspects.clear()
    engine.scheduler.slots[URI] = ((1, ME),)
    ours, old = p.read.workload(URI)["running"]
    assert ours["meshletDid"] == ME and ours["state"] == "starting"
    assert old["meshletDid"] == BOB_MESH and old["state"] == "stopping"
    assert old["reason"] == f"slot moved to {ME} (make-before-break)"


def our_one_replica(said: dict[str, Any], state: str) -> tuple[Any, dict[str, Any]]:
    """A 1-replica workload whose slot is ours, our replica in `state` and our status
    record saying `said`: the parts, and the slot's row as the read model shows it."""
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", {**RECORD, "replicas": 1}))
    p.feed(put(ME, "workloadStatus", "s0", said))
    engine = p.schedule()
    engine.scheduler.slots[URI] = ((0, ME),)
    engine.scheduler.local[(URI, 0)] = state
    (slot,) = p.read.workload(URI)["running"]
    return p, slot


def test_a_replica_waiting_to_retry_a_failed_pull_shows_pending_and_why_not_failed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Seen in a full run: between a failed pull and the next try, the summary said
    # `failed (exit -1)` with no reason, though the status written said why.
    why = "ImageNotFound: 10.0.0.1:5000/alice/web not found"
    said = {**status(0, "pending"), "exitCode": -1, "message": why}
    p, slot = our_one_replica(said, "exited")  # waiting for its next try
    assert slot["state"] == "pending" and slot["message"] == why
    render.workloads([p.read.workload(URI)], placements=False, names={})
    out = capsys.readouterr().out
    assert "failed" not in out and f"web pending: {why}" in out


def test_a_replica_that_exited_while_its_status_said_pulling_shows_exited() -> None:
    # Its exit is newer than the `pulling` its status has not yet replaced.
    _, slot = our_one_replica(status(0, "pulling"), "exited")
    assert slot["state"] == "exited"


def test_without_a_scheduler_replicas_are_those_the_hosts_report() -> None:
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", RECORD))
    p.feed(put(ME, "workloadStatus", "s0", status(0, "running")))
    p.feed(put(BOB_MESH, "workloadStatus", "s1", status(1, "failed")))
    rows = p.read.workload(URI)["running"]
    assert [(r["meshletDid"], r["state"]) for r in rows] == [(ME, "running"), (BOB_MESH, "failed")]
    assert p.read.status_line() == "0 members, 1 replica"
    assert [w["uri"] for w in p.read.workloads(owner=OWNER)] == [URI]
    assert p.read.workloads(owner="did:plc:someone") == []


def test_bids_are_shown_by_round_best_first_with_the_winners() -> None:
    p = parts()
    p.feed(put(OWNER, "workload", "3kweb", RECORD))
    for rkey, meshlet, priority in (("b1", ME, 5), ("b2", BOB_MESH, 9)):
        bid = {
            "workload": {"uri": URI, "cid": "bafyreiabcdefgh"},
            "round": 0,
            "priority": priority,
            "slots": 1,
            "createdAt": STAMP,
        }
        p.feed(put(meshlet, "bid", rkey, bid))
    p.feed(put(BOB_MESH, "workloadStatus", "s1", status(0, "running")))
    (round0,) = p.read.bids("web")["rounds"]
    assert [b["meshletDid"] for b in round0["bids"]] == [BOB_MESH, ME]
    assert round0["winners"] == [BOB_MESH]


def test_invalid_workload_records_are_listed_newest_first_with_the_field_and_reason() -> None:
    p = parts()
    p.refused += [
        Refusal(f"at://{OWNER}/{WORKLOAD}/3kaaa", "bafyold", "image", "an option", "web"),
        Refusal(f"at://{OWNER}/{WORKLOAD}/3kzzz", None, None, "x" * 2000),
        Refusal(f"at://{BOB}/{WORKLOAD}/3kbbb", "bafyb", "env[0].name", "holds '='"),
        Refusal(f"at://{OWNER}/commune.scheduler.bid/3kccc", "bafyc", "round", "negative"),
    ]
    newest, oldest = p.read.invalid_workloads(OWNER)
    assert newest["uri"].endswith("/3kzzz") and "cid" not in newest and "name" not in newest
    assert newest["problem"]["field"] == "" and len(newest["problem"]["reason"]) == 1000
    assert oldest == {
        "uri": f"at://{OWNER}/{WORKLOAD}/3kaaa",
        "ownerDid": OWNER,
        "cid": "bafyold",
        "name": "web",
        "problem": {"field": "image", "reason": "an option"},
    }
    assert [r["ownerDid"] for r in p.read.invalid_workloads()] == [OWNER, BOB, OWNER]


def test_status_shows_the_limits_in_force_and_what_an_admin_dropin_sets() -> None:
    from meshletctl import render
    from meshletd.config import Contribution

    contribution = Contribution(milli_cpu=1500, memory_mib=512, tasks_max=300, max_replicas=4)
    p = parts(contribution=contribution)
    observing = p.read.summary()["limits"]
    assert observing == {
        "milliCpu": 1500,
        "memoryMiB": 512,
        "tasksMax": 300,
        "maxReplicas": 4,
        "enforced": False,
    }
    engine = p.schedule()
    engine.admin_slice_keys = frozenset({"MemoryMax"})
    limits = p.read.summary()["limits"]
    assert limits["enforced"] and limits["adminSet"] == ["MemoryMax"]
    line = render._limits(limits)
    assert line == (
        "slice 1.5 CPU, 512 MiB, 300 tasks; at most 4 replicas; "
        "MemoryMax from an admin drop-in (it wins)"
    )
