"""Hostile-input fuzzing shared by the test suite and `dev/bench fuzz` (issue #15).

Two drivers, each counting what it tried, what crashed and what broke an invariant:

- `records_through_sim(values, seed)`: workload record values (valid and invalid, as JSON
  from a PDS) go through the whole boundary a meshlet applies (lexicon + protocol validity
  rule + size, then JSON -> core record) and the admitted ones into a small simulated
  commune, whose invariants (identical placements, every slot's owner runs it, nobody else
  does, over-replication bound) are checked at the end. A crash is any exception out of the
  boundary other than the refusal it promises (`InvalidRecord`), or out of the simulator.
- `frames_through_decoder(steps)`: firehose frames (signed commits of valid and invalid
  records, mutated bodies, random CBOR, random bytes) go into `FrameDecoder.process` and
  `RepoMirror.apply`. Invariants: nothing raises; every delivered record passes validation;
  only watched repos are delivered; the mirror stays within its bound.

Strategies are hypothesis strategies; the suite runs them with a fixed seed (recorded in
the test), the bench with a seed it prints. A seed replays only inside `fixed_constants()`:
hypothesis (since 6.131) mixes string and number constants from the source of every module
of ours that happens to be imported into what it generates, so without it the same seed drew
other records in a lone run than in the full suite (whose earlier tests import more).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import libipld
from hypothesis import strategies as st

from meshletd.atproto.frames import FrameDecoder, Interest, RepoMirror
from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.atproto.testing import FakeRepo, frame
from meshletd.core.records import Workload
from meshletd.errors import InvalidRecord
from meshletd.sim import world

WORKLOAD = "commune.scheduler.workload"
MEMBERSHIP = "commune.scheduler.membership"
SIM_EPOCH = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=world.EPOCH)


@dataclass
class Tally:
    tried: int = 0
    admitted: int = 0
    refused: int = 0
    crashes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.tried += other.tried
        self.admitted += other.admitted
        self.refused += other.refused
        self.crashes += other.crashes
        self.violations += other.violations


# -- reproducible generation --------------------------------------------------------------

# The modules whose constants hypothesis may mix into generated values: the rules the
# records are judged by, so that their own boundary strings ("oci-archive", "--", ...) come up.
CONSTANT_MODULES = (
    "meshletd.atproto.validity",
    "meshletd.atproto.lexicon",
    "meshletd.runtime.spec",
    "meshletd.core.bounds",
    "tests.fuzzing",
)


@contextmanager
def fixed_constants() -> Iterator[None]:
    """Generate from the constants of CONSTANT_MODULES only, whatever else is imported: the
    same seed then draws the same values in any run (hypothesis' pool is private API, pinned
    with the hypothesis version in pyproject.toml; a change there fails loudly here)."""
    from hypothesis.internal.conjecture import providers
    from hypothesis.internal.constants_ast import constants_from_module

    pool = providers.Constants(
        integers=providers.SortedSet(),
        floats=providers.SortedSet(key=providers.float_to_int),
        bytes=providers.SortedSet(),
        strings=providers.SortedSet(),
    )
    for name in CONSTANT_MODULES:
        pool = pool | constants_from_module(importlib.import_module(name))
    saved = providers._get_local_constants
    providers._get_local_constants = lambda: pool
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = saved
        providers.CONSTANTS_CACHE.cache.clear()


# -- generated values ---------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=20),
    st.floats(allow_nan=True),
    st.binary(max_size=8),
)
json_values = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    v: Any = {"leaf": 1}
    for i in range(depth - 1):
        v = {"x": v} if i % 2 else [v]
    return v


deep_values = st.integers(20, 2500).map(nested)


def _datetime(offset_ms: int) -> str:
    t = SIM_EPOCH + timedelta(milliseconds=offset_ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


created_at_realistic = st.integers(-60_000, 60_000).map(_datetime)
created_at_extreme = st.one_of(
    created_at_realistic,
    st.sampled_from(
        [
            "0001-01-01T00:00:00.000Z",
            "1970-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.999Z",
            "2027-01-15T08:00:00+14:00",
        ]
    ),
    st.integers(-(10**12), 10**12).map(_datetime),
)

_images = st.one_of(
    st.sampled_from(
        [
            "docker.io/library/nginx:1.27",
            "localhost/busybox",
            "--privileged",
            "oci-archive:/tmp/x",
            "docker-daemon:x",
            "a b",
            "",
            "x" * 600,
            "nginx@sha256:" + "a" * 64,
        ]
    ),
    st.text(max_size=30),
)
_env = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(["A", "_B1", "A=B", "A\0", ""]), st.text(max_size=8)),
        "value": st.one_of(st.text(max_size=10), st.just("x\0y")),
    }
)


def workload_values(created_at: st.SearchStrategy[str] = created_at_realistic) -> Any:
    """Workload record values: a valid one, then none, one or two of its fields replaced by
    something hostile (about a third stay valid)."""
    valid = st.fixed_dictionaries(
        {
            "$type": st.just(WORKLOAD),
            "name": st.sampled_from(["web", "db", "job-1"]),
            "image": st.sampled_from(["docker.io/library/nginx:1.27", "localhost/busybox"]),
            "resources": st.fixed_dictionaries(
                {
                    "milliCpu": st.sampled_from([1, 100, 500, 4000]),
                    "memoryMiB": st.sampled_from([4, 64, 512]),
                }
            ),
            "replicas": st.integers(1, 4),
            "kind": st.sampled_from(["service", "job"]),
            "cluster": st.just(world.CLUSTER),
            "createdAt": created_at,
        },
        optional={
            "restartPolicy": st.sampled_from(["always", "on-failure", "never"]),
            "bidWindowMs": st.integers(500, 10_000),
            "env": st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["A", "B_1"]), "value": st.text(max_size=8)}
                ),
                max_size=1,
            ),
            "paused": st.booleans(),
            "constraints": st.fixed_dictionaries(
                {},
                optional={
                    "arch": st.lists(st.sampled_from(["amd64", "arm64", "vax"]), max_size=2),
                    "allowPacking": st.booleans(),
                    "avoidMeshlets": st.lists(st.just("did:plc:mesh00001"), max_size=1),
                },
            ),
        },
    )
    hostile = st.one_of(
        st.tuples(st.just("image"), _images),
        st.tuples(st.just("env"), st.lists(_env, min_size=1, max_size=3)),
        st.tuples(
            st.just("resources"),
            st.fixed_dictionaries(
                {"milliCpu": st.integers(-5, 2_000_000), "memoryMiB": st.integers(-5, 20_000_000)}
            ),
        ),
        st.tuples(st.just("replicas"), st.sampled_from([0, 1000, 1001, -1, "1"])),
        st.tuples(st.just("kind"), st.sampled_from(["daemonset", "", "Service"])),
        st.tuples(st.just("restartPolicy"), st.sampled_from(["sometimes", ""])),
        st.tuples(st.just("cluster"), st.sampled_from(["elsewhere", ""])),
        st.tuples(st.just("createdAt"), st.one_of(created_at_extreme, st.text(max_size=30))),
        st.tuples(st.just("bidWindowMs"), st.integers(-10, 10**9)),
        st.tuples(st.just("name"), st.text(max_size=70)),
        st.tuples(st.just("command"), st.lists(st.text(max_size=10), max_size=3)),
        st.tuples(st.just("extra"), st.one_of(json_values, deep_values)),
        st.tuples(st.sampled_from(["image", "resources", "kind", "env", "$type"]), json_values),
    )

    def apply(pair: tuple[dict[str, Any], list[tuple[str, Any]]]) -> dict[str, Any]:
        value, changes = pair
        value = dict(value)
        for key, junk in changes:
            value[key] = junk
        return value

    return st.tuples(valid, st.lists(hostile, max_size=2)).map(apply)


# -- the record boundary, and the simulator behind it ----------------------------------------


def admit(uri: str, cid: str, value: Any) -> Workload | None:
    """What a meshlet makes of one record value: the core record, or None if refused.
    Raises only on a crash (anything but the promised `InvalidRecord`)."""
    lex = default_lexicons()
    collection, rkey = uri.split("/")[3], uri.split("/")[4]
    try:
        lex.validate_record(collection, value, rkey=rkey)
        lex.validate_size(collection, value)
    except InvalidRecord:
        return None
    rec = record_from_json(uri, cid, value)  # admitted: converting it must not fail
    assert isinstance(rec, Workload)
    return rec


def runtime_refusal(wl: Workload, value: dict[str, Any]) -> str | None:
    """Why the runtime would refuse to start a replica of an admitted workload, or None.
    (Admitted means every meshlet bids on it: the runtime must then be able to run it.)"""
    from meshletd.core.actions import StartReplica
    from meshletd.daemon.engine import replica_spec
    from meshletd.runtime.spec import InvalidReplicaSpec, validate_spec

    secrets = {ref.name: b"s" for ref in wl.secrets}
    try:
        validate_spec(replica_spec(StartReplica(wl, 0, 0), secrets, "alice.example.com"))
    except InvalidReplicaSpec as e:
        return e.message
    return None


def records_through_sim(values: list[Any], seed: int, *, meshlets: int = 4) -> Tally:
    """Admit each value as one owner's workload and run the admitted ones in a small
    commune (virtual time, 6 minutes); see the module docstring."""
    tally = Tally(tried=len(values))
    cfg = world.Config(meshlets=meshlets, workloads=0, seed=seed, hours=0.1, delete_fraction=0)
    sim = world.Sim(cfg)
    for i, value in enumerate(values):
        owner = sim.nodes[i % meshlets].owner
        uri = f"at://{owner}/{WORKLOAD}/w{i:04d}"
        try:
            wl = admit(uri, f"bafyfuzz{i}", value)
        except Exception as e:
            tally.crashes.append(f"boundary: {type(e).__name__}: {str(e)[:200]}")
            continue
        if wl is None:
            tally.refused += 1
            continue
        tally.admitted += 1
        why = runtime_refusal(wl, value)
        if why is not None:
            tally.violations.append(f"admitted, but the runtime refuses it: {why}")
        # Published as written (createdAt kept): the record is what every meshlet reads.
        sim.workloads[wl.uri] = wl
        sim.store[wl.uri] = wl
        sim._writes += 1
        sim._broadcast(wl.uri, wl, sim.now + 20)
    # Every record a meshlet writes must pass its own lexicon: a bid or status the daemon
    # could not publish would be a decision nobody else sees (issue #15, point 1).
    write = sim._write
    unpublishable: list[str] = []

    def checked_write(node: Any, uri: str, rec: Any) -> None:
        if rec is not None and len(unpublishable) < 5:
            collection, rkey = uri.split("/")[3], uri.split("/")[4]
            try:
                value = record_to_json(rec)
                if isinstance(value.get("workload"), dict):
                    value["workload"].setdefault("cid", "bafyreifuzzcid")
                    if not value["workload"]["cid"]:
                        value["workload"]["cid"] = "bafyreifuzzcid"
                default_lexicons().validate_record(collection, value, rkey=rkey)
            except InvalidRecord as e:
                unpublishable.append(f"a meshlet wrote a record its lexicon refuses: {e}")
        write(node, uri, rec)

    sim._write = checked_write  # type: ignore[method-assign]
    try:
        report = sim.run()
    except Exception as e:
        tally.crashes.append(f"simulator: {type(e).__name__}: {str(e)[:200]}")
        return tally
    tally.violations += report["violations"] + unpublishable
    return tally


# -- firehose frames ---------------------------------------------------------------------------


def _membership(members: Any) -> dict[str, Any]:
    return {
        "$type": MEMBERSHIP,
        "cluster": "home",
        "members": members,
        "createdAt": "2026-11-27T06:00:00.000Z",
    }


frame_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from([WORKLOAD, MEMBERSHIP]),
            st.sampled_from(["a", "b", "c"]),
            workload_values(),
        ),
        st.tuples(
            st.just("put"),
            st.just(MEMBERSHIP),
            st.sampled_from(["home", "x"]),
            st.lists(st.sampled_from(["did:plc:bob", "not a did", 5]), max_size=3).map(_membership),
        ),
        st.tuples(
            st.just("delete"),
            st.sampled_from([WORKLOAD, MEMBERSHIP]),
            st.sampled_from(["a", "b", "home"]),
            st.none(),
        ),
        st.tuples(
            st.just("mutate"),
            st.sampled_from(["ops", "repo", "rev", "seq", "blocks", "commit", "since", "tooBig"]),
            st.none(),
            json_values,
        ),
        st.tuples(
            st.just("message"),
            st.sampled_from(["#identity", "#account", "#sync", "#info", "#weird"]),
            st.none(),
            st.dictionaries(
                st.sampled_from(["did", "seq", "active", "name"]), json_values, max_size=3
            ),
        ),
        st.tuples(st.just("bytes"), st.none(), st.none(), st.binary(max_size=64)),
        st.tuples(st.just("cbor"), st.none(), st.none(), json_values),
    ),
    min_size=1,
    max_size=12,
)


def _cbor(value: Any) -> bytes:
    try:
        return libipld.encode_dag_cbor(value)
    except Exception:
        return b"\xa0"


def frames_through_decoder(steps: list[tuple[Any, ...]], *, mirror_bound: int = 8) -> Tally:
    """Feed generated frames of one watched and one unwatched repo; see the module docstring."""
    tally = Tally()
    alice, mallory = FakeRepo("did:plc:alice"), FakeRepo("did:plc:mallory")
    decoder = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key})
    mirror = RepoMirror(max_per_collection=mirror_bound)
    lex = default_lexicons()
    for i, (kind, a, b, c) in enumerate(steps):
        repo = mallory if i % 5 == 4 else alice
        try:
            if kind == "put":
                raw = repo.put(a, b, c)
            elif kind == "delete":
                raw = repo.delete(a, b)
            elif kind == "mutate":
                header, body = libipld.decode_dag_cbor_multi(
                    repo.put(MEMBERSHIP, "home", _membership([]))
                )
                body[a] = c
                raw = _cbor(header) + _cbor(body)
            elif kind == "message":
                raw = frame(a, c) if _cbor(c) != b"\xa0" else frame(a, {})
            elif kind == "cbor":
                raw = _cbor({"op": 1, "t": "#commit"}) + _cbor(c)
            else:
                raw = c
        except Exception:
            continue  # the generator could not build this frame (e.g. unencodable value)
        tally.tried += 1
        try:
            out = decoder.process(raw)
            delivered = [ev for ev in out.events if mirror.apply(ev) is not None]
        except Exception as e:
            tally.crashes.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
            continue
        for ev in delivered:
            if ev.did != alice.did:
                tally.violations.append(f"delivered a record of unwatched {ev.did}")
            if ev.action != "delete":
                try:
                    lex.validate_record(ev.collection, ev.record, rkey=ev.rkey)
                    lex.validate_size(ev.collection, ev.record)
                except Exception as e:
                    tally.violations.append(f"delivered an invalid record {ev.uri}: {e}")
        tally.admitted += sum(1 for ev in delivered if ev.action != "delete")
        tally.refused += len(out.refused)
        if any(n > mirror_bound for n in mirror.counts.values()):
            tally.violations.append("the mirror grew past its bound")
    return tally
