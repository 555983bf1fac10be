"""The host policy as an operator writes it: `meshlet.toml` `[policy]`, `meshletctl policy
set KEY VALUE` and `meshletctl policy --file F` (docs/cli.md), and its conversion to and from
the `commune.scheduler.hostPolicy` record value (docs/records.md).

Example::

    [policy]
    default_share = 250                      # permille of the contribution per owner
    caps = { "did:plc:alice" = 1000 }        # overrides for named owners
    evicted = ["did:plc:mallory"]
    images = ["registry.example:5000/alice/*", "docker.io/library/**"]
    digests_only = false
    network = "internet"                     # none | internet | lan
    schedule = ["Mon-Fri 18:00-24:00", "Sat,Sun 00:00-24:00"]   # UTC
    job_max_runtime_s = 86400
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from meshletd.atproto.hostpolicy import host_policy_to_json
from meshletd.core.nsid import NSID_HOST_POLICY
from meshletd.core.records import HostPolicy, OwnerCap, ScheduleWindow, at_uri
from meshletd.errors import InvalidRequest

Did = Annotated[
    str, StringConstraints(pattern=r"^did:(plc|web):[A-Za-z0-9._:%-]+$", max_length=2048)
]
Share = Annotated[int, Field(ge=1, le=1000)]
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WINDOW_RE = re.compile(
    r"^(?:(?P<days>[A-Za-z,\-*]+)\s+)?(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})$"
)
EVERY_DAY = frozenset(range(7))


class MinContributionSettings(BaseModel):
    """The free-rider rule (judged by the commons rules, docs/protocol.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ratio_permille: int = Field(ge=0, le=1_000_000)
    period_days: int = Field(default=30, ge=1, le=365)
    mode: Literal["after", "refuse"] = "after"


class PolicySettings(BaseModel):
    """meshlet.toml `[policy]`: what this machine lends and to whom (docs/cli.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default_share: Share = 1000
    caps: dict[Did, Share] = Field(default_factory=dict, max_length=256)
    evicted: list[Did] = Field(default_factory=list, max_length=256)
    images: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] | None = Field(
        default=None, max_length=64
    )
    digests_only: bool = False
    network: Literal["none", "internet", "lan"] = "internet"
    inbound_allowed: bool = False
    inbound_ports: Annotated[str, StringConstraints(pattern=r"^\d{1,5}-\d{1,5}$")] | None = None
    inbound_address: str | None = None
    schedule: list[str] | None = Field(default=None, max_length=32)
    job_max_runtime_s: int | None = Field(default=None, ge=1, le=31_622_400)
    min_contribution: MinContributionSettings | None = None

    @field_validator("schedule")
    @classmethod
    def _windows_parse(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for text in value:
                parse_window(text)
        return value

    @field_validator("inbound_ports")
    @classmethod
    def _port_range(cls, value: str | None) -> str | None:
        if value is not None:
            lo, hi = (int(x) for x in value.split("-"))
            if not 1 <= lo <= hi <= 65535:
                raise ValueError("must be MIN-MAX with 1 <= MIN <= MAX <= 65535")
        return value

    @field_validator("inbound_address")
    @classmethod
    def _ip_literal(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)  # ValueError names what is wrong
        return value


def _days(text: str) -> frozenset[int]:
    if text == "*":
        return EVERY_DAY
    out: set[int] = set()
    for part in text.split(","):
        names = part.split("-")
        try:
            idx = [DAYS.index(n.capitalize()[:3]) for n in names if len(n) >= 3]
        except ValueError:
            raise ValueError(f"unknown day in {text!r} (Mon..Sun)") from None
        if len(idx) != len(names) or len(idx) > 2:
            raise ValueError(f"bad days {text!r}: e.g. Mon-Fri or Sat,Sun")
        a, b = idx[0], idx[-1]
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


def _minute(text: str) -> int:
    h, m = (int(x) for x in text.split(":"))
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(f"bad time {text!r} (HH:MM, 00:00-24:00)")
    return h * 60 + m


def parse_window(text: str) -> tuple[ScheduleWindow, ...]:
    """`[DAYS ]HH:MM-HH:MM` in UTC (DAYS: `Mon-Fri`, `Sat,Sun`, `*`; absent: every day) as
    lexicon windows; one that crosses midnight continues on the next days."""
    m = _WINDOW_RE.match(text.strip())
    if m is None:
        raise ValueError(f"bad window {text!r}: e.g. 'Mon-Fri 08:00-18:00'")
    days = _days(m["days"]) if m["days"] else EVERY_DAY
    start, end = _minute(m["start"]), _minute(m["end"])
    if start == end or start == 1440:
        raise ValueError(f"empty window {text!r}")
    if start < end:
        return (ScheduleWindow(start, end, days),)
    after = frozenset((d + 1) % 7 for d in days)
    first = ScheduleWindow(start, 1440, days)
    return (first, ScheduleWindow(0, end, after)) if end else (first,)


def format_window(w: ScheduleWindow) -> str:
    """A lexicon window in the `[DAYS ]HH:MM-HH:MM` form."""

    def hhmm(x: int) -> str:
        return f"{x // 60:02d}:{x % 60:02d}"

    span = f"{hhmm(w.start)}-{hhmm(w.end)}"
    if w.days == EVERY_DAY:
        return span
    days = sorted(w.days)
    runs: list[list[int]] = []
    for d in days:
        if runs and runs[-1][-1] == d - 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    text = ",".join(DAYS[r[0]] if len(r) == 1 else f"{DAYS[r[0]]}-{DAYS[r[-1]]}" for r in runs)
    return f"{text} {span}"


def to_policy(s: PolicySettings, meshlet: str, created_at: int) -> HostPolicy:
    """The core host policy of the settings."""
    ports = None if s.inbound_ports is None else [int(x) for x in s.inbound_ports.split("-")]
    minc = s.min_contribution
    return HostPolicy(
        uri=at_uri(meshlet, NSID_HOST_POLICY, "self"),
        meshlet=meshlet,
        created_at=created_at,
        default_share=s.default_share,
        caps=tuple(OwnerCap(d, share) for d, share in s.caps.items()),
        evicted=frozenset(s.evicted),
        image_allow=None if s.images is None else tuple(s.images),
        digests_only=s.digests_only,
        network=s.network,
        inbound_allowed=s.inbound_allowed,
        port_min=None if ports is None else ports[0],
        port_max=None if ports is None else ports[1],
        inbound_address=s.inbound_address,
        schedule=None
        if s.schedule is None
        else tuple(w for text in s.schedule for w in parse_window(text)),
        job_max_runtime_s=s.job_max_runtime_s,
        min_ratio_permille=None if minc is None else minc.ratio_permille,
        min_period_days=None if minc is None else minc.period_days,
        min_mode="after" if minc is None else minc.mode,
    )


def to_settings(p: HostPolicy) -> dict[str, Any]:
    """The settings (as in meshlet.toml `[policy]`) of a host policy; defaults left out."""
    out: dict[str, Any] = {}
    if p.default_share != 1000:
        out["default_share"] = p.default_share
    caps: dict[str, int] = {}
    for c in p.caps:
        caps.setdefault(c.did, c.share)
    if caps:
        out["caps"] = caps
    if p.evicted:
        out["evicted"] = sorted(p.evicted)
    if p.image_allow is not None:
        out["images"] = list(p.image_allow)
    if p.digests_only:
        out["digests_only"] = True
    if p.network != "internet":
        out["network"] = p.network
    if p.inbound_allowed:
        out["inbound_allowed"] = True
    if p.port_min is not None and p.port_max is not None:
        out["inbound_ports"] = f"{p.port_min}-{p.port_max}"
    if p.inbound_address is not None:
        out["inbound_address"] = p.inbound_address
    if p.schedule is not None:
        out["schedule"] = [format_window(w) for w in p.schedule]
    if p.job_max_runtime_s is not None:
        out["job_max_runtime_s"] = p.job_max_runtime_s
    if p.min_ratio_permille is not None:
        out["min_contribution"] = {
            "ratio_permille": p.min_ratio_permille,
            "period_days": p.min_period_days or 30,
            "mode": p.min_mode,
        }
    return out


def settings(raw: Mapping[str, Any]) -> PolicySettings:
    """Validated settings; InvalidRequest names the key and what is wrong."""
    try:
        return PolicySettings.model_validate(dict(raw))
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"]) or "policy"
        raise InvalidRequest(f"policy setting {key}: {first['msg']}") from None


def _list(text: str) -> list[str]:
    return [x.strip() for x in re.split(r"[,\n]", text) if x.strip()]


_SEMI = {"schedule"}  # lists whose items contain commas: separated by ';'


def parse_value(key: str, text: str) -> Any:
    """The value of one setting from its text (`meshletctl policy set KEY VALUE`)."""
    fields = PolicySettings.model_fields
    if key not in fields:
        known = ", ".join([*fields, "evict", "unevict"])
        raise InvalidRequest(f"unknown policy setting {key!r} (known: {known})")
    if key in ("default_share", "job_max_runtime_s"):
        try:
            return int(text)
        except ValueError:
            raise InvalidRequest(f"policy setting {key}: not an integer: {text!r}") from None
    if key in ("digests_only", "inbound_allowed"):
        if text.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            raise InvalidRequest(f"policy setting {key}: not a boolean: {text!r}")
        return text.lower() in ("true", "yes", "1", "on")
    if key in ("evicted", "images"):
        return _list(text)
    if key in _SEMI:
        return [x.strip() for x in text.split(";") if x.strip()]
    if key == "caps":
        out: dict[str, int] = {}
        for item in _list(text):
            did, _, share = item.rpartition("=")
            if not did or not share.isdigit():
                raise InvalidRequest(f"policy setting caps: {item!r} is not DID=PERMILLE")
            out[did] = int(share)
        return out
    if key == "min_contribution":
        parts = dict(p.split("=", 1) for p in _list(text) if "=" in p)
        return parts
    return text


def set_setting(current: HostPolicy, key: str, text: str, now: int) -> HostPolicy:
    """`current` with one setting changed (empty text: back to its default); `evict DID` and
    `unevict DID` add or remove one evicted owner."""
    s = to_settings(current)
    if key in ("evict", "unevict"):
        did = text.strip()
        evicted = [d for d in s.get("evicted", []) if d != did]
        if key == "evict":
            evicted.append(did)
        s["evicted"] = evicted
    elif text.strip() == "":
        if key not in PolicySettings.model_fields:
            parse_value(key, text)  # raises: an unknown setting
        s.pop(key, None)
    else:
        s[key] = parse_value(key, text)
    return to_policy(settings(s), current.meshlet, now)


def record_value(p: HostPolicy) -> dict[str, Any]:
    """The record value to publish."""
    return host_policy_to_json(p)


def same_rules(a: HostPolicy | None, b: HostPolicy | None) -> bool:
    """Whether two policies say the same (their createdAt aside): republishing the same rules
    with a later createdAt would hand the rounds closed in between back to no policy."""
    if a is None or b is None:
        return a is b
    return record_value(a) | {"createdAt": ""} == record_value(b) | {"createdAt": ""}


__all__ = [
    "PolicySettings",
    "format_window",
    "parse_value",
    "parse_window",
    "record_value",
    "same_rules",
    "set_setting",
    "settings",
    "to_policy",
    "to_settings",
]
