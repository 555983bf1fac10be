"""Images from registries, on the fake machine: references pinned by digest, pulls bounded in
size and time, a failed pull says why, progress in events, credentials only for the pull."""

from __future__ import annotations

import json

import pytest
import trio

from meshletd.runtime.events import ReplicaFailed, ReplicaPulling, ReplicaRunning, RuntimeEvent
from meshletd.runtime.fake import FakeMachine
from meshletd.runtime.pull import classify_pull_error
from meshletd.runtime.reference import parse_image, pinned_image
from meshletd.runtime.registry import auth_file, credentials, insecure_registries
from meshletd.runtime.testing import FakeHarness, serving, spec
from meshletd.runtime.units import RuntimeConfig, unit_properties

DIGEST = "sha256:" + "5a" * 32
IMAGE = "registry.test:5000/team/app:v1"
PINNED = f"registry.test:5000/team/app@{DIGEST}"


@pytest.mark.parametrize(
    ("image", "registry", "repository", "tag", "digest"),
    [
        ("nginx", "docker.io", "library/nginx", None, None),
        ("nginx:1.27", "docker.io", "library/nginx", "1.27", None),
        ("alice/app:v2", "docker.io", "alice/app", "v2", None),
        ("localhost/busybox:latest", "localhost", "busybox", "latest", None),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None),
        (f"ghcr.io/x/y@{DIGEST}", "ghcr.io", "x/y", None, DIGEST),
        (f"10.0.0.1:443/x:t@{DIGEST}", "10.0.0.1:443", "x", "t", DIGEST),
    ],
)
def test_references_split_the_way_podman_reads_them(
    image: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_image(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.local_only == (registry == "localhost")


def test_a_replica_runs_the_image_pinned_to_the_published_digest_without_its_tag() -> None:
    assert pinned_image(IMAGE, DIGEST) == PINNED
    assert pinned_image("localhost/busybox:latest", "") == "localhost/busybox:latest"
    with pytest.raises(ValueError):
        pinned_image(IMAGE, "sha256:short")


def test_a_pull_secret_becomes_an_auth_file_for_its_registry_only() -> None:
    doc = auth_file(b"alice:s3cret\n", "registry.test:5000")
    assert credentials(doc, "registry.test:5000") == ("alice", "s3cret")
    assert credentials(doc, "other.example") is None
    given = json.dumps({"auths": {"r.example": {"auth": "Ym9iOnB3"}}}).encode()
    assert credentials(auth_file(given, "r.example"), "r.example") == ("bob", "pw")
    with pytest.raises(ValueError):
        auth_file(b"no-colon-here", "r.example")


def test_registries_marked_insecure_in_registries_conf_and_its_drop_ins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "registries.conf").write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "127.0.0.1:5000"\n'
        'insecure = true\n[[registry]]\nlocation = "secure.example"\n'
    )
    d = tmp_path / "d"
    d.mkdir()
    (d / "50-test.conf").write_text(
        '[[registry]]\nlocation = "10.251.0.1:45001"\ninsecure = true\n'
    )
    (d / "bad.conf").write_text("not toml [[[")
    got = insecure_registries([str(tmp_path / "registries.conf"), str(d / "*.conf")])
    assert got == {"127.0.0.1:5000", "10.251.0.1:45001"}


@pytest.mark.parametrize(
    ("said", "name"),
    [
        ("reading manifest v1 in r/x: manifest unknown: manifest unknown", "ImageNotFound"),
        (
            "initializing source: reading manifest: unauthorized: authentication required",
            "ImageUnauthorized",
        ),
        ("pinging container registry: connection refused", "ImageNotFound"),
    ],
)
def test_a_failed_podman_pull_is_classified_by_what_podman_said(said: str, name: str) -> None:
    assert classify_pull_error("r/x:v1", said).name == name


def _harness(**kw: object) -> tuple[FakeHarness, FakeMachine]:
    machine = FakeMachine()
    machine.pullable.add(PINNED)
    for k, v in kw.items():
        setattr(machine, k, v)
    return FakeHarness(machine), machine


async def _start(h: FakeHarness, config: RuntimeConfig | None = None, **kw: object):  # type: ignore[no-untyped-def]
    from meshletd.runtime.runtime import ReplicaRuntime

    rt = ReplicaRuntime(h.machine, config or RuntimeConfig())  # type: ignore[arg-type]
    seen: list[RuntimeEvent] = []
    async with serving(rt):
        result = await rt.start(spec(h, image=PINNED, **kw))
        while True:
            try:
                seen.append(rt.events.receive_nowait())
            except trio.WouldBlock:
                break
    return result, seen


