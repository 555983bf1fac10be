"""meshletctl understands the sizes and constraints people type."""

from __future__ import annotations

import pytest

from meshletctl import parse


@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("200", 200),  # the issue's `--cpu 200`: a bare integer is milli-CPU (Nomad-like)
        ("200m", 200),
        ("1000", 1000),
        ("0.5", 500),
        (".25", 250),
        ("1.5", 1500),
        ("2.0", 2000),
        ("2.125", 2125),
        ("0", 0),
        ("5m", 5),
    ],
)
def test_cpu_amounts(text: str, milli: int) -> None:
    assert parse.milli_cpu(text) == milli


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "milli-CPU"),
        ("lots", "milli-CPU"),
        ("1.5m", "milli-CPU"),
        ("-1", "milli-CPU"),
        ("200mm", "milli-CPU"),
        ("0.0001", "finer than one milli-CPU"),
        ("2", "write 2.0"),  # surely meant two cores: refused, not guessed
        ("2000000", "more than 1024 cores"),
    ],
)
def test_bad_cpu_amounts_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(parse.ParseError, match=why):
        parse.milli_cpu(text)


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("64", 64),  # the issue's `--memory 64`: a bare number is MiB
        ("256Mi", 256),
        ("256M", 256),
        ("1G", 1024),
        ("1Gi", 1024),
        ("1.5Gi", 1536),
        ("8192Ki", 8),
        ("6.5", 7),
    ],
)
def test_memory_amounts(text: str, mib: int) -> None:
    assert parse.memory_mib(text) == mib


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("a lot", "give MiB"),
        ("-64", "give MiB"),
        ("64Xi", "give MiB"),
        ("0", "at least 6 MiB"),
        ("512Ki", "at least 6 MiB"),
        ("20Ti", "more than 16 TiB"),
    ],
)
def test_bad_memory_amounts_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(parse.ParseError, match=why):
        parse.memory_mib(text)


def test_names_from_images() -> None:
    assert parse.name_from_image("docker.io/library/nginx:1.25") == "nginx"
    assert parse.name_from_image("ghcr.io/x/My_App@sha256:abc") == "my-app"
    assert parse.name_from_image("localhost/busybox") == "busybox"


def test_constraints() -> None:
    assert parse.constraints(["arch=amd64", "label=gpu", "label=zone=eu", "packing"]) == {
        "arch": ["amd64"],
        "labels": ["gpu", "zone=eu"],
        "allowPacking": True,
    }
    assert parse.constraints(["prefer=did:plc:a", "avoid=did:plc:b"]) == {
        "preferMeshlets": ["did:plc:a"],
        "avoidMeshlets": ["did:plc:b"],
    }
    with pytest.raises(parse.ParseError, match="unknown constraint"):
        parse.constraints(["colour=red"])


def test_key_value() -> None:
    assert parse.key_value("A=b=c") == ("A", "b=c")
    with pytest.raises(parse.ParseError):
        parse.key_value("novalue")
