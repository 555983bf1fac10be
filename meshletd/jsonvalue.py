"""JSON as the daemon's interfaces carry it: record values, API views, stored state.

A record or view is checked against its lexicon at the boundary that reads or answers it
(`meshletd.atproto.records`, the XRPC app); between those boundaries it is JSON, typed as such
rather than as `Any`, so that a caller that reads a field says what it expects.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

Json: TypeAlias = "str | int | float | bool | list[Json] | dict[str, Json] | None"
JsonObject: TypeAlias = "dict[str, Json]"


class RecordChange(Protocol):
    """What `Followed` reads of a verified record event (`atproto.firehose.RecordEvent`)."""

    @property
    def did(self) -> str: ...
    @property
    def collection(self) -> str: ...
    @property
    def rkey(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def cid(self) -> str | None: ...
    @property
    def record(self) -> JsonObject | None: ...
    @property
    def uri(self) -> str: ...
