"""The control socket's host-policy methods (`farm.meshlet.ctl.getPolicy` / `setPolicy`),
shared by both nodes: what a request asks for, and what an answer shows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshletd.atproto.hostpolicy import host_policy_from_json
from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.records import now_datetime
from meshletd.core.nsid import NSID_HOST_POLICY
from meshletd.core.records import HostPolicy, at_uri, parse_datetime_ms
from meshletd.errors import InvalidRecord, InvalidRequest
from meshletd.policy_settings import record_value, set_setting, settings, to_policy, to_settings


def now_ms() -> int:
    return parse_datetime_ms(now_datetime())


def requested_policy(body: Mapping[str, Any], current: HostPolicy, now: int) -> HostPolicy:
    """The policy a setPolicy request asks for: a whole record value (`policy`), settings
    as in meshlet.toml [policy] (`settings`), or one setting changed (`key`, `value`).
    Raises InvalidRequest naming what is wrong."""
    meshlet = current.meshlet
    if isinstance(body.get("policy"), Mapping):
        value = {**body["policy"], "$type": NSID_HOST_POLICY, "createdAt": now_datetime()}
        try:
            default_lexicons().validate_record(NSID_HOST_POLICY, value, rkey="self")
        except InvalidRecord as e:
            raise InvalidRequest(f"policy: {e}") from None
        got = host_policy_from_json(at_uri(meshlet, NSID_HOST_POLICY, "self"), value)
        return got
    if isinstance(body.get("settings"), Mapping):
        return to_policy(settings(body["settings"]), meshlet, now)
    key = body.get("key")
    if isinstance(key, str) and key:
        value_text = body.get("value", "")
        return set_setting(current, key, value_text if isinstance(value_text, str) else "", now)
    raise InvalidRequest("setPolicy needs policy, settings, or key and value")


def policy_view(p: HostPolicy, published: bool) -> dict[str, Any]:
    """getPolicy's answer: the record value, whether it is published, and its settings."""
    return {"policy": record_value(p), "published": published, "settings": to_settings(p)}


__all__ = ["now_ms", "policy_view", "requested_policy"]
