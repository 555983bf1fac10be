"""A workload's spec version (docs/protocol.md, section 25) for every value a PDS can hold."""

from __future__ import annotations

import json
from hashlib import blake2b

import pytest

from meshletd.core.versions import spec_of, spec_version
from tests.fuzzing import admit
from tests.unit.daemon_parts import workload_value

pytestmark = pytest.mark.unit

URI = "at://did:plc:alice/commune.scheduler.workload/w1"


def test_a_field_holding_bytes_is_admitted_and_versioned_alike_from_cbor_or_json() -> None:
    # dev/bench fuzz on the merged main: a record with an unknown field holding bytes (as the
    # firehose decodes DAG-CBOR) crashed the conversion of an admitted record (TypeError).
    from_cbor = workload_value(extra=b"\x00\x01\x02")
    from_json = workload_value(extra={"$bytes": "AAEC"})
    wl = admit(URI, "bafy", from_cbor)
    assert wl is not None
    assert spec_version(from_cbor) == spec_version(from_json) == wl.version
    assert spec_version(workload_value(extra={"$bytes": "AAEC=="})) == wl.version


def test_a_plain_record_keeps_the_version_it_always_had() -> None:
    value = workload_value(args=["sleep", "60"], env=[{"name": "A", "value": "1"}])
    text = json.dumps(spec_of(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec_version(value) == blake2b(text.encode(), digest_size=8).hexdigest()
