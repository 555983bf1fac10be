"""The lexicon files load, are well-formed, and validation rejects what it must."""

from __future__ import annotations

import json

import pytest
from atproto_lexicon.parser import lexicon_parse_file

from meshletd.atproto.lexicon import LEXICON_DIR, LexiconError, Lexicons, validate_record
from meshletd.errors import InvalidRecord

NOW = "2026-11-27T06:00:00.000Z"


def test_every_lexicon_file_parses_with_the_sdk_and_our_loader():
    files = sorted(LEXICON_DIR.rglob("*.json"))
    assert len(files) >= 20
    for f in files:
        assert lexicon_parse_file(f) is not None
    lex = Lexicons.load()
    assert "commune.scheduler.workload" in lex.record_nsids()
    assert "farm.meshlet.ping" in lex.docs


def test_lexicons_contain_no_floats_and_every_string_has_a_limit():
    def walk(node, path):
        if isinstance(node, float):
            raise AssertionError(f"float at {path}")
        if isinstance(node, dict):
            if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
                raise AssertionError(f"unbounded string at {path}")
            if node.get("type") == "array":
                assert "maxLength" in node, path
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for f in LEXICON_DIR.rglob("*.json"):
        walk(json.loads(f.read_text()), f.name)


def test_states_are_known_values_not_closed_enums():
    lex = Lexicons.load()
    state = lex.docs["commune.scheduler.workloadStatus"].main["record"]["properties"]["state"]
    assert "running" in state["knownValues"]
    owner = lex.docs["commune.scheduler.meshletOwner"].main["record"]["properties"]["state"]
    assert owner["knownValues"] == ["active", "draining"]


def test_loader_refuses_unbounded_strings(tmp_path):
    p = tmp_path / "x" / "y" / "z.json"
    p.parent.mkdir(parents=True)
    p.write_text(
        json.dumps(
            {
                "lexicon": 1,
                "id": "x.y.z",
                "defs": {
                    "main": {
                        "type": "record",
                        "key": "tid",
                        "record": {"type": "object", "properties": {"s": {"type": "string"}}},
                    }
                },
            }
        )
    )
    with pytest.raises(LexiconError, match="maxLength"):
        Lexicons.load(tmp_path)


def membership(**over):
    return {
        "$type": "commune.scheduler.membership",
        "cluster": "home",
        "members": ["did:plc:abc", "did:web:localhost%3A8080"],
        "createdAt": NOW,
        **over,
    }


def test_valid_membership_passes():
    validate_record("commune.scheduler.membership", membership(), rkey="home")


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"members": ["not-a-did"]}, "members\\[0\\]: not a valid did"),
        ({"members": "did:plc:abc"}, "must be an array"),
        ({"createdAt": "yesterday"}, "not a valid datetime"),
        ({"cluster": "x" * 65}, "longer than 64"),
        ({"extra": 1.5}, "floats are not allowed"),
        ({"cluster": None}, "cluster: required"),
        ({"$type": "commune.scheduler.bid"}, "\\$type"),
    ],
)
def test_invalid_membership_is_rejected_naming_why(over, why):
    with pytest.raises(InvalidRecord, match=why):
        validate_record("commune.scheduler.membership", membership(**over))


def test_too_many_members_is_rejected():
    with pytest.raises(InvalidRecord, match="more than 512 items"):
        validate_record(
            "commune.scheduler.membership",
            membership(members=[f"did:plc:m{i}" for i in range(513)]),
        )


def test_oversized_record_is_rejected_even_through_unknown_fields():
    with pytest.raises(InvalidRecord, match="over the"):
        validate_record("commune.scheduler.membership", membership(padding="x" * 70_000))


def test_literal_record_key_is_enforced():
    owner = {
        "ownerDid": "did:plc:abc",
        "state": "active",
        "arch": "amd64",
        "createdAt": NOW,
        "capacity": {"milliCpu": 1000, "memoryMiB": 512},
    }
    validate_record("commune.scheduler.meshletOwner", owner, rkey="self")
    with pytest.raises(InvalidRecord, match="must be 'self'"):
        validate_record("commune.scheduler.meshletOwner", owner, rkey="other")


def test_nested_refs_are_validated():
    owner = {
        "ownerDid": "did:plc:abc",
        "state": "active",
        "arch": "amd64",
        "createdAt": NOW,
        "capacity": {"milliCpu": -1, "memoryMiB": 512},
    }
    with pytest.raises(InvalidRecord, match=r"capacity\.milliCpu: below the minimum"):
        validate_record("commune.scheduler.meshletOwner", owner)


def test_unknown_collection_is_rejected():
    with pytest.raises(InvalidRecord, match="no record lexicon"):
        validate_record("app.bsky.feed.post", {"text": "hi"})


def test_xrpc_inputs_and_outputs_validate():
    lex = Lexicons.load()
    lex.validate_output("farm.meshlet.ping", {"did": "did:plc:abc", "state": "active"})
    lex.validate_input(
        "farm.meshlet.deleteWorkload", {"uri": "at://did:plc:abc/commune.scheduler.workload/3kabc"}
    )
    with pytest.raises(InvalidRecord, match="uri: not a valid at-uri"):
        lex.validate_input("farm.meshlet.deleteWorkload", {"uri": "http://x"})
    lex.validate_params(
        "farm.meshlet.getLogs",
        {"uri": "at://did:plc:abc/commune.scheduler.workload/w", "lines": 10},
    )


def test_docs_records_md_documents_every_field_and_method():
    doc = (LEXICON_DIR.parent / "docs" / "records.md").read_text()
    lex = Lexicons.load()
    for nsid, d in lex.docs.items():
        if nsid.startswith("farm.meshlet.") and not nsid.endswith(".defs"):
            assert f"`{nsid.rsplit('.', 1)[1]}`" in doc, nsid
            continue
        for name, defn in d.defs.items():
            obj = defn.get("record", defn)
            for field in obj.get("properties", {}):
                assert f"`{field}`" in doc, f"{nsid}#{name}.{field} is not in docs/records.md"
