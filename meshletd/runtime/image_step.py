"""The image step of a replica's start: the image is present, or pulled within bounds
(pull.py), with progress reported as `ReplicaPulling` events (docs/runtime.md, "Images").

A mixin of `ReplicaRuntime` (runtime.py), which calls it from `start()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from meshletd.errors import RuntimeFailure
from meshletd.runtime.events import ReplicaFailed, ReplicaPulling, RuntimeEvent
from meshletd.runtime.machine import Machine
from meshletd.runtime.pull import fetch_image
from meshletd.runtime.spec import ReplicaId, ReplicaSpec, UnitStartFailed
from meshletd.runtime.units import RuntimeConfig

if TYPE_CHECKING:
    from meshletd.runtime.runtime import _Replica

log = logging.getLogger("meshletd.runtime")

_E = TypeVar("_E", bound=RuntimeEvent)

# An image found present is not checked again for this long (`podman image exists` is a
# process on every start's path). If it vanished meanwhile, the unit fails and the next
# start checks again.
IMAGE_FRESH_S = 60.0


class ImageStep:
    """The image step, run by the runtime before a replica's unit starts."""

    machine: Machine
    config: RuntimeConfig
    _clock: Callable[[], float]
    _image_seen: dict[str, float]
    _pulling: dict[ReplicaId, trio.CancelScope]

    def _emit(self, event: _E) -> _E:
        raise NotImplementedError

    async def _ensure_image(self, rep: _Replica, spec: ReplicaSpec) -> ReplicaFailed | None:
        """The image step (pull.py); a pull may take minutes, and a stop() meanwhile
        cancels it (nothing is started yet)."""
        image = spec.image
        seen = self._image_seen.get(image)
        if seen is not None and self._clock() - seen < IMAGE_FRESH_S:
            return None
        why: RuntimeFailure = UnitStartFailed("stopped while its image was pulled")
        with trio.CancelScope() as self._pulling[spec.replica]:
            try:
                await fetch_image(
                    self.machine, self.config, image, auth=spec.pull_auth, scratch=rep.unit,
                    progress=lambda n, of, size: self._emit(
                        ReplicaPulling(rep.replica, rep.unit, image, n, of, size)
                    ),
                )  # fmt: skip
                self._image_seen[image] = self._clock()
                return None
            except RuntimeFailure as err:
                log.warning("replica %s: image %s: %s", rep.replica, image, err.message)
                why = err
            finally:
                self._pulling.pop(spec.replica, None)
        return self._emit(ReplicaFailed(rep.replica, rep.unit, why.name, why.message))
