"""The record vocabulary (meshletd.core.records) agrees with the lexicons field by field, and
every record round-trips through its JSON form at the one boundary (meshletd.atproto.records)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from meshletd.atproto.lexicon import Lexicons
from meshletd.atproto.records import (
    ADDRESS_FIELDS,
    DEF_FIELDS,
    FIELDS,
    fill_workload,
    record_from_json,
    record_to_json,
)
from meshletd.core import nsid as N
from meshletd.core.records import (
    COLLECTION_OF,
    Bid,
    Endpoint,
    EnvVar,
    HostPolicy,
    Lease,
    Membership,
    MeshletLink,
    MeshletOwner,
    OwnerCap,
    PortSpec,
    ScheduleWindow,
    SecretRef,
    Usage,
    UsageEntry,
    Workload,
    WorkloadStatus,
    at_uri,
    rkey_for_did,
)
from meshletd.errors import InvalidRecord

LEX = Lexicons.load()
ROOT = Path(__file__).parents[2]
T = 1_764_000_000_123  # ms
CID = "bafyreia" + "a" * 52


def _annotation_fits(lexicon: dict, annotation: str) -> bool:
    """Whether a dataclass field's annotation can carry values of a lexicon property."""
    t = lexicon["type"]
    base = annotation.replace(" | None", "")
    if t == "array":
        return base.startswith(("tuple[", "frozenset["))
    if t == "string" and lexicon.get("format") == "datetime":
        return base == "int"  # ms since the epoch
    return base == {"string": "str", "integer": "int", "boolean": "bool"}.get(t)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", sorted(FIELDS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_record_class_and_lexicon_agree_field_by_field(cls: type) -> None:
    nsid = COLLECTION_OF[cls]
    props = LEX.record_properties(nsid)
    mapping = FIELDS[cls]
    # every lexicon property has its place in the class, and only those
    assert set(mapping) == set(props), nsid
    fields = _fields(cls)
    carried = {f for f in mapping.values() if f}
    # every field of the class carries a lexicon property or the record's address
    assert carried <= set(fields), nsid
    assert set(fields) - carried <= ADDRESS_FIELDS, nsid
    for path, name in mapping.items():
        if not name:
            continue
        schema, _required = props[path]
        f = fields[name]
        assert _annotation_fits(schema, str(f.type)), (nsid, path, f.type)
        if "default" in schema:  # the lexicon's default is the class's
            assert f.default == schema["default"], (nsid, path)


@pytest.mark.parametrize("name", sorted(DEF_FIELDS))
def test_def_class_and_lexicon_agree_field_by_field(name: str) -> None:
    cls, mapping = DEF_FIELDS[name]
    props = LEX.object_properties(f"{N.NSID_DEFS}#{name}")
    assert set(mapping) == set(props)
    fields = _fields(cls)
    assert set(mapping.values()) == set(fields)
    for path, field in mapping.items():
        schema, required = props[path]
        assert _annotation_fits(schema, str(fields[field].type)), (name, path)
        if not required:  # an optional property has a default in the class
            assert fields[field].default is not dataclasses.MISSING, (name, path)


def test_every_record_lexicon_has_its_class_and_nsid_constant() -> None:
    assert set(LEX.record_nsids()) == set(COLLECTION_OF.values()) == set(N.RECORD_NSIDS)


def test_every_nsid_constant_names_a_lexicon_and_every_method_lexicon_has_one() -> None:
    methods = {
        n for n, d in LEX.docs.items() if d.main and d.main["type"] in ("query", "procedure")
    }
    assert set(N.METHOD_NSIDS) == methods
    assert N.NSID_DEFS in LEX.docs


