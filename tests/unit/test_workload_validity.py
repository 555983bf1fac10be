"""One judgement of validity, before bidding, the same on every meshlet (issue #15, point 2):
what the runtime would refuse is refused at intake by the protocol's rule, with the field
and the reason. The hostile specs below were bid on and placed at db8aa19."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.records import record_from_json
from meshletd.atproto.validity import check_workload
from meshletd.core.actions import StartReplica
from meshletd.core.records import Workload
from meshletd.daemon.engine import replica_spec
from meshletd.errors import InvalidRecord
from meshletd.runtime.spec import InvalidReplicaSpec, validate_spec

WORKLOAD = "commune.scheduler.workload"
URI = f"at://did:plc:alice/{WORKLOAD}/web"


def workload(**changes):
    value = {
        "$type": WORKLOAD,
        "name": "web",
        "image": "docker.io/library/nginx:1.27",
        "resources": {"milliCpu": 100, "memoryMiB": 64},
        "replicas": 1,
        "kind": "service",
        "cluster": "home",
        "createdAt": "2026-11-27T06:00:00.000Z",
    }
    for k, v in changes.items():
        if v is None:
            value.pop(k, None)
        else:
            value[k] = v
    return value


HOSTILE = [
    ({"image": "--privileged"}, "image"),
    ({"image": "oci-archive:/tmp/x.tar"}, "image"),
    ({"image": "oci-archive:latest"}, "image"),
    ({"image": "docker-daemon:nginx"}, "image"),
    ({"image": "containers-storage:nginx"}, "image"),
    ({"image": "docker://evil/x"}, "image"),
    ({"image": "nginx; rm -rf /"}, "image"),
    ({"imageDigest": "sha256:ABC"}, "imageDigest"),
    ({"imageDigest": "md5:" + "0" * 64}, "imageDigest"),
    (
        {"image": "r.test/x@sha256:" + "1" * 64, "imageDigest": "sha256:" + "2" * 64},
        "imageDigest",
    ),
    ({"imagePullSecret": "../etc/shadow"}, "imagePullSecret"),
    ({"env": [{"name": "A=B", "value": "x"}]}, "env[0].name"),
    ({"env": [{"name": "A\0B", "value": "x"}]}, "env[0].name"),
    ({"env": [{"name": "A", "value": "x\0y"}]}, "env[0].value"),
    ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "env[1].name"),
    ({"resources": {"milliCpu": 0, "memoryMiB": 64}}, "resources.milliCpu"),
    ({"resources": {"milliCpu": 100, "memoryMiB": 2}}, "resources.memoryMiB"),
    ({"resources": {"milliCpu": 100, "memoryMiB": 2_000_000}}, "resources.memoryMiB"),
    ({"kind": "daemonset"}, "kind"),
    ({"restartPolicy": "sometimes"}, "restartPolicy"),
    ({"command": ["sh\0"]}, "command[0]"),
    ({"secrets": [{"name": "../../etc/passwd"}]}, "secrets[0].name"),
    ({"secrets": [{"name": "db", "env": "X=1"}]}, "secrets[0].env"),
    (
        {"secrets": [{"name": "db", "env": "A"}], "env": [{"name": "A", "value": ""}]},
        "secrets[0].env",
    ),
    ({"ports": [{"name": "Web", "containerPort": 80}]}, "ports[0].name"),
    ({"ports": [{"name": "-web", "containerPort": 80}]}, "ports[0].name"),
    (
        {"ports": [{"name": "a", "containerPort": 80}, {"name": "a", "containerPort": 81}]},
        "ports[1].name",
    ),
    (
        {"ports": [{"name": "a", "containerPort": 80}, {"name": "b", "containerPort": 80}]},
        "ports[1].containerPort",
    ),
    ({"ports": [{"name": "a", "containerPort": 80, "protocol": "sctp"}]}, "ports[0].protocol"),
    ({"ports": [{"name": "a", "containerPort": 80}], "network": "none"}, "ports"),
    ({"healthCheck": {"command": ["CMD-SHELL", "curl x || exit 1"]}}, "healthCheck.command[0]"),
    ({"healthCheck": {"command": ["test", "-f", "/a\0b"]}}, "healthCheck.command[2]"),
]


@pytest.mark.parametrize(("change", "field"), HOSTILE, ids=[f for _, f in HOSTILE])
def test_a_spec_the_runtime_would_refuse_is_an_invalid_record_naming_the_field(change, field):
    with pytest.raises(InvalidRecord) as err:
        default_lexicons().validate_record(WORKLOAD, workload(**change), rkey="web")
    assert err.value.field == field
    assert err.value.reason and field in err.value.message


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"image": "localhost:5000/team/app@sha256:" + "a" * 64},
        {"image": "nginx:1.27"},
        {"image": "docker.io/library/docker:24-dind"},
        {"restartPolicy": None},
        {"kind": "job", "restartPolicy": "never"},
        {"env": [{"name": "_A1", "value": "x=y"}], "secrets": [{"name": "db", "env": "DB"}]},
        {
            "ports": [
                {"name": "http", "containerPort": 80},
                {"name": "dns", "containerPort": 80, "protocol": "udp"},
            ],
            "healthCheck": {"command": ["wget", "-q", "-O-", "http://127.0.0.1/"], "retries": 2},
        },
    ],
)
def test_ordinary_workloads_stay_valid(change):
    default_lexicons().validate_record(WORKLOAD, workload(**change), rkey="web")


def test_the_lexicon_closes_kind_and_restart_policy():
    props = default_lexicons().record_def(WORKLOAD)["record"]["properties"]
    assert props["kind"]["enum"] == ["service", "job"]
    assert props["restartPolicy"]["enum"] == ["always", "on-failure", "never"]
    assert "knownValues" not in props["kind"] and "knownValues" not in props["restartPolicy"]


def _spec(value):
    """The ReplicaSpec the daemon would hand the runtime for this record (engine.spec_for)."""
    wl = record_from_json(URI, "bafyreiabc", value)
    assert isinstance(wl, Workload)
    values = {ref.name: b"s" for ref in wl.secrets}
    return replica_spec(StartReplica(wl, 0, 0), values, wl.owner.rsplit(":", 1)[-1][:16])


_text = st.text(st.characters(codec="utf-8"), max_size=12)
_name = st.one_of(_text, st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))
_image = st.one_of(
    _text,
    st.sampled_from(["nginx", "oci-archive:x", "docker:24", "a/b:c", "localhost:5000/x", "-x"]),
    st.from_regex(r"[a-z0-9]{1,6}(/[a-z0-9]{1,6}){0,2}(:[A-Za-z0-9_.-]{1,8})?", fullmatch=True),
)
_records = st.fixed_dictionaries(
    {
        "image": _image,
        "resources": st.fixed_dictionaries(
            {"milliCpu": st.integers(0, 2_000_000), "memoryMiB": st.integers(0, 2_000_000)}
        ),
        "kind": st.sampled_from(["service", "job", "cron"]),
    },
    optional={
        "restartPolicy": st.sampled_from(["always", "on-failure", "never", "x"]),
        "command": st.lists(_text, max_size=3),
        "args": st.lists(_text, max_size=3),
        "env": st.lists(st.fixed_dictionaries({"name": _name, "value": _text}), max_size=3),
        "secrets": st.lists(
            st.fixed_dictionaries({"name": _name}, optional={"target": _name, "env": _name}),
            max_size=2,
        ),
        "healthCheck": st.fixed_dictionaries(
            {"command": st.lists(st.one_of(_text, st.sampled_from(["cmd", "none"])), max_size=3)}
        ),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_records)
def test_the_runtime_never_refuses_what_the_rule_admits(change):
    value = workload(**change)
    try:
        check_workload(value)
    except InvalidRecord:
        return
    try:
        validate_spec(_spec(value))
    except InvalidReplicaSpec as e:  # pragma: no cover - the property under test
        pytest.fail(f"admitted by the protocol rule, refused by the runtime: {e}")