async def test_a_missing_image_is_pulled_by_digest_with_its_progress_in_events() -> None:
    h, machine = _harness()
    result, seen = await _start(h)
    assert isinstance(result, ReplicaRunning)
    assert machine.pulls == [(PINNED, None)]
    progress = [e for e in seen if isinstance(e, ReplicaPulling)]
    assert [(p.layers_done, p.layers) for p in progress] == [(0, 2), (1, 2), (2, 2)]
    assert "layer 2 of 2" in progress[-1].message


async def test_the_owners_credentials_are_used_for_the_pull_and_never_in_the_unit() -> None:
    auth = auth_file(b"alice:s3cret", "registry.test:5000")
    h, machine = _harness(pull_credentials={PINNED: auth})
    result, _ = await _start(h, pull_auth=auth)
    assert isinstance(result, ReplicaRunning)
    assert machine.pulls == [(PINNED, auth)]
    (unit,) = machine.units.values()
    props = repr(unit.properties)
    assert "s3cret" not in props and "YWxpY2U6czNjcmV0" not in props
    assert "s3cret" not in repr(spec(h, image=PINNED, pull_auth=auth))
    assert "s3cret" not in repr(unit_properties(spec(h, pull_auth=auth), RuntimeConfig(), "u", "c"))


async def test_a_pull_without_the_right_credentials_fails_as_unauthorized() -> None:
    auth = auth_file(b"alice:s3cret", "registry.test:5000")
    h, _ = _harness(pull_credentials={PINNED: auth})
    result, _ = await _start(h)
    assert isinstance(result, ReplicaFailed) and result.error == "ImageUnauthorized"
    assert h.machine.leftovers() == {  # type: ignore[attr-defined]
        "units": [],
        "containers": [],
        "secrets": [],
        "state_dirs": [],
    }


async def test_an_image_the_registry_does_not_have_fails_as_not_found() -> None:
    h, _ = _harness()
    h.machine.pullable.clear()  # type: ignore[attr-defined]
    result, _ = await _start(h)
    assert isinstance(result, ReplicaFailed) and result.error == "ImageNotFound"
    assert "not found" in result.message


async def test_an_image_bigger_than_the_bound_is_not_pulled() -> None:
    h, machine = _harness(pull_size_bytes=300 << 20)
    result, _ = await _start(h, RuntimeConfig(pull_max_bytes=200 << 20))
    assert isinstance(result, ReplicaFailed) and result.error == "ImageTooLarge"
    assert "314572800 bytes" in result.message and machine.pulls == []


async def test_a_pull_slower_than_the_bound_times_out() -> None:
    h, _ = _harness(pull_delay_s=5.0)
    with trio.fail_after(3):
        result, _ = await _start(h, RuntimeConfig(pull_timeout_s=1))
    assert isinstance(result, ReplicaFailed) and result.error == "PullTimedOut"
    assert "more than 1 s" in result.message


async def test_a_local_only_image_that_is_missing_is_never_pulled() -> None:
    h, machine = _harness()
    from meshletd.runtime.runtime import ReplicaRuntime

    rt = ReplicaRuntime(machine, RuntimeConfig())
    result = await rt.start(spec(h, image="localhost/absent:latest"))
    assert isinstance(result, ReplicaFailed) and result.error == "ImageNotFound"
    assert machine.pulls == []


async def test_a_stop_during_a_long_pull_cancels_it_and_leaves_nothing() -> None:
    from meshletd.runtime.runtime import ReplicaRuntime

    h, machine = _harness(pull_delay_s=60.0)
    rt = ReplicaRuntime(machine, RuntimeConfig())
    got: list[object] = []
    s = spec(h, image=PINNED)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def start() -> None:
                got.append(await rt.start(s))

            nursery.start_soon(start)
            await trio.sleep(0.5)
            assert await rt.stop(s.replica) is None
    (result,) = got
    assert isinstance(result, ReplicaFailed) and "stopped while" in result.message
    assert machine.leftovers() == {"units": [], "containers": [], "secrets": [], "state_dirs": []}
    assert PINNED not in machine.images
