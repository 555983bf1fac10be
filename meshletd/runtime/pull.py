"""The image step of a replica's start: have the image, or pull it within bounds.

    present?  → done (checked at most once a minute per image)
    local-only (localhost/NAME)?  → ImageNotFound: nothing to pull it from
    ask the registry (meshletd itself, HTTP): not found / unauthorized / bigger than
        `pull_max_bytes` → fail now, saying which
    podman pull (auth file only for this pull), progress from its "Copying blob" lines
    all within `pull_timeout_s` → else PullTimedOut

The size bound is on what the manifest declares (config + layers, compressed); podman
checks every blob against its digest, and a blob is addressed by that digest, so a registry
cannot send other bytes than the declared ones without the pull failing.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from meshletd.errors import RuntimeFailure
from meshletd.runtime.machine import Machine, MachineError
from meshletd.runtime.reference import parse_image
from meshletd.runtime.registry import RegistryError
from meshletd.runtime.spec import ImageNotFound, ImageTooLarge, ImageUnauthorized, PullTimedOut
from meshletd.runtime.units import RuntimeConfig

# (layers begun, layers in all, bytes in all)
Progress = Callable[[int, int, int], object]

# What podman's last stderr line says when the registry refused the credentials.
_UNAUTHORIZED = ("unauthorized", "authentication required", "denied", "401", "403")
_NOT_FOUND = ("manifest unknown", "name unknown", "not found", "404")


def _failure(problem: str, message: str) -> RuntimeFailure:
    if problem == "unauthorized":
        return ImageUnauthorized(message)
    return ImageNotFound(message)


def classify_pull_error(image: str, message: str) -> RuntimeFailure:
    """A failed `podman pull`, by what podman said."""
    low = message.lower()
    if any(word in low for word in _UNAUTHORIZED):
        return ImageUnauthorized(f"{image}: the registry refused access: {message}")
    if any(word in low for word in _NOT_FOUND):
        return ImageNotFound(f"{image}: not found: {message}")
    return ImageNotFound(f"{image} could not be pulled: {message}")


async def fetch_image(
    machine: Machine,
    config: RuntimeConfig,
    image: str,
    *,
    auth: bytes | None = None,
    scratch: str = "",
    progress: Progress | None = None,
) -> int:
    """Make `image` present; returns the bytes pulled (0 if it was there). Raises
    `ImageNotFound`, `ImageUnauthorized`, `ImageTooLarge` or `PullTimedOut`, each saying why."""
    try:
        if await machine.image_present(image):
            return 0
    except MachineError as err:
        raise ImageNotFound(f"image {image} could not be checked: {err}") from err
    ref = parse_image(image)
    if ref.local_only:
        raise ImageNotFound(f"image {image} is not on this machine (localhost/ is never pulled)")
    limit = config.pull_timeout_s
    try:
        with trio.fail_after(limit):
            try:
                remote = await machine.remote_image(image, auth)
            except RegistryError as err:
                if err.problem == "unreachable":
                    # podman may still reach it (a mirror, a proxy in registries.conf)
                    remote = None
                else:
                    raise _failure(err.problem, err.message) from err
            if remote is not None and remote.size_bytes > config.pull_max_bytes:
                raise ImageTooLarge(
                    f"image {image} is {remote.size_bytes} bytes, more than this meshlet pulls "
                    f"({config.pull_max_bytes} bytes)"
                )
            layers = remote.layers if remote is not None else 0
            size = remote.size_bytes if remote is not None else 0
            begun = 0

            def on_line(line: str) -> None:
                nonlocal begun
                if line.startswith("Copying blob") and progress is not None:
                    begun += 1
                    progress(begun, max(layers, begun), size)

            if progress is not None:
                progress(0, layers, size)
            try:
                await machine.pull_image(image, auth=auth, scratch=scratch, on_line=on_line)
            except MachineError as err:
                raise classify_pull_error(image, str(err)) from err
            return size
    except trio.TooSlowError as err:
        raise PullTimedOut(f"pulling image {image} took more than {limit} s") from err
