"""The host-policy rules every observer judges by (docs/protocol.md, section 21).

A meshlet publishes its `hostPolicy` record; whether one of its bids counts is then a pure
function of that record, the workload and the round's close time:

- `refusal(policy, wl)`: why the policy refuses the workload whatever the time (an evicted
  owner, an image source it does not accept, more network than it grants, a job that wants
  longer than it allows), or None;
- `open_at(policy, t)`: whether time t (a round's close, never a local clock) falls in one
  of its lending windows;
- `admits(policy, wl, close)`: both, for a round closing at `close`; a round that closed
  before the policy's `createdAt` is judged without it (it keeps its judgement).

The per-owner caps are judged by the host itself when it bids (`owner_cap`): what an owner
holds on a meshlet depends on every other workload's placement, which each observer resolves
on its own. Pure: no clock, no I/O.
"""

from __future__ import annotations

from functools import lru_cache

from .records import HostPolicy, Workload

DAY_MS = 86_400_000
MINUTE_MS = 60_000
# 1970-01-01 was a Thursday: Monday = 0 makes it day 3.
_EPOCH_WEEKDAY = 3

NETWORKS = ("none", "internet", "lan")  # each grants what the ones before it grant
_NETWORK_RANK = {n: i for i, n in enumerate(NETWORKS)}

# Reasons (stable words: statuses, "why pending" and the CLI show them)
EVICTED = "evicted"
IMAGE = "image"
NETWORK = "network"
MAX_RUNTIME = "maxRuntime"
SCHEDULE = "schedule"
OWNER_CAP = "ownerCap"

REASON_TEXT = {
    EVICTED: "the host evicted this owner",
    IMAGE: "the host does not accept this image source",
    NETWORK: "the host does not grant the network this workload needs",
    MAX_RUNTIME: "the host allows jobs less run time than this one declares",
    SCHEDULE: "outside the host's lending schedule",
    OWNER_CAP: "the owner holds its share of this host",
}


def normalise_image(ref: str) -> str:
    """The reference as the policy's patterns see it: a short name gets the default registry
    (docker.io) and, for one path component there, `library/` (the distribution's own
    normalisation); the tag or digest is kept as written."""
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return ref
    if not slash:
        return f"docker.io/library/{ref}"
    return f"docker.io/{ref}"


MAX_COMPONENTS = 32  # a pattern with more path components matches nothing


def _component_match(glob: str, text: str) -> bool:
    """One path component against a pattern component whose `*` matches any characters:
    the literal pieces must start, end and appear in order (leftmost first is optimal), so
    this is a few `str.find` calls, never a backtracking search."""
    parts = glob.split("*")
    if len(parts) == 1:
        return glob == text
    first, last = parts[0], parts[-1]
    if len(text) < len(first) + len(last) or not (text.startswith(first) and text.endswith(last)):
        return False
    pos, end = len(first), len(text) - len(last)
    for piece in parts[1:-1]:
        at = text.find(piece, pos, end)
        if at < 0:
            return False
        pos = at + len(piece)
    return True


@lru_cache(maxsize=4096)
def pattern_matches(pattern: str, ref: str) -> bool:
    """Whether an image pattern matches a normalised reference whole, component by
    component (split at '/'): a `**` component matches any number of components, `*`
    inside a component any characters of it. Greedy with a return to the last `**` (the
    classic wildcard walk over components): at most 32 x 32 component comparisons."""
    pc, tc = pattern.split("/"), ref.split("/")
    if len(pc) > MAX_COMPONENTS or len(tc) > MAX_COMPONENTS:
        return False
    p = t = 0
    star, mark = -1, 0
    while t < len(tc):
        if p < len(pc) and pc[p] == "**":
            star, mark = p, t
            p += 1
        elif p < len(pc) and _component_match(pc[p], tc[t]):
            p += 1
            t += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(pc) and pc[p] == "**":
        p += 1
    return p == len(pc)


