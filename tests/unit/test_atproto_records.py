"""The pydantic record models agree with the lexicons, and round-trip through them."""

from __future__ import annotations

import typing

import pytest

from meshletd.atproto.lexicon import Lexicons
from meshletd.atproto.records import (
    DEF_MODELS,
    RECORD_MODELS,
    Bid,
    Constraints,
    EnvVar,
    Membership,
    Meshlet,
    MeshletOwner,
    Resources,
    SecretRef,
    Usage,
    UsageEntry,
    Workload,
    WorkloadRef,
    WorkloadStatus,
    parse_any_record,
    rkey_for_did,
)
from meshletd.errors import InvalidRecord

LEX = Lexicons.load()


def _kind(annotation) -> set[str]:
    """Lexicon types a Python annotation can hold."""
    out: set[str] = set()
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return {"array"}
    if args and origin is not None and origin is not typing.Literal:
        for a in args:
            out |= _kind(a)
        return out
    if origin is typing.Literal:
        return {"string"}
    return {
        str: {"string"},
        int: {"integer"},
        bool: {"boolean"},
        bytes: {"bytes"},
        type(None): set(),
    }.get(annotation, {"ref"})


def _check(model, schema):
    props = schema["properties"]
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    assert set(fields) == set(props), model.__name__
    required = {a for a, f in fields.items() if f.is_required()}
    # A model default may fill a required lexicon field (createdAt, state); never the reverse.
    assert required <= set(schema.get("required", [])), model.__name__
    for alias, f in fields.items():
        assert props[alias]["type"] in _kind(f.annotation), (model.__name__, alias)


@pytest.mark.parametrize("nsid", sorted(RECORD_MODELS))
def test_record_model_matches_its_lexicon(nsid):
    _check(RECORD_MODELS[nsid], LEX.record_def(nsid)["record"])


def test_every_record_lexicon_has_a_model():
    assert set(LEX.record_nsids()) == set(RECORD_MODELS)


@pytest.mark.parametrize("name", sorted(DEF_MODELS))
def test_def_model_matches_its_lexicon(name):
    _check(DEF_MODELS[name], LEX.docs["commune.scheduler.defs"].defs[name])


REF = WorkloadRef(
    uri="at://did:plc:alice/commune.scheduler.workload/web", cid="bafyreia" + "a" * 52
)
SAMPLES = [
    Meshlet(meshlet_did="did:plc:mesh", name="box"),
    MeshletOwner(
        owner_did="did:plc:alice",
        capacity=Resources(milli_cpu=4000, memory_mib=8192),
        arch="amd64",
        endpoint="http://127.0.0.1:7000",
        labels=("gpu",),
    ),
    Membership(cluster="home", members=("did:plc:alice", "did:plc:bob")),
    Workload(
        name="web",
        image="nginx:1",
        command=("nginx",),
        args=("-g", "daemon off;"),
        env=(EnvVar(name="A", value="b"),),
        resources=Resources(milli_cpu=500, memory_mib=64),
        replicas=2,
        kind="service",
        restart_policy="always",
        constraints=Constraints(arch=("amd64",), avoid_meshlets=("did:plc:x",)),
        secrets=(SecretRef(name="db"),),
        cluster="home",
    ),
    Bid(workload=REF, round=0, priority=-5, slots=1),
    WorkloadStatus(workload=REF, round=0, slot=1, state="running", exit_code=0),
    Usage(
        period_start="2026-11-27T06:00:00Z",
        period_end="2026-11-27T07:00:00Z",
        entries=(UsageEntry(owner_did="did:plc:bob", milli_cpu_seconds=1, memory_mib_seconds=2),),
    ),
]


@pytest.mark.parametrize("model", SAMPLES, ids=lambda m: type(m).__name__)
def test_records_round_trip_through_their_lexicon(model):
    value = model.to_record()
    assert value["$type"] == model.NSID
    assert parse_any_record(model.NSID, value) == model


def test_writing_an_invalid_record_fails_before_it_reaches_the_pds():
    with pytest.raises(InvalidRecord, match="replicas: below the minimum"):
        Workload.model_construct(
            name="w",
            image="i",
            resources=Resources(milli_cpu=1, memory_mib=1),
            replicas=0,
            cluster="c",
            command=(),
            args=(),
            env=(),
            kind="job",
            restart_policy="never",
            constraints=None,
            secrets=(),
            bid_window_ms=5000,
            paused=False,
            created_at="2026-11-27T06:00:00Z",
        ).to_record()


def test_rkey_for_a_local_did_web_is_a_valid_record_key():
    Meshlet(meshlet_did="did:web:localhost%3A8080").to_record(
        rkey=rkey_for_did("did:web:localhost%3A8080")
    )
