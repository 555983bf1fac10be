"""The JSON form of the host policy (`commune.scheduler.hostPolicy`), beside the other records'
boundary (`meshletd.atproto.records`, which calls these): defaults are the lexicon's."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from meshletd.atproto.lexicon import default_lexicons
from meshletd.core.nsid import NSID_HOST_POLICY
from meshletd.core.records import (
    HostPolicy,
    OwnerCap,
    ScheduleWindow,
    format_datetime_ms,
    parse_datetime_ms,
    split_at_uri,
)

JsonObject = dict[str, Any]
EVERY_DAY = frozenset(range(7))


@cache
def _lexicon_defaults() -> dict[str, Any]:
    return default_lexicons().defaults(NSID_HOST_POLICY)


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    got = obj.get(key)
    return _lexicon_defaults().get(path) if got is None else got


def _obj(value: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    got = value.get(key)
    return got if isinstance(got, Mapping) else {}


def _put(out: JsonObject, key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def host_policy_from_json(uri: str, value: Mapping[str, Any]) -> HostPolicy:
    """The core HostPolicy of a (lexicon-valid) hostPolicy record value."""
    owners = _obj(value, "owners")
    images = _obj(value, "images")
    inbound = _obj(value, "inbound")
    minc = value.get("minContribution")
    schedule = value.get("schedule")
    allow = images.get("allow")
    return HostPolicy(
        uri=uri,
        meshlet=split_at_uri(uri)[0],
        created_at=parse_datetime_ms(value["createdAt"]),
        default_share=int(_get(owners, "defaultShare", "owners.defaultShare")),
        caps=tuple(OwnerCap(str(c["did"]), int(c["share"])) for c in owners.get("caps", ())),
        evicted=frozenset(str(x) for x in value.get("evicted", ())),
        image_allow=None if allow is None else tuple(str(p) for p in allow),
        digests_only=bool(_get(images, "digestsOnly", "images.digestsOnly")),
        network=str(_get(value, "network", "network")),
        inbound_allowed=bool(_get(inbound, "allowed", "inbound.allowed")),
        port_min=_int_or_none(inbound.get("portMin")),
        port_max=_int_or_none(inbound.get("portMax")),
        inbound_address=inbound.get("address"),
        schedule=None
        if schedule is None
        else tuple(
            ScheduleWindow(
                int(w["start"]),
                int(w["end"]),
                frozenset(int(x) for x in w["days"]) if "days" in w else EVERY_DAY,
            )
            for w in schedule
        ),
        job_max_runtime_s=_int_or_none(value.get("jobMaxRuntimeS")),
        min_ratio_permille=None if minc is None else int(minc["ratioPermille"]),
        min_period_days=None if minc is None else int(minc["periodDays"]),
        min_mode=str(_get(minc or {}, "mode", "minContribution.mode")),
    )


def host_policy_to_json(p: HostPolicy) -> JsonObject:
    """The JSON value (with $type) of a host policy; fields at their default are left out."""
    out: JsonObject = {"$type": NSID_HOST_POLICY}
    owners: JsonObject = {}
    if p.default_share != 1000:
        owners["defaultShare"] = p.default_share
    if p.caps:
        owners["caps"] = [{"did": c.did, "share": c.share} for c in p.caps]
    if owners:
        out["owners"] = owners
    if p.evicted:
        out["evicted"] = sorted(p.evicted)
    images: JsonObject = {}
    if p.image_allow is not None:
        images["allow"] = list(p.image_allow)
    if p.digests_only:
        images["digestsOnly"] = True
    if images:
        out["images"] = images
    if p.network != "internet":
        out["network"] = p.network
    inbound: JsonObject = {}
    if p.inbound_allowed:
        inbound["allowed"] = True
    _put(inbound, "portMin", p.port_min)
    _put(inbound, "portMax", p.port_max)
    _put(inbound, "address", p.inbound_address)
    if inbound:
        out["inbound"] = inbound
    if p.schedule is not None:
        out["schedule"] = [
            {
                **({} if w.days == EVERY_DAY else {"days": sorted(w.days)}),
                "start": w.start,
                "end": w.end,
            }
            for w in p.schedule
        ]
    _put(out, "jobMaxRuntimeS", p.job_max_runtime_s)
    if p.min_ratio_permille is not None:
        out["minContribution"] = {
            "ratioPermille": p.min_ratio_permille,
            "periodDays": p.min_period_days if p.min_period_days is not None else 30,
            "mode": p.min_mode,
        }
    out["createdAt"] = format_datetime_ms(p.created_at)
    return out


__all__ = ["host_policy_from_json", "host_policy_to_json"]
