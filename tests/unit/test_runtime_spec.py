"""Replica specs are checked before anything is made on the machine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshletd.runtime.spec import (
    InvalidReplicaSpec,
    ReplicaId,
    ReplicaSpec,
    Resources,
    Secret,
    validate_image,
    validate_spec,
)

GOOD = ReplicaSpec(
    replica=ReplicaId("did:plc:abc123", "3kabc2def", 0),
    owner_handle="alice.example.com",
    image="localhost/busybox:latest",
    resources=Resources(milli_cpu=250, memory_mib=128, tasks=16),
    args=("sh", "-c", "echo $(id); rm -rf / ; `reboot`"),
    env=(("GREETING", "hi; there"),),
    secrets=(Secret("db-password", b"s3cret"),),
)


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "localhost/busybox:latest",
        "docker.io/library/nginx:1.27-alpine",
        "registry.example.com:5000/team/app_x/web:v1.2.3",
        "ghcr.io/org/img@sha256:" + "a" * 64,
    ],
)
def test_plain_image_references_are_accepted(image: str) -> None:
    assert validate_image(image) == image


@pytest.mark.parametrize(
    "image",
    [
        "busybox; rm -rf /",
        "$(reboot)",
        "`id`",
        "busybox && true",
        "busy box",
        "busybox|sh",
        "-v/:/host",
        "--privileged",
        "busybox\nrm",
        "BUSYBOX",
        "",
        "a" * 600,
    ],
)
def test_image_names_with_shell_characters_or_options_are_refused(image: str) -> None:
    with pytest.raises(InvalidReplicaSpec, match="image"):
        validate_image(image)


def test_a_good_spec_passes_even_with_shell_characters_in_args_and_env() -> None:
    assert validate_spec(GOOD) is GOOD


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resources": Resources(milli_cpu=0, memory_mib=64)}, "milli_cpu"),
        ({"resources": Resources(milli_cpu=100, memory_mib=-1)}, "memory_mib"),
        ({"resources": Resources(milli_cpu=100, memory_mib=2)}, "memory_mib"),
        ({"resources": Resources(milli_cpu=100, memory_mib=64, tasks=0)}, "tasks"),
        ({"resources": Resources(milli_cpu=True, memory_mib=64)}, "milli_cpu"),  # type: ignore[arg-type]
        ({"resources": Resources(milli_cpu=1.5, memory_mib=64)}, "milli_cpu"),  # type: ignore[arg-type]
        ({"replica": ReplicaId("alice", "w", 0)}, "owner_did"),
        ({"replica": ReplicaId("did:plc:x", "a/b", 0)}, "workload"),
        ({"replica": ReplicaId("did:plc:x", "w", -1)}, "index"),
        ({"owner_handle": "alice\nexample"}, "owner_handle"),
        ({"owner_handle": ""}, "owner_handle"),
        ({"args": ("a\0b",)}, "args[0]"),
        ({"env": (("1BAD", "x"),)}, "env name"),
        ({"env": (("A", "x"), ("A", "y"))}, "twice"),
        ({"secrets": (Secret("../etc", b"x"),)}, "secret name"),
        ({"secrets": (Secret("s", b""),)}, "secret s"),
        ({"secrets": (Secret("s", b"x" * (512 * 1024 + 1)),)}, "secret s"),
        ({"secrets": (Secret("s", b"x", env="GREETING"),)}, "also in env"),
        ({"network": "host"}, "network"),
        ({"stop_timeout_s": 100000}, "stop_timeout_s"),
        ({"revision": "bad revision"}, "revision"),
    ],
)
def test_bad_values_are_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidReplicaSpec, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_spec(replace(GOOD, **change))


def test_the_error_has_a_stable_name_and_the_cli_exit_code_of_a_bad_request() -> None:
    err = InvalidReplicaSpec("x")
    assert err.name == "InvalidReplicaSpec"
    assert err.exit_code == 2


def test_secret_data_never_shows_in_a_repr() -> None:
    assert "s3cret" not in repr(GOOD)
