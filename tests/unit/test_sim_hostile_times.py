"""Safety for every lexicon-valid workload record (issue #15, point 1): whatever its
`createdAt` (decades in the past, far in the future), window, replica count or packing, the
meshlets compute the same placement, no slot runs on two meshlets, and every record a core
asks to write is one the lexicons admit. A write the lexicon refuses is dropped here, as the
daemon's own validation drops it: the core must not have acted as if it had been published.
At db8aa19 a workload created 30 years ago got chained rounds numbered above the lexicon's
maximum; every bid was refused, each meshlet saw only its own, and all of them ran it."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshletd.atproto.lexicon import InvalidRecord, validate_record
from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.core import PutRecord, Scheduler, Workload
from meshletd.core.records import NSID_WORKLOAD, format_datetime_ms
from meshletd.sim.world import CLUSTER, EPOCH, Config, Node, Sim

YEAR_MS = 365 * 86_400_000
MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z, the lexicon's first datetime
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, its last
CID = "bafyreia" + "a" * 52


def workload_record(owner: str, i: int, created: int, window: int, replicas: int, packing: bool):
    """A workload record as an owner would write it, checked against the lexicon, and the
    core's view of it (through the same conversion the daemon uses)."""
    value: dict[str, Any] = {
        "$type": NSID_WORKLOAD,
        "name": f"w{i}",
        "image": "registry.example/app:1",
        "resources": {"milliCpu": 250, "memoryMiB": 128},
        "replicas": replicas,
        "kind": "service",
        "cluster": CLUSTER,
        "bidWindowMs": window,
        "constraints": {"allowPacking": packing},
        "createdAt": _datetime(created),
    }
    validate_record(NSID_WORKLOAD, value)
    wl = record_from_json(f"at://{owner}/{NSID_WORKLOAD}/w{i}", CID, value)
    assert isinstance(wl, Workload)
    return wl


def _datetime(ms: int) -> str:
    text = format_datetime_ms(ms)
    year, rest = text.split("-", 1)
    return f"{int(year):04d}-{rest}"  # four-digit years before 1000 too


class LexiconSim(Sim):
    """The simulator with given workload records, whose writes pass the lexicons like the
    daemon's: a record the lexicon refuses is dropped (and counted)."""

    def __init__(self, cfg: Config, specs: list[tuple[int, int, int, bool]]) -> None:
        self.specs = specs
        self.refused: list[str] = []
        super().__init__(cfg)

    def _make_workload(self, w: int, at: int) -> Workload:
        created, window, replicas, packing = self.specs[w]
        owner = self.nodes[w % len(self.nodes)].owner
        return workload_record(owner, w, created, window, replicas, packing)

    def _arrive(self, wl: Workload) -> None:  # keep the record's own createdAt
        self.workloads[wl.uri] = wl
        self.store[wl.uri] = wl
        self._writes += 1
        self._broadcast(wl.uri, wl, self.now + 20)

    def _perform(self, node: Node, actions: list[Any]) -> None:
        kept = []
        for a in actions:
            if isinstance(a, PutRecord):
                value = record_to_json(a.record)  # what the daemon writes, CIDs included
                try:
                    validate_record(a.collection, value)
                except InvalidRecord as e:
                    self.refused.append(str(e))
                    continue
            kept.append(a)
        super()._perform(node, kept)


def run(specs: list[tuple[int, int, int, bool]], meshlets: int = 4, hours: float = 0.03):
    cfg = Config(meshlets=meshlets, workloads=len(specs), seed=1, hours=hours, delete_fraction=0)
    sim = LexiconSim(cfg, specs)
    figures = sim.run()
    return sim, figures


def assert_safe(sim: LexiconSim, figures: dict[str, Any]) -> None:
    assert sim.refused == []  # every record the cores asked to write is lexicon-valid
    assert figures["placements_identical"]
    assert figures["over_replication_max_s"] == 0
    assert [v for v in figures["violations"] if "not running" not in v] == []
    runners: dict[tuple[str, int], list[str]] = {}
    for n in sim.nodes:
        for key in n.running:
            runners.setdefault(key, []).append(n.did)
    assert all(len(v) == 1 for v in runners.values()), runners


def test_a_workload_created_decades_ago_runs_nowhere_twice() -> None:
    thirty_years_ago = EPOCH - 30 * YEAR_MS
    sim, figures = run([(thirty_years_ago, 5000, 1, False), (thirty_years_ago, 500, 3, True)])
    assert_safe(sim, figures)
    # Its rounds would pass the lexicon's maximum: it is offered to nobody, the same way
    # everywhere, and its owner is told why.
    assert all(not n.running for n in sim.nodes)
    core = sim.nodes[0].core
    assert isinstance(core, Scheduler)
    uri = next(iter(sim.workloads))
    assert "publish a new version" in core.pending_reasons(uri)[0]


def test_a_workload_created_a_year_ago_is_placed_once_in_a_late_chained_round() -> None:
    sim, figures = run([(EPOCH - YEAR_MS, 5000, 2, False)])
    assert_safe(sim, figures)
    assert figures["converged"]
    assert sorted(len(n.running) for n in sim.nodes) == [0, 0, 1, 1]


def test_a_workload_created_far_in_the_future_waits_and_nothing_is_written() -> None:
    sim, figures = run([(MAX_TIME_MS, 600_000, 1000, False)])
    assert_safe(sim, figures)
    core = sim.nodes[0].core
    assert isinstance(core, Scheduler)
    uri = next(iter(sim.workloads))
    assert core.pending_reasons(uri)[0].startswith("bidding: round 0 opens at 9999-12-31")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(MIN_TIME_MS, MAX_TIME_MS),
                st.integers(EPOCH - 3 * YEAR_MS, EPOCH + 60_000),
            ),
            st.integers(500, 600_000),
            st.integers(1, 6),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    )
)
@example(specs=[(1_795_591_673_267, 559_600, 1, False)])
def test_any_lexicon_valid_times_windows_and_counts_keep_placement_safe(specs) -> None:
    # Workloads arrive in the first 40 % of the run and a round closes at most one window
    # (<= 600 s) after it opens: half an hour lets every round close before placements are
    # compared. At 0.02 h (72 s) the example above ended while one meshlet still waited for
    # the last bid of a round the two others had closed early: a placement in flight, not
    # two different ones.
    sim, figures = run(specs, meshlets=3, hours=0.5)
    assert_safe(sim, figures)
