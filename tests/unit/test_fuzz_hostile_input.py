"""Fuzzing in the suite (issue #15): generated records through the whole boundary into a
simulated commune, and generated frames into the decoder and mirror. Fixed seeds, so a run
is reproducible (`dev/bench fuzz` runs the same drivers longer with a seed it prints)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzzing import (
    created_at_extreme,
    fixed_constants,
    frame_steps,
    frames_through_decoder,
    records_through_sim,
    workload_values,
)

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    print_blob=True,
)


@pytest.fixture(autouse=True)
def _same_values_in_any_run() -> Iterator[None]:
    """The seeds below draw the same records alone and in the full suite (tests/fuzzing.py:
    without this, hypothesis mixed constants of whatever modules were imported into them)."""
    with fixed_constants():
        yield


# Seed 20261204: at 4185ebd (before the core bounded its rounds, 13de329), with every module
# of ours imported (as in the full unit run), it drew records with `createdAt` decades off
# and failed ("a meshlet wrote a record its lexicon refuses": bid round above 1 000 000,
# point 1); a lone run drew other records and passed. (20261205/6 below: pinned alike.)
@seed(20261204)
@settings(FUZZ, max_examples=60)
@given(st.lists(workload_values(), min_size=1, max_size=6), st.integers(0, 2**16))
def test_generated_records_never_crash_a_meshlet_or_break_placement(values, sim_seed):
    tally = records_through_sim(values, sim_seed)
    assert tally.crashes == []
    assert tally.violations == []
    assert tally.admitted + tally.refused == tally.tried


@seed(20261205)
@settings(FUZZ, phases=[Phase.explicit, Phase.generate])  # no shrinking while it is known
@given(st.lists(workload_values(created_at_extreme), min_size=1, max_size=6), st.integers(0, 99))
def test_records_with_any_created_at_keep_placement_safe(values, sim_seed):
    tally = records_through_sim(values, sim_seed)
    assert tally.crashes == [] and tally.violations == []


@seed(20261206)
@settings(FUZZ, max_examples=80)
@given(frame_steps)
def test_generated_frames_never_crash_the_decoder_or_pass_an_invalid_record(steps):
    tally = frames_through_decoder(steps)
    assert tally.crashes == []
    assert tally.violations == []
