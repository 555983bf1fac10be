"""Publishing resolves the image's tag to a digest once, on the owner's meshlet, with the
owner's pull secret; the pull secret goes only to slot holders and only for the pull."""

from __future__ import annotations

import pytest

from meshletd.atproto.records import record_from_json
from meshletd.core.actions import StartReplica
from meshletd.daemon.engine import replica_spec
from meshletd.daemon.secrets import EncryptionKey
from meshletd.errors import Forbidden, NotFound
from meshletd.runtime.registry import RegistryError, credentials
from meshletd.store import MemoryStore
from tests.unit.daemon_parts import OWNER, WORKLOAD, owner_record, parts, put, workload_value

DIGEST = "sha256:" + "d1" * 32
IMAGE = "registry.test:5000/team/app:v1"
WINNER = "did:plc:bobmesh"


def resolver(calls: list[tuple[str, bytes | None]], answer: str | RegistryError = DIGEST):  # type: ignore[no-untyped-def]
    async def resolve(image: str, auth: bytes | None) -> str:
        calls.append((image, auth))
        if isinstance(answer, RegistryError):
            raise answer
        return answer

    return resolve


async def test_publishing_records_the_digest_the_tag_means_now() -> None:
    p = parts()
    calls: list[tuple[str, bytes | None]] = []
    p.commands.resolve_image = resolver(calls)
    got = await p.commands.create_workload(workload_value(image=IMAGE))
    assert got["imageDigest"] == DIGEST and calls == [(IMAGE, None)]
    rkey = got["uri"].rsplit("/", 1)[1]
    stored = p.owner_repo.records[(WORKLOAD, rkey)][1]
    assert stored["image"] == IMAGE and stored["imageDigest"] == DIGEST


async def test_local_images_and_references_by_digest_are_not_asked_of_a_registry() -> None:
    p = parts()
    calls: list[tuple[str, bytes | None]] = []
    p.commands.resolve_image = resolver(calls)
    local = await p.commands.create_workload(
        workload_value(name="a", image="localhost/busybox:latest")
    )
    pinned = await p.commands.create_workload(workload_value(name="b", image=f"r.test/x@{DIGEST}"))
    assert "imageDigest" not in local and pinned["imageDigest"] == DIGEST and calls == []


async def test_a_private_image_resolves_with_the_owners_pull_secret() -> None:
    p = parts()
    calls: list[tuple[str, bytes | None]] = []
    p.commands.resolve_image = resolver(calls)
    p.secrets.put("regcreds", b"alice:s3cret")
    await p.commands.create_workload(workload_value(image=IMAGE, imagePullSecret="regcreds"))
    assert credentials(calls[0][1], "registry.test:5000") == ("alice", "s3cret")
    with pytest.raises(NotFound, match="pull secret 'nope'"):
        await p.commands.create_workload(
            workload_value(name="other", image=IMAGE, imagePullSecret="nope")
        )


@pytest.mark.parametrize(
    ("problem", "error"), [("not-found", NotFound), ("unauthorized", Forbidden)]
)
async def test_a_tag_the_registry_refuses_is_not_published(problem: str, error: type) -> None:
    p = parts()
    p.commands.resolve_image = resolver([], RegistryError(problem, "no"))  # type: ignore[arg-type]
    with pytest.raises(error, match=IMAGE):
        await p.commands.create_workload(workload_value(image=IMAGE))
    assert p.owner_repo.records == {}


async def test_the_pull_secret_is_sealed_to_slot_holders_only() -> None:
    p = parts()
    uri = f"at://{OWNER}/{WORKLOAD}/3kweb"
    value = workload_value(image=IMAGE, imageDigest=DIGEST, imagePullSecret="regcreds")
    p.feed(put(OWNER, "workload", "3kweb", value))
    p.secrets.put("regcreds", b"alice:s3cret")
    key = EncryptionKey(MemoryStore())
    p.view.apply(
        put(WINNER, "meshletOwner", "self", owner_record(WINNER, "did:plc:bob", key.public_b64))
    )
    p.schedule().scheduler.slots[uri] = ((0, WINNER),)
    assert key.unseal(await p.commands.get_secret(WINNER, uri, "regcreds")) == b"alice:s3cret"
    with pytest.raises(Forbidden, match="holds no slot"):
        await p.commands.get_secret("did:plc:eve", uri, "regcreds")


def test_a_slot_holder_runs_the_pinned_image_with_the_pull_secret_as_auth_file() -> None:
    value = workload_value(image=IMAGE, imageDigest=DIGEST, imagePullSecret="regcreds")
    wl = record_from_json(f"at://{OWNER}/{WORKLOAD}/3kweb", "bafyreiabc", value)
    spec = replica_spec(StartReplica(wl, 0, 0), {"regcreds": b"alice:s3cret"}, "alice")  # type: ignore[arg-type]
    assert spec.image == f"registry.test:5000/team/app@{DIGEST}"
    assert credentials(spec.pull_auth, "registry.test:5000") == ("alice", "s3cret")
    assert spec.secrets == ()  # never mounted into the container
    assert "s3cret" not in repr(spec)


def test_run_pull_secret_is_stored_like_a_secret_and_named_only_in_image_pull_secret(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from meshletctl import parse

    auth = tmp_path / "auth.json"
    auth.write_text('{"auths": {"r.test": {"auth": "YTpi"}}}')
    record, secrets = parse.workload_record(IMAGE, [], pull_secret=f"reg=@{auth}")
    assert record["imagePullSecret"] == "reg" and "secrets" not in record
    assert secrets == [("reg", auth.read_bytes())]
    with pytest.raises(parse.ParseError, match="@FILE"):
        parse.workload_record(IMAGE, [], pull_secret="reg=hunter2")


def test_a_digests_only_host_accepts_a_tag_pinned_at_publish_time() -> None:
    from dataclasses import replace

    from meshletd.core.policy import IMAGE as REFUSED_IMAGE
    from meshletd.core.policy import refusal
    from meshletd.core.records import HostPolicy

    value = workload_value(image=IMAGE)
    wl = record_from_json(f"at://{OWNER}/{WORKLOAD}/3kweb", "bafyreiabc", value)
    strict = replace(
        HostPolicy.default("did:plc:host"),
        digests_only=True,
        image_allow=("registry.test:5000/team/*",),
    )
    assert refusal(strict, wl) == REFUSED_IMAGE  # a bare tag could mean anything later
    assert refusal(strict, replace(wl, image_digest=DIGEST)) is None  # type: ignore[arg-type]