def image_accepted(policy: HostPolicy, image: str) -> bool:
    """Whether the policy accepts this image source: pinned by digest if it says
    digestsOnly, and matched whole by one of its patterns (if it lists any)."""
    if policy.digests_only and "@" not in image:
        return False
    allow = policy.image_allow
    if allow is None:
        return True
    norm = normalise_image(image)
    return any(pattern_matches(p, norm) for p in allow)


def grants_network(policy: HostPolicy, wanted: str) -> bool:
    """Whether the policy grants at least the network `wanted` (an unknown grant is none)."""
    return _NETWORK_RANK.get(policy.network, 0) >= _NETWORK_RANK.get(wanted, len(NETWORKS))


def refusal(policy: HostPolicy, wl: Workload) -> str | None:
    """Why the policy refuses `wl` whatever the time (a reason word), or None."""
    if wl.owner in policy.evicted:
        return EVICTED
    # A tag resolved at publish time runs as name@imageDigest (docs/protocol.md, section
    # 23): the workload is pinned by digest as surely as one whose image names it.
    pinned = f"{wl.image}@{wl.image_digest}" if wl.image_digest and "@" not in wl.image else ""
    if not image_accepted(policy, pinned or wl.image):
        return IMAGE
    if not grants_network(policy, wl.network):
        return NETWORK
    limit = policy.job_max_runtime_s
    if (
        limit is not None
        and wl.kind == "job"
        and wl.max_runtime_s is not None
        and wl.max_runtime_s > limit
    ):
        return MAX_RUNTIME
    return None


def open_at(policy: HostPolicy, t: int) -> bool:
    """Whether UTC time t (ms) falls in one of the policy's lending windows (no schedule:
    always)."""
    windows = policy.schedule
    if windows is None:
        return True
    day = (t // DAY_MS + _EPOCH_WEEKDAY) % 7
    minute = (t % DAY_MS) // MINUTE_MS
    return any(day in w.days and w.start <= minute < w.end for w in windows)


def admits(policy: HostPolicy, wl: Workload, close: int) -> bool:
    """Whether a bid of the policy's meshlet for `wl` may count in a round that closes at
    `close`: a round that closed before the policy was written is judged without it."""
    if close < policy.created_at:
        return True
    return refusal(policy, wl) is None and open_at(policy, close)


def runtime_limit_s(policy: HostPolicy | None, wl: Workload) -> int | None:
    """How long a job of `wl` may run on the policy's meshlet, in seconds: the shorter of
    the job's own maxRuntimeS and the policy's jobMaxRuntimeS; None for a service or when
    neither says."""
    if wl.kind != "job":
        return None
    limits = [x for x in (wl.max_runtime_s, policy and policy.job_max_runtime_s) if x]
    return min(limits) if limits else None


def owner_cap(
    policy: HostPolicy | None,
    owner: str,
    milli_cpu: int,
    memory_mib: int,
    replicas: int | None,
) -> tuple[int, int, int | None]:
    """(milli-CPU, MiB, replicas or None) of a contribution that one owner may hold: its
    share (permille) of each, rounded down."""
    share = 1000 if policy is None else policy.share_of(owner)
    if share >= 1000:
        return milli_cpu, memory_mib, replicas
    return (
        milli_cpu * share // 1000,
        memory_mib * share // 1000,
        None if replicas is None else replicas * share // 1000,
    )


def restrictive(policy: HostPolicy) -> bool:
    """Whether the policy can refuse a workload that needs no more than the default network
    (internet). Every policy, the default included, refuses one that needs `lan` unless it
    grants it: such workloads are judged against every meshlet."""
    return bool(
        policy.evicted
        or policy.image_allow is not None
        or policy.digests_only
        or policy.network not in ("internet", "lan")
        or policy.schedule is not None
        or policy.job_max_runtime_s is not None
    )


__all__ = [
    "EVICTED",
    "IMAGE",
    "MAX_RUNTIME",
    "NETWORK",
    "NETWORKS",
    "OWNER_CAP",
    "REASON_TEXT",
    "SCHEDULE",
    "admits",
    "grants_network",
    "image_accepted",
    "normalise_image",
    "open_at",
    "owner_cap",
    "pattern_matches",
    "refusal",
    "restrictive",
    "runtime_limit_s",
]
