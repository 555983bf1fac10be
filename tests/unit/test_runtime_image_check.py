"""The image check on the start path: `podman image exists` once a minute, not every start."""

from __future__ import annotations

from meshletd.runtime.events import ReplicaFailed, ReplicaRunning
from meshletd.runtime.fake import FakeMachine
from meshletd.runtime.testing import FakeHarness, serving, spec


async def test_an_image_found_present_is_not_checked_again_on_the_next_start() -> None:
    h = FakeHarness(FakeMachine())
    rt = h.runtime()
    checks: list[str] = []
    present = h.machine.image_present

    async def counted(image: str) -> bool:
        checks.append(image)
        return await present(image)

    h.machine.image_present = counted  # type: ignore[method-assign]
    async with serving(rt):
        first = await rt.start(spec(h, workload="a"))
        second = await rt.start(spec(h, workload="b"))
    assert isinstance(first, ReplicaRunning) and isinstance(second, ReplicaRunning)
    assert len(checks) == 1


async def test_a_start_that_fails_makes_the_next_one_check_the_image_again() -> None:
    h = FakeHarness(FakeMachine())
    rt = h.runtime()
    checks: list[str] = []

    async def vanished(image: str) -> bool:  # present when checked, gone when the unit runs
        checks.append(image)
        return True

    h.machine.image_present = vanished  # type: ignore[method-assign]
    img = "localhost/gone:latest"
    assert isinstance(await rt.start(spec(h, workload="a", image=img)), ReplicaFailed)
    assert isinstance(await rt.start(spec(h, workload="b", image=img)), ReplicaFailed)
    assert len(checks) == 2
