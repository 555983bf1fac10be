"""The `farm.meshlet.*` methods, bound to a `Node`, with their access rules.

Every method follows its lexicon under `lexicons/farm/meshlet/` (a unit test checks names
and kinds against them): the query parameters each method takes, their types, defaults and
bounds are read from its lexicon (`lexicon_params`), never retyped here. The
`farm.meshlet.ctl.*` methods exist only on the control socket, for meshletctl (status,
members, bids, balance, publishing a workload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from meshletd import __version__
from meshletd.atproto.lexicon import Lexicons, default_lexicons
from meshletd.atproto.records import fill_workload
from meshletd.core import nsid as N
from meshletd.core.nsid import (
    CTL_BALANCE,
    CTL_BIDS,
    CTL_CREATE,
    CTL_ENDPOINTS,
    CTL_GET_POLICY,
    CTL_HANDLES,
    CTL_MEMBERS,
    CTL_SET_POLICY,
    CTL_STATUS,
    CTL_USAGE,
    NSID_WORKLOAD,
)
from meshletd.daemon.node import Node, check_owner
from meshletd.errors import Forbidden, InvalidRequest
from meshletd.xrpc.app import Access, Caller, MethodHandler, Param, XrpcApp

__all__ = [
    "CTL_BALANCE",
    "CTL_BIDS",
    "CTL_CREATE",
    "CTL_ENDPOINTS",
    "CTL_HANDLES",
    "CTL_MEMBERS",
    "CTL_STATUS",
    "CTL_USAGE",
    "install",
    "lexicon_params",
]


def lexicon_params(nsid: str, lexicons: Lexicons | None = None) -> dict[str, Param]:
    """The query parameters of `nsid` as its lexicon declares them (name, type, required,
    default, bounds); the lexicon's other rules (lengths, formats) are checked by the app
    against the same lexicon once the values are parsed."""
    schema = (lexicons or default_lexicons()).parameters(nsid) or {}
    required = set(schema.get("required", ()))
    out: dict[str, Param] = {}
    for name, p in schema.get("properties", {}).items():
        array = p["type"] == "array"
        item = p["items"] if array else p
        out[name] = Param(
            item["type"],
            required=name in required,
            default=p.get("default"),
            minimum=item.get("minimum"),
            maximum=item.get("maximum"),
            array=array,
        )
    return out


def _uri(body: Any) -> str:
    uri = body.get("uri") if isinstance(body, dict) else None
    if not isinstance(uri, str) or not uri:
        raise InvalidRequest("input needs a uri")
    return uri


def install(
    app: XrpcApp,
    node: Node,
    *,
    on_shutdown: Callable[[bool], None],
    default_cluster: Callable[[], str] = lambda: "default",
    default_bid_window_ms: Callable[[], int] = lambda: 5000,
) -> None:
    """Register every method of the API on `app`, served by `node`."""

    async def ping(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {"did": node.did, "state": node.state(), "version": __version__}

    async def get_capacity(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {"did": node.did, "state": node.state(), "capacity": node.capacity()}

    async def list_workloads(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        views = node.workloads(owner=params.get("owner"))
        start = 0
        if params.get("cursor"):
            try:
                start = int(params["cursor"])
            except ValueError:
                raise InvalidRequest("bad cursor") from None
        limit = params["limit"]
        page = views[start : start + limit]
        out: dict[str, Any] = {"workloads": page}
        if start + limit < len(views):
            out["cursor"] = str(start + limit)
        invalid = [] if params.get("cursor") else node.invalid_workloads(params.get("owner"))
        if invalid:
            out["invalid"] = invalid[:500]  # the lexicon's bound
        return out

    async def get_workload_status(
        caller: Caller, params: dict[str, Any], body: Any
    ) -> dict[str, Any]:
        view = node.workload(params["uri"])
        return {"workload": view, "replicas": view["running"]}

    def owner_only(caller: Caller, uri: str) -> None:
        check_owner(caller.did, uri, caller.is_admin, node.owner)

    async def delete_workload(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        uri = _uri(body)
        owner_only(caller, uri)
        await node.delete_workload(uri)
        return {}

    async def pause_workload(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        uri = _uri(body)
        owner_only(caller, uri)
        await node.set_paused(uri, True)
        return {}

    async def resume_workload(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        uri = _uri(body)
        owner_only(caller, uri)
        await node.set_paused(uri, False)
        return {}

    async def drain(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {"state": await node.drain()}

    async def undrain(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {"state": await node.undrain()}

    async def get_logs(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        uri = params["uri"]
        if caller.did is not None:
            owner_only(caller, uri)
        got = await node.logs(uri, params["slot"], params["lines"], params.get("cursor"))
        entries = list(got.entries)
        # `lines` (the bare text) is what callers before entries and cursors read.
        out = {"lines": [e["line"] for e in entries], "entries": entries}
        return out if got.cursor is None else {**out, "cursor": got.cursor}

    async def get_secret(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        if caller.did is None:
            raise Forbidden("getSecret is for meshlets holding a slot, with service auth")
        name = params["name"]
        sealed = await node.get_secret(caller.did, params["workload"], name)
        return {"name": name, "sealed": sealed}

    async def put_secret(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        name = body.get("name")
        value = body.get("value")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidRequest("secret name must be 1-128 characters")
        if not isinstance(value, bytes):
            raise InvalidRequest('value must be {"$bytes": "<base64>"}')
        raw = value
        await node.put_secret(name, raw)
        return {}

    async def notify_records(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        refs = body.get("records")
        if not isinstance(refs, list) or len(refs) > 50:
            raise InvalidRequest("records must be a list of at most 50 {uri, cid}")
        ok = [r for r in refs if isinstance(r, dict) and isinstance(r.get("uri"), str)]
        return {"accepted": node.notify_records(ok)}

    async def shutdown(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        on_shutdown(bool(body.get("stopReplicas", False)))
        return {}

    async def ctl_status(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {**node.summary(), "version": __version__, "statusLine": node.status_line()}

    async def ctl_members(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return {"members": node.members()}

    async def ctl_create(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        record = body.get("record")
        if not isinstance(record, dict):
            raise InvalidRequest("input needs a record object")
        if record.get("$type", NSID_WORKLOAD) != NSID_WORKLOAD:
            raise InvalidRequest(f"record must be a {NSID_WORKLOAD}")
        # The defaults, once; the lexicon check, once, where the record is written (the
        # PDS client raises InvalidRecord naming the offending field).
        record = fill_workload(
            record, cluster=default_cluster(), bid_window_ms=default_bid_window_ms()
        )
        return await node.create_workload(record)

    async def ctl_bids(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.bids(params["uri"])

    async def ctl_endpoints(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.endpoints(params["uri"])

    async def ctl_balance(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.balance()

    async def ctl_usage(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.usage(int(params.get("days") or 7))

    async def ctl_handles(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        # Display names for human tables.
        got = await node.handles()
        return {"handles": [{"did": d, "handle": h} for d, h in sorted(got.items())]}

    async def ctl_get_policy(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return await node.policy()

    async def ctl_set_policy(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("input needs policy, settings, or key and value")
        return await node.set_policy(body)

    def local_only(handler: Any) -> Any:
        async def guarded(caller: Caller, params: dict[str, Any], body: Any) -> Any:
            if not caller.local:
                raise Forbidden("only on the local control socket")
            return await handler(caller, params, body)

        return guarded

    q: Literal["query"] = "query"
    p: Literal["procedure"] = "procedure"

    def add(
        nsid: str, kind: Literal["query", "procedure"], access: Access, handler: MethodHandler
    ) -> None:
        app.add(nsid, kind, access, handler, lexicon_params(nsid))

    add(N.PING, q, Access.ANYONE, ping)
    add(N.NOTIFY_RECORDS, p, Access.ANYONE, notify_records)
    add(N.GET_CAPACITY, q, Access.MEMBER, get_capacity)
    add(N.LIST_WORKLOADS, q, Access.MEMBER, list_workloads)
    add(N.GET_WORKLOAD_STATUS, q, Access.MEMBER, get_workload_status)
    add(N.DELETE_WORKLOAD, p, Access.AUTHENTICATED, delete_workload)
    add(N.PAUSE_WORKLOAD, p, Access.AUTHENTICATED, pause_workload)
    add(N.RESUME_WORKLOAD, p, Access.AUTHENTICATED, resume_workload)
    add(N.DRAIN, p, Access.MESHLET_OWNER, drain)
    add(N.UNDRAIN, p, Access.MESHLET_OWNER, undrain)
    add(N.GET_LOGS, q, Access.AUTHENTICATED, get_logs)
    add(N.GET_SECRET, q, Access.AUTHENTICATED, get_secret)
    add(N.PUT_SECRET, p, Access.LOCAL, local_only(put_secret))
    add(N.SHUTDOWN, p, Access.LOCAL, local_only(shutdown))
    add(CTL_STATUS, q, Access.LOCAL, local_only(ctl_status))
    add(CTL_MEMBERS, q, Access.LOCAL, local_only(ctl_members))
    add(CTL_CREATE, p, Access.LOCAL, local_only(ctl_create))
    add(CTL_BIDS, q, Access.LOCAL, local_only(ctl_bids))
    add(CTL_BALANCE, q, Access.LOCAL, local_only(ctl_balance))
    add(CTL_USAGE, q, Access.LOCAL, local_only(ctl_usage))
    add(CTL_HANDLES, q, Access.LOCAL, local_only(ctl_handles))
    add(CTL_ENDPOINTS, q, Access.LOCAL, local_only(ctl_endpoints))
    add(CTL_GET_POLICY, q, Access.LOCAL, local_only(ctl_get_policy))
    add(CTL_SET_POLICY, p, Access.LOCAL, local_only(ctl_set_policy))
