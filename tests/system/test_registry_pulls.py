"""Replicas pull their images from a real registry (Debian's docker-registry), pinned by
digest, bounded in size and time, with a private registry's credentials used only for the
pull; each failure says why. On a booted systemd host, the registry on its gateway.

The images are built inside the host (`podman build` FROM localhost/busybox, no network) and
pushed; the checks run in the host as root, like meshletd
(tests/system/host_scripts/registry_checks.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.hostenv import LocalHost, NspawnHost
from tests.system.registry import DROP_IN, PRIVATE_PASSWORD, PRIVATE_USER, LocalRegistry

CHECKS = "tests/system/host_scripts/registry_checks.py"
BIG_MIB = 3  # the image the size and time bounds are tried on: busybox + 3 MiB


def check(
    host: NspawnHost | LocalHost, name: str, *args: object, stdin: str | None = None
) -> dict[str, Any]:
    done = host.run(host.python, CHECKS, name, *map(str, args), timeout=600, input=stdin)
    if done.returncode != 0:
        pytest.fail(f"check {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(name, json.dumps(got)[:2000])
    return got


@pytest.fixture(scope="module")
def registry(systemd_host: NspawnHost | LocalHost, hostenv_network: str) -> Iterator[LocalRegistry]:
    try:
        reg = LocalRegistry.start(hostenv_network)
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        reg.configure_host(systemd_host)
        assert check(systemd_host, "lend_lan")["applied"]
        yield reg
    finally:
        systemd_host.run("rm", "-f", DROP_IN)
        reg.stop()


@pytest.fixture(scope="module")
def two_versions(systemd_host: NspawnHost | LocalHost, registry: LocalRegistry) -> dict[str, str]:
    """meshlet/app:v1 pushed twice (the tag moved): the digest of each push."""
    ref = f"{registry.open}/meshlet/app:v1"
    registry.build_and_push(systemd_host, ref, "version one")
    first = check(systemd_host, "resolve", ref)["digest"]
    registry.build_and_push(systemd_host, ref, "version two")
    second = check(systemd_host, "resolve", ref)["digest"]
    return {"ref": ref, "first": first, "second": second}


@pytest.fixture(scope="module")
def big_image(systemd_host: NspawnHost | LocalHost, registry: LocalRegistry) -> dict[str, Any]:
    ref = f"{registry.open}/meshlet/big:v1"
    registry.build_and_push(systemd_host, ref, "big", extra_mib=BIG_MIB)
    return {"ref": ref, **check(systemd_host, "resolve", ref)}


def test_a_replica_pulls_its_image_by_digest_and_runs_those_bits_after_the_tag_moved(
    systemd_host: NspawnHost | LocalHost, two_versions: dict[str, str]
) -> None:
    ref, first, second = two_versions["ref"], two_versions["first"], two_versions["second"]
    assert first != second and first.startswith("sha256:")
    old = check(systemd_host, "run_pinned", ref, first, "pinned-old")
    assert old["event"] == "ReplicaRunning", old
    assert old["printed"] == "version one"  # the tag now means "two": the digest holds
    assert old["local_digest"] == first
    assert old["pull_ms"] > 0 and old["progress"], old  # pulled, with progress
    assert old["left"] == {"state_dirs": [], "podman_call_units": [], "auth_files": []}
    new = check(systemd_host, "run_pinned", ref, second, "pinned-new")
    assert new["event"] == "ReplicaRunning" and new["printed"] == "version two", new


def test_a_private_image_needs_the_owners_credentials_which_stay_out_of_units_and_logs(
    systemd_host: NspawnHost | LocalHost, registry: LocalRegistry
) -> None:
    ref = f"{registry.private}/alice/secret-app:v1"
    registry.build_and_push(systemd_host, ref, "private bits", private=True)
    got = check(systemd_host, "private", ref, PRIVATE_USER, stdin=PRIVATE_PASSWORD + "\n")
    assert got["without"]["error"] == "ImageUnauthorized", got["without"]
    assert got["wrong"]["error"] == "ImageUnauthorized", got["wrong"]
    assert got["with"]["event"] == "ReplicaRunning" and got["with"]["printed"] == "private bits"
    assert not got["password_in_unit"]
    assert not got["password_in_journal"], got["leaks"]
    assert got["left"]["auth_files"] == [] and got["left"]["state_dirs"] == []


def test_an_image_the_registry_does_not_have_fails_as_not_found(
    systemd_host: NspawnHost | LocalHost, registry: LocalRegistry, two_versions: dict[str, str]
) -> None:
    got = check(systemd_host, "not_found", registry.open)
    for case in ("digest", "repository"):
        assert got[case]["error"] == "ImageNotFound", got[case]
        assert "not found" in got[case]["message"], got[case]
    assert got["left"]["state_dirs"] == [] and got["left"]["podman_call_units"] == []


def test_an_image_over_the_size_bound_is_refused_before_any_layer_is_pulled(
    systemd_host: NspawnHost | LocalHost, big_image: dict[str, Any]
) -> None:
    bound = big_image["size_bytes"] - 1
    got = check(systemd_host, "too_large", big_image["ref"], big_image["digest"], bound)
    assert got["error"] == "ImageTooLarge" and str(bound) in got["message"], got
    assert not got["pulled"] and got["left"]["state_dirs"] == []


def test_a_pull_slower_than_the_time_bound_fails_as_timed_out_and_leaves_nothing(
    systemd_host: NspawnHost | LocalHost, registry: LocalRegistry, big_image: dict[str, Any]
) -> None:
    # The same image through the trickling proxy (64 KiB/s): 3 MiB takes ~50 s; allow 4.
    slow_ref = big_image["ref"].replace(registry.open, registry.slow)
    got = check(systemd_host, "timeout", slow_ref, big_image["digest"], 4)
    assert got["error"] == "PullTimedOut" and "more than 4 s" in got["message"], got
    assert 4 <= got["seconds"] < 15, got
    assert got["progress"], got  # the status showed the pull under way meanwhile
    assert got["left"] == {"state_dirs": [], "podman_call_units": [], "auth_files": []}, got
