"""Fair share: the integer formula and the worked example of docs/protocol.md."""

from __future__ import annotations

from meshletd.core import Usage, UsageEntry, balances, decay, meshlet_priority

H = 604_800_000  # half-life: 7 days in ms


def test_decay_halves_once_per_half_life_in_integers() -> None:
    assert decay(1_000_000, 0, H) == 1_000_000
    assert decay(1_800_000, H, H) == 900_000
    assert decay(7_200_000, H // 2, H) == 5_091_174  # (7_200_000 * 46341) >> 16
    assert decay(5, 64 * H, H) == 0


def test_worked_example_from_the_protocol() -> None:
    now = 10 * H
    usages = [
        # A's workloads used 2 CPU-hours on B's meshlet; the period ended 3.5 days ago.
        Usage(
            "at://mB/u/1",
            "mB",
            now - H // 2 - 3_600_000,
            now - H // 2,
            (UsageEntry("A", 7_200_000, 0),),
        ),
        # C's workloads used 0.5 CPU-hour on A's meshlet, 7 days ago; A's own use is free.
        Usage(
            "at://mA/u/1",
            "mA",
            now - H - 3_600_000,
            now - H,
            (UsageEntry("C", 1_800_000, 0), UsageEntry("A", 99_999, 0)),
        ),
    ]
    taken, given = balances(usages, {"mA": "A", "mB": "B"}, now, H)
    assert taken == {"A": 5_091_174, "C": 900_000}
    assert given == {"B": 5_091_174, "A": 900_000}
    assert meshlet_priority("A", taken, given) == 436  # took more than gave: hosts first
    assert meshlet_priority("B", taken, given) == -586  # gave more: lets others host
    assert meshlet_priority("C", taken, given) == 200
    assert meshlet_priority("D", taken, given) == 0
