"""The `farm.meshlet.*` methods, bound to a `Node`, with their access rules.

Peer-facing methods follow `lexicons/farm/meshlet/*.json` (a unit test checks names, kinds
and parameters against the lexicons). The `farm.meshlet.ctl.*` methods exist only on the
control socket, for meshletctl (status, members, bids, balance, publishing a workload).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Literal

from meshletd import __version__
from meshletd.atproto.lexicon import validate_record
from meshletd.daemon.node import Node, check_owner
from meshletd.errors import Forbidden, InvalidRequest
from meshletd.xrpc.app import Access, Caller, Param, XrpcApp

URI = Param("string", required=True)
WORKLOAD = "commune.scheduler.workload"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Local-only methods (not part of the peer lexicons).
CTL_STATUS = "farm.meshlet.ctl.getStatus"
CTL_MEMBERS = "farm.meshlet.ctl.listMembers"
CTL_CREATE = "farm.meshlet.ctl.createWorkload"
CTL_BIDS = "farm.meshlet.ctl.getBids"
CTL_BALANCE = "farm.meshlet.ctl.getBalance"
CTL_HANDLES = "farm.meshlet.ctl.getHandles"


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
        entries = got["entries"]
        # `lines` (the bare text) is what callers before entries and cursors read.
        out = {"lines": [e["line"] for e in entries], "entries": entries}
        return out if got.get("cursor") is None else {**out, "cursor": got["cursor"]}

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
        if record.get("$type", WORKLOAD) != WORKLOAD:
            raise InvalidRequest(f"record must be a {WORKLOAD}")
        record = {
            "$type": WORKLOAD,
            "cluster": default_cluster(),
            "kind": "service",
            "replicas": 1,
            "createdAt": _now(),
            **record,
        }
        validate_record(WORKLOAD, record)  # InvalidRecord names the offending field
        return await node.create_workload(record)

    async def ctl_bids(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.bids(params["uri"])

    async def ctl_balance(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        return node.balance()

    async def ctl_handles(caller: Caller, params: dict[str, Any], body: Any) -> dict[str, Any]:
        # Display names for human tables.
        got = await node.handles()
        return {"handles": [{"did": d, "handle": h} for d, h in sorted(got.items())]}

    def local_only(handler: Any) -> Any:
        async def guarded(caller: Caller, params: dict[str, Any], body: Any) -> Any:
            if not caller.local:
                raise Forbidden("only on the local control socket")
            return await handler(caller, params, body)

        return guarded

    q: Literal["query"] = "query"
    p: Literal["procedure"] = "procedure"
    add = app.add
    add("farm.meshlet.ping", q, Access.ANYONE, ping)
    add("farm.meshlet.notifyRecords", p, Access.ANYONE, notify_records)
    add("farm.meshlet.getCapacity", q, Access.MEMBER, get_capacity)
    add(
        "farm.meshlet.listWorkloads",
        q,
        Access.MEMBER,
        list_workloads,
        {
            "owner": Param("string"),
            "limit": Param("integer", default=100, minimum=1, maximum=500),
            "cursor": Param("string"),
        },
    )
    add("farm.meshlet.getWorkloadStatus", q, Access.MEMBER, get_workload_status, {"uri": URI})
    add("farm.meshlet.deleteWorkload", p, Access.AUTHENTICATED, delete_workload)
    add("farm.meshlet.pauseWorkload", p, Access.AUTHENTICATED, pause_workload)
    add("farm.meshlet.resumeWorkload", p, Access.AUTHENTICATED, resume_workload)
    add("farm.meshlet.drain", p, Access.MESHLET_OWNER, drain)
    add("farm.meshlet.undrain", p, Access.MESHLET_OWNER, undrain)
    add(
        "farm.meshlet.getLogs",
        q,
        Access.AUTHENTICATED,
        get_logs,
        {
            "uri": URI,
            "slot": Param("integer", default=0, minimum=0, maximum=999),
            "lines": Param("integer", default=200, minimum=1, maximum=10000),
            "cursor": Param("string"),
        },
    )
    add(
        "farm.meshlet.getSecret",
        q,
        Access.AUTHENTICATED,
        get_secret,
        {"workload": Param("string", required=True), "name": Param("string", required=True)},
    )
    add("farm.meshlet.putSecret", p, Access.LOCAL, local_only(put_secret))
    add("farm.meshlet.shutdown", p, Access.LOCAL, local_only(shutdown))
    add(CTL_STATUS, q, Access.LOCAL, local_only(ctl_status))
    add(CTL_MEMBERS, q, Access.LOCAL, local_only(ctl_members))
    add(CTL_CREATE, p, Access.LOCAL, local_only(ctl_create))
    add(CTL_BIDS, q, Access.LOCAL, local_only(ctl_bids), {"uri": URI})
    add(CTL_BALANCE, q, Access.LOCAL, local_only(ctl_balance))
    add(CTL_HANDLES, q, Access.LOCAL, local_only(ctl_handles))
