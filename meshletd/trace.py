"""Timing trace of a workload's way to running, for benchmarks (`dev/bench latency`).

Off unless `MESHLET_TRACE=1` is in meshletd's environment. Each step is one DEBUG line of
the `meshletd.trace` logger: `STEP t=<wall-clock seconds> key=value ...`. The wall clock is
the one every meshletd on a machine shares, so a bench can line up the steps of several
meshlets (and the PDS's own commit times) on one time axis.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("meshletd.trace")
if os.environ.get("MESHLET_TRACE", "") not in ("", "0"):
    log.setLevel(logging.DEBUG)


def enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def trace(step: str, **fields: object) -> None:
    """Log one step (cheap when tracing is off)."""
    if log.isEnabledFor(logging.DEBUG):
        rest = " ".join(f"{k}={v}" for k, v in fields.items())
        log.debug("%s t=%.6f %s", step, time.time(), rest)