W = at_uri("did:plc:alice", N.NSID_WORKLOAD, "3kabcdefghijk")
SAMPLES = [
    Workload(
        uri=W,
        cid=CID,
        owner="did:plc:alice",
        cluster="home",
        milli_cpu=500,
        memory_mib=64,
        replicas=2,
        created_at=T,
        kind="job",
        restart_policy="always",
        bid_window_ms=1500,
        allow_packing=True,
        arch=("amd64",),
        labels=("gpu",),
        avoid=frozenset({"did:plc:x"}),
        image="nginx:1",
        name="web",
        command=("nginx",),
        args=("-g", "daemon off;"),
        env=(EnvVar("A", "b"),),
        secrets=(SecretRef("db", target="db.pem", env="DB"), SecretRef("plain")),
        storage_mib=10,
        prefer=("did:plc:y",),
        paused=True,
        image_digest="sha256:" + "ab" * 32,
        image_pull_secret="regcreds",
        ports=(PortSpec("http", 8080), PortSpec("dns", 53, "udp")),
        health_command=("wget", "-q", "-O-", "http://127.0.0.1:8080/"),
        health_interval_s=5,
        health_timeout_s=2,
        health_retries=2,
        health_start_period_s=10,
        network="lan",
        max_runtime_s=600,
    ),
    Bid(
        uri=at_uri("did:plc:m", N.NSID_BID, "b1"),
        meshlet="did:plc:m",
        workload_uri=W,
        workload_cid=CID,
        round=3,
        slot=1,
        priority=-5,
        slots=1,
        free_milli_cpu=100,
        free_memory_mib=200,
        created_at=T,
    ),
    WorkloadStatus(
        uri=at_uri("did:plc:m", N.NSID_STATUS, "s1"),
        meshlet="did:plc:m",
        workload_uri=W,
        slot=1,
        round=2,
        state="failed",
        updated_at=T + 3,
        exit_code=3,
        restarts=4,
        workload_cid=CID,
        message="exited",
        unit="meshlet-x.service",
        started_at=T + 1,
        finished_at=T + 2,
        health="unhealthy",
        endpoints=(Endpoint("http", "10.0.0.2", 20001, "udp"),),
    ),
    Usage(
        uri=at_uri("did:plc:m", N.NSID_USAGE, "u1"),
        meshlet="did:plc:m",
        period_start=T - 3_600_000,
        period_end=T,
        entries=(UsageEntry("did:plc:bob", 1, 2),),
        created_at=T + 5,
    ),
    Membership(
        uri=at_uri("did:plc:m", N.NSID_MEMBERSHIP, "home"),
        repo="did:plc:m",
        cluster="home",
        members=frozenset({"did:plc:alice", "did:plc:bob"}),
        created_at=T,
    ),
    MeshletOwner(
        uri=at_uri("did:plc:m", N.NSID_MESHLET_OWNER, "self"),
        meshlet="did:plc:m",
        owner="did:plc:alice",
        milli_cpu=4000,
        memory_mib=8192,
        state="draining",
        state_since=T,
        arch="arm64",
        labels=frozenset({"gpu"}),
        endpoint="http://127.0.0.1:7000",
        drains=((T - 10, T - 5),),
        extra='{"future":1}',
        storage_mib=4096,
        encryption_key="a2V5",
        version="1.2.3",
    ),
    MeshletLink(
        uri=at_uri("did:plc:alice", N.NSID_MESHLET, rkey_for_did("did:plc:m")),
        owner="did:plc:alice",
        meshlet="did:plc:m",
        name="box",
        created_at=T,
    ),
    Lease(
        uri=at_uri("did:plc:m", N.NSID_LEASE, "self"),
        meshlet="did:plc:m",
        renewed_at=T,
        valid_ms=150_000,
    ),
    HostPolicy(
        uri=at_uri("did:plc:m", N.NSID_HOST_POLICY, "self"),
        meshlet="did:plc:m",
        created_at=T,
        default_share=250,
        caps=(OwnerCap("did:plc:alice", 1000), OwnerCap("did:plc:bob", 100)),
        evicted=frozenset({"did:plc:mallory"}),
        image_allow=("registry.example:5000/alice/*", "docker.io/library/**"),
        digests_only=True,
        network="none",
        inbound_allowed=True,
        port_min=30000,
        port_max=30100,
        inbound_address="192.0.2.7",
        schedule=(ScheduleWindow(480, 1080, frozenset({0, 1, 2, 3, 4})), ScheduleWindow(0, 60)),
        job_max_runtime_s=3600,
        min_ratio_permille=500,
        min_period_days=30,
        min_mode="refuse",
    ),
]


def _all_fields(rec: object) -> dict[str, object]:
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}  # type: ignore[arg-type]


