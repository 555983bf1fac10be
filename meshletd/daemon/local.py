"""What this meshlet knows of itself, shared by the daemon's parts, each field with one writer.

`Local` is the only mutable state the parts share (the composition root makes it and hands
it to each): the configuration (written on reload by the root), the meshlet's state
(`active`/`draining`: written by the owner's commands, and by the root once at start from
the published record), the engine when this meshlet schedules, and the repos it may write
(set by the root after logging in). `Scheduling` is what the parts ask of the engine, and
`FakeScheduling` a stand-in with fixed answers for unit tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Literal, Protocol

from meshletd.config import Config
from meshletd.core.commons import Rule
from meshletd.core.placement import Owner
from meshletd.daemon.repo import Repo

State = Literal["active", "draining"]


class PlacementQueries(Protocol):
    """The scheduler core's read-only queries (`meshletd.core.scheduler.Scheduler`)."""

    @property
    def suspects(self) -> Set[str]:
        """Peers this meshlet's probes currently say are lost."""
        ...

    def placement(self) -> Mapping[str, tuple[Owner | None, ...]]:
        """Workload URI -> the (round, meshlet) owning each slot, or None."""
        ...

    def replicas(self) -> Mapping[tuple[str, int], str]:
        """(workload URI, slot) -> the state of the replica here."""
        ...

    def pending_reasons(self, workload_uri: str) -> dict[int, str]:
        """Slot -> why nobody serves it yet."""
        ...

    def contribution(self) -> tuple[Rule | None, dict[str, int], dict[str, int]]:
        """This host's free-rider rule and (lent, used) per owner (docs/protocol.md s. 23)."""
        ...


class Scheduling(Protocol):
    """The engine as the read model and the owner's commands see it."""

    @property
    def scheduler(self) -> PlacementQueries: ...

    @property
    def units(self) -> Mapping[tuple[str, int], str]:
        """(workload URI, slot) -> the systemd unit of the replica here."""
        ...

    @property
    def admin_slice_keys(self) -> frozenset[str]:
        """Slice limits an administrator's drop-in sets (meshletd leaves them to it)."""
        ...

    def set_draining(self, draining: bool) -> None: ...


@dataclass
class Local:
    cfg: Config
    state: State = "active"
    engine: Scheduling | None = None
    meshlet_repo: Repo | None = None  # this meshlet's own repo (meshlet-app-password)
    owner_repo: Repo | None = None  # the owner's repo (owner-app-password)

    @property
    def did(self) -> str:
        return self.cfg.did

    @property
    def owner(self) -> str:
        return self.cfg.owner


@dataclass
class FakePlacement:
    """`PlacementQueries` with fixed answers."""

    slots: dict[str, tuple[Owner | None, ...]] = field(default_factory=dict)
    local: dict[tuple[str, int], str] = field(default_factory=dict)
    suspects: set[str] = field(default_factory=set)
    reasons: dict[str, dict[int, str]] = field(default_factory=dict)
    rule: Rule | None = None
    lent: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)

    def placement(self) -> Mapping[str, tuple[Owner | None, ...]]:
        return self.slots

    def replicas(self) -> Mapping[tuple[str, int], str]:
        return self.local

    def pending_reasons(self, workload_uri: str) -> dict[int, str]:
        return dict(self.reasons.get(workload_uri, {}))

    def contribution(self) -> tuple[Rule | None, dict[str, int], dict[str, int]]:
        return self.rule, self.lent, self.used


@dataclass
class FakeScheduling:
    """`Scheduling` over a `FakePlacement`; records drain/undrain requests."""

    scheduler: FakePlacement = field(default_factory=FakePlacement)
    units: dict[tuple[str, int], str] = field(default_factory=dict)
    draining: list[bool] = field(default_factory=list)
    admin_slice_keys: frozenset[str] = frozenset()

    def set_draining(self, draining: bool) -> None:
        self.draining.append(draining)
