"""meshletctl understands the sizes and constraints people type."""

from __future__ import annotations

import pytest

from meshletctl import parse


@pytest.mark.parametrize(
    ("text", "milli"), [("1", 1000), ("0.5", 500), ("250m", 250), ("2.125", 2125), ("0", 0)]
)
def test_cpu_amounts(text: str, milli: int) -> None:
    assert parse.milli_cpu(text) == milli


@pytest.mark.parametrize("text", ["", "lots", "1.5m", "-1", "0.0001"])
def test_bad_cpu_amounts(text: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.milli_cpu(text)


@pytest.mark.parametrize(
    ("text", "mib"),
    [("256", 256), ("256Mi", 256), ("1G", 1024), ("1Gi", 1024), ("512Ki", 1), ("1.5Gi", 1536)],
)
def test_memory_amounts(text: str, mib: int) -> None:
    assert parse.memory_mib(text) == mib


def test_bad_memory_amount() -> None:
    with pytest.raises(parse.ParseError):
        parse.memory_mib("a lot")


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