def test_the_samples_set_every_field_away_from_its_default() -> None:
    # so that the round trip below would notice a field the conversion forgets
    assert {type(r) for r in SAMPLES} == set(COLLECTION_OF)
    for rec in SAMPLES:
        for f in dataclasses.fields(rec):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                assert getattr(rec, f.name) != f.default, (type(rec).__name__, f.name)


@pytest.mark.parametrize("rec", SAMPLES, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_their_json_form(rec: object) -> None:
    value = record_to_json(rec)  # type: ignore[arg-type]
    nsid = COLLECTION_OF[type(rec)]
    assert value["$type"] == nsid
    LEX.validate_record(nsid, value, rkey=rec.uri.rsplit("/", 1)[1])  # type: ignore[attr-defined]
    back = record_from_json(rec.uri, CID, value, validate=True)  # type: ignore[attr-defined]
    assert back == rec
    assert _all_fields(back) == _all_fields(rec)  # fields outside equality too


def test_a_record_that_leaves_fields_out_takes_the_lexicon_defaults() -> None:
    value = {
        "$type": N.NSID_WORKLOAD,
        "name": "w",
        "image": "i",
        "resources": {"milliCpu": 1, "memoryMiB": 4},
        "replicas": 1,
        "kind": "service",
        "cluster": "c",
        "constraints": {},
        "createdAt": "2026-11-27T06:00:00.000Z",
    }
    wl = record_from_json(W, CID, value, validate=True)
    assert isinstance(wl, Workload)
    defaults = LEX.defaults(N.NSID_WORKLOAD)
    assert wl.restart_policy == defaults["restartPolicy"]
    assert wl.bid_window_ms == defaults["bidWindowMs"]
    assert (
        wl.paused is defaults["paused"] and wl.allow_packing is defaults["constraints.allowPacking"]
    )
    assert wl.storage_mib == defaults["resources.storageMiB"]


def test_an_invalid_record_is_refused_when_asked_to_validate() -> None:
    value = record_to_json(SAMPLES[0])
    with pytest.raises(InvalidRecord, match="replicas: below the minimum"):
        record_from_json(W, CID, {**value, "replicas": 0}, validate=True)


def test_the_defaults_of_meshletctl_run_are_applied_once_and_make_a_valid_record() -> None:
    got = fill_workload(
        {"name": "w", "image": "i", "resources": {"milliCpu": 1, "memoryMiB": 4}},
        cluster="home",
        bid_window_ms=700,
        now="2026-11-27T06:00:00.000Z",
    )
    LEX.validate_record(N.NSID_WORKLOAD, got)
    assert (got["cluster"], got["kind"], got["replicas"], got["bidWindowMs"]) == (
        "home",
        "service",
        1,
        700,
    )
    # what the caller gave wins
    assert fill_workload({"kind": "job"}, cluster="c", bid_window_ms=1)["kind"] == "job"


def test_rkey_for_a_local_did_web_is_a_valid_record_key() -> None:
    did = "did:web:localhost%3A8080"
    link = MeshletLink(at_uri("did:plc:o", N.NSID_MESHLET, rkey_for_did(did)), "did:plc:o", did)
    LEX.validate_record(N.NSID_MESHLET, record_to_json(link), rkey=rkey_for_did(did))


def test_no_record_class_is_defined_twice_in_the_product() -> None:
    names: dict[str, list[str]] = {}
    for folder in ("meshletd", "meshletctl"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for m in re.finditer(r"^\s*class (\w+)", path.read_text(), re.M):
                names.setdefault(m.group(1), []).append(str(path.relative_to(ROOT)))
    vocabulary = {c.__name__ for c in COLLECTION_OF} | {c.__name__ for c, _ in DEF_FIELDS.values()}
    twice = {n: where for n, where in names.items() if n in vocabulary and len(where) > 1}
    assert not twice, twice


def test_no_nsid_string_is_retyped_outside_the_nsid_module() -> None:
    nsid = re.compile(r"[\"'](commune\.scheduler|farm\.meshlet)\.[A-Za-z.]+[\"']")
    found = []
    for path in sorted((ROOT / "meshletd").rglob("*.py")):
        if path.name == "nsid.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if nsid.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}")
    assert not found, found
