"""Rendezvous (highest-random-weight) scores: the deterministic tie-break of the protocol."""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b

SCORE_BITS = 64


@lru_cache(maxsize=1 << 20)
def rendezvous_score(workload_uri: str, round_: int, slot: int, meshlet: str) -> int:
    """64-bit score of a meshlet for (workload, round, slot): the first 8 bytes, big-endian,
    of BLAKE2b-64 over the UTF-8 text "<workload uri>|<round>|<slot>|<meshlet did>"
    (slot -1 in round 0). Lower scores win ties and are candidates first."""
    text = f"{workload_uri}|{round_}|{slot}|{meshlet}".encode()
    return int.from_bytes(blake2b(text, digest_size=8).digest(), "big")


def own_score(workload_uri: str, round_: int, slot: int, meshlet: str) -> int:
    """`rendezvous_score`, not cached: for a score only one meshlet asks for (its own, when
    a workload arrives), which would only push shared scores out of the cache."""
    text = f"{workload_uri}|{round_}|{slot}|{meshlet}".encode()
    return int.from_bytes(blake2b(text, digest_size=8).digest(), "big")


@lru_cache(maxsize=1 << 16)
def watch_score(target: str, watcher: str) -> int:
    """64-bit score deciding which meshlets probe `target` (lowest WATCHERS scores)."""
    text = f"watch|{target}|{watcher}".encode()
    return int.from_bytes(blake2b(text, digest_size=8).digest(), "big")


def is_candidate(score: int, wanted: int, members: int) -> bool:
    """Whether a meshlet with this score should bid when `wanted` bidders are sought among
    `members` eligible meshlets: score < wanted/members * 2^64 (all if wanted >= members)."""
    if wanted >= members:
        return True
    return score * members < wanted << SCORE_BITS


__all__ = ["is_candidate", "own_score", "rendezvous_score", "watch_score"]
