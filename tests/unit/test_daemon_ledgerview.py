"""`meshletctl balance` explains each owner's standing under this host's minContribution
(lent, used, ratio, how it is served), and `meshletctl usage` what ran on this machine per
owner and per UTC day, from the usage records (docs/protocol.md, section 23)."""

from __future__ import annotations

from typing import Any

from meshletd.atproto.lexicon import default_lexicons
from meshletd.core.commons import Rule
from meshletd.core.records import format_datetime_ms
from meshletd.policy_settings import MinContributionSettings, PolicySettings
from tests.unit.daemon_parts import BOB, BOB_MESH, ME, OWNER, owner_record, parts, put

HOUR = 3_600_000
DAY = 24 * HOUR
NOW = 1_800_000_000_000 + 30 * 60_000  # half past an hour (T0 of the core tests is one)
CAROL, CAROL_MESH = "did:plc:carol", "did:plc:carolmesh"


def usage(meshlet: str, end: int, **cpu_hours: float) -> Any:
    owners = {"alice": OWNER, "bob": BOB, "carol": CAROL}
    value = {
        "periodStart": format_datetime_ms(end - HOUR),
        "periodEnd": format_datetime_ms(end),
        "entries": [
            {"ownerDid": owners[k], "milliCpuSeconds": int(v * HOUR), "memoryMiBSeconds": 3600}
            for k, v in sorted(cpu_hours.items())
        ],
        "createdAt": format_datetime_ms(end),
    }
    return put(meshlet, "usage", f"u{end}", value)


def commune(**cfg: Any) -> Any:
    """alice's meshlet (ME) consents to bob; bob ran 3 CPU-hours on alice's machine and
    lent nothing; carol (not a member here) claims bob used hers."""
    p = parts(**cfg)
    for mesh, own in ((ME, OWNER), (BOB_MESH, BOB), (CAROL_MESH, CAROL)):
        p.view.apply(put(mesh, "meshletOwner", "self", owner_record(mesh, own)))
    top = NOW - NOW % HOUR
    p.feed(*[usage(ME, top - k * HOUR, bob=1) for k in range(3)])
    p.feed(usage(CAROL_MESH, top, bob=0.5))
    return p


def test_balance_shows_lent_used_ratio_and_that_a_refusing_host_refuses_a_free_rider() -> None:
    rule = PolicySettings(
        min_contribution=MinContributionSettings(ratio_permille=500, mode="refuse")
    )
    p = commune(policy=rule)
    got = p.read.balance(NOW)
    default_lexicons().validate_output("farm.meshlet.ctl.getBalance", got)
    assert got["minContribution"] == {"ratioPermille": 500, "periodDays": 30, "mode": "refuse"}
    rows = {o["ownerDid"]: o for o in got["owners"]}
    assert rows[BOB]["usedMilliCpuSeconds"] == 3 * HOUR  # carol's claim: not a member here
    assert rows[BOB]["lentMilliCpuSeconds"] == 0
    assert rows[BOB]["ratioPermille"] == 0
    assert (rows[BOB]["standing"], rows[BOB]["served"]) == ("below", "refused")
    assert rows[OWNER]["lentMilliCpuSeconds"] == 3 * HOUR
    assert (rows[OWNER]["standing"], rows[OWNER]["served"]) == ("host", "first")
    assert "ratioPermille" not in rows[OWNER]  # it used nothing


def test_without_a_rule_the_balance_still_explains_lent_and_used() -> None:
    got = commune().read.balance(NOW)
    assert "minContribution" not in got and got["periodDays"] == 30
    rows = {o["ownerDid"]: o for o in got["owners"]}
    assert (rows[BOB]["usedMilliCpuSeconds"], rows[BOB]["served"]) == (3 * HOUR, "first")
    assert rows[BOB]["standing"] == "contributor"


def test_a_scheduling_meshlet_shows_the_standing_its_core_bids_by() -> None:
    p = commune()
    engine = p.schedule()
    engine.scheduler.rule = Rule(500, 7, "after")
    engine.scheduler.used = {BOB: 2 * HOUR}
    rows = {o["ownerDid"]: o for o in p.read.balance(NOW)["owners"]}
    assert (rows[BOB]["usedMilliCpuSeconds"], rows[BOB]["served"]) == (2 * HOUR, "after")


def test_usage_sums_what_ran_here_per_day_and_owner_newest_day_first() -> None:
    p = commune()
    yesterday = NOW - NOW % DAY - 5 * HOUR
    p.feed(usage(ME, yesterday, bob=2, alice=1))
    p.feed(usage(ME, NOW - NOW % DAY - 3 * DAY, bob=9))  # older than two days
    got = p.read.usage(NOW, 2)
    default_lexicons().validate_output("farm.meshlet.ctl.getUsage", got)
    day = format_datetime_ms(NOW)[:10]
    before = format_datetime_ms(yesterday)[:10]
    assert got["meshletDid"] == ME and got["days"] == 2
    assert [(r["day"], r["ownerDid"], r["milliCpuSeconds"], r["periods"]) for r in got["rows"]] == [
        (day, BOB, 3 * HOUR, 3),
        (before, OWNER, HOUR, 1),
        (before, BOB, 2 * HOUR, 1),
    ]
