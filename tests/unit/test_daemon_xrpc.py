"""The XRPC API on both transports: service auth for peers, peer credentials locally."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from meshletd.atproto.lexicon import default_lexicons
from meshletd.config import Cluster, Config, Control, Listen
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore
from meshletd.xrpc.app import from_json
from meshletd.xrpc.auth import StaticKeys
from meshletd.xrpc.http import PeerCred, Request
from meshletd.xrpc.testing import TokenIssuer, check_output_against_lexicon

LEXICONS = default_lexicons()
ME = "did:plc:alicemesh"
ALICE = "did:plc:alice"
BOB = "did:plc:bob"
MALLORY = "did:plc:mallory"

issuers = {did: TokenIssuer(did) for did in (ALICE, BOB, MALLORY)}
IMPOSTOR = TokenIssuer(BOB)  # claims to be bob, signs with another key


def config(tmp_path: Path) -> Config:
    return Config(
        did=ME,
        owner=ALICE,
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="friends", members=[BOB])],
        listen=Listen(xrpc="127.0.0.1:0", control_socket=tmp_path / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        state_dir=tmp_path / "state",
        backend="memory",
    )


class Running:
    def __init__(self, daemon: Daemon, notifier: RecordingNotifier) -> None:
        self.daemon = daemon
        self.notifier = notifier
        host, port = daemon.tcp_address
        self.tcp = httpx.AsyncClient(base_url=f"http://{host}:{port}")
        self.unix = httpx.AsyncClient(
            base_url="http://localhost",
            transport=httpx.AsyncHTTPTransport(uds=str(daemon.cfg.listen.control_socket)),
            # Every successful answer on the control socket has its lexicon's shape too.
            event_hooks={"response": [check_output_against_lexicon]},
        )

    async def call(
        self,
        nsid: str,
        *,
        who: str | None = None,
        token: str | None = None,
        params: dict | None = None,
        body: dict | None = None,
    ) -> httpx.Response:
        headers = {}
        if who is not None:
            token = issuers[who].token(ME, nsid)
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        if body is None:
            resp = await self.tcp.get(f"/xrpc/{nsid}", params=params, headers=headers)
        else:
            resp = await self.tcp.post(f"/xrpc/{nsid}", json=body, headers=headers)
        if resp.status_code == 200 and nsid in LEXICONS.docs:
            # Every successful answer has the shape its lexicon promises.
            LEXICONS.validate_output(nsid, from_json(resp.json()))
        return resp


@pytest.fixture
async def running(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Running]:
    notifier = RecordingNotifier()
    keys = StaticKeys({did: i.did_key for did, i in issuers.items()})
    daemon = Daemon(
        config(tmp_path),
        notifier=notifier,
        key_resolver=keys,
        handle_signals=False,
        environ={},
        store=MemoryStore(),
    )
    await nursery.start(daemon.run)
    r = Running(daemon, notifier)
    yield r
    await r.tcp.aclose()
    await r.unix.aclose()
    daemon.request_stop()


async def make_workload(r: Running, name: str = "web") -> str:
    resp = await r.unix.post(
        "/xrpc/farm.meshlet.ctl.createWorkload",
        json={
            "record": {
                "name": name,
                "image": "localhost/busybox",
                "replicas": 1,
                "resources": {"milliCpu": 100, "memoryMiB": 64},
                "kind": "service",
                "cluster": "friends",
            }
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["uri"]


def error(resp: httpx.Response) -> str:
    return resp.json()["error"]


async def test_ready_is_sent_after_the_control_socket_listens(running: Running) -> None:
    assert running.daemon.cfg.listen.control_socket.is_socket()
    ready = [m for m in running.notifier.messages if m.get("READY") == "1"]
    assert ready and ready[0]["STATUS"] == "1 member, 0 replicas"


async def test_ping_needs_no_token(running: Running) -> None:
    resp = await running.call("farm.meshlet.ping")
    assert resp.status_code == 200
    assert resp.json()["did"] == ME and resp.json()["state"] == "active"


async def test_a_member_with_a_valid_token_is_served(running: Running) -> None:
    resp = await running.call("farm.meshlet.getCapacity", who=BOB)
    assert resp.status_code == 200, resp.text
    assert resp.json()["capacity"]["total"]["milliCpu"] == 1000


async def test_no_token_means_auth_required(running: Running) -> None:
    resp = await running.call("farm.meshlet.getCapacity")
    assert resp.status_code == 401 and error(resp) == "AuthRequired"
    resp = await running.tcp.get(
        "/xrpc/farm.meshlet.getCapacity", headers={"authorization": "Basic abc"}
    )
    assert error(resp) == "AuthRequired"


async def test_a_verified_stranger_is_not_a_member(running: Running) -> None:
    resp = await running.call("farm.meshlet.getCapacity", who=MALLORY)
    assert resp.status_code == 403 and error(resp) == "Forbidden"


@pytest.mark.parametrize("nsid", ["farm.meshlet.getCapacity", "farm.meshlet.deleteWorkload"])
async def test_a_stranger_is_refused_before_any_key_is_looked_up(running: Running, nsid) -> None:
    """Issue #15, point 8: at db8aa19 the issuer was resolved first (a did:web could make
    the daemon fetch any address, and the failure's text came back to the caller)."""
    keys = running.daemon.verifier._resolver
    before = keys.lookups
    token = TokenIssuer("did:web:127.0.0.1%3A22").token(ME, nsid)
    body = {"uri": "at://did:plc:x/commune.scheduler.workload/w"}
    resp = await running.call(nsid, token=token, body=None if "get" in nsid else body)
    assert resp.status_code == 403 and error(resp) == "Forbidden"
    assert keys.lookups == before
    assert "127.0.0.1" not in resp.text


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: issuers[BOB].token(ME, "farm.meshlet.getCapacity", exp=1_000_000), "JwtExpired"),
        (lambda: issuers[BOB].token("did:plc:other", "farm.meshlet.getCapacity"), "BadJwtAudience"),
        (lambda: issuers[BOB].token(ME, "farm.meshlet.ping"), "BadJwtLexiconMethod"),
        (lambda: issuers[BOB].token(ME, None), "BadJwtLexiconMethod"),
        (lambda: IMPOSTOR.token(ME, "farm.meshlet.getCapacity"), "BadJwtSignature"),
        (lambda: issuers[BOB].token(ME, "farm.meshlet.getCapacity", ttl=7200), "BadJwt"),
        (lambda: issuers[BOB].token(ME, "farm.meshlet.getCapacity", jti=""), "BadJwt"),
        (lambda: "not.a.jwt", "BadJwt"),
        (lambda: issuers[BOB].token(ME, "farm.meshlet.getCapacity", iss=BOB + "#svc"), "BadJwt"),
    ],
    ids=[
        "expired",
        "wrong-aud",
        "wrong-lxm",
        "no-lxm",
        "bad-signature",
        "too-long-lived",
        "no-jti",
        "garbage",
        "iss-fragment",
    ],
)
async def test_bad_tokens_are_refused_with_their_error_name(running: Running, make, name) -> None:
    resp = await running.call("farm.meshlet.getCapacity", token=make())
    assert resp.status_code == 401, resp.text
    assert error(resp) == name


async def test_a_replayed_token_is_refused(running: Running) -> None:
    token = issuers[BOB].token(ME, "farm.meshlet.getCapacity")
    assert (await running.call("farm.meshlet.getCapacity", token=token)).status_code == 200
    resp = await running.call("farm.meshlet.getCapacity", token=token)
    assert resp.status_code == 401 and error(resp) == "JwtReplayed"


async def test_a_token_without_exp_is_refused(running: Running) -> None:
    token = issuers[BOB].token(ME, "farm.meshlet.getCapacity", extra={"exp": None})
    resp = await running.call("farm.meshlet.getCapacity", token=token)
    assert error(resp) == "BadJwt"


async def test_only_the_workload_owner_may_delete_it(running: Running) -> None:
    uri = await make_workload(running)
    resp = await running.call("farm.meshlet.deleteWorkload", who=BOB, body={"uri": uri})
    assert resp.status_code == 403 and error(resp) == "Forbidden"
    resp = await running.call("farm.meshlet.pauseWorkload", who=BOB, body={"uri": uri})
    assert error(resp) == "Forbidden"
    resp = await running.call("farm.meshlet.deleteWorkload", who=ALICE, body={"uri": uri})
    assert resp.status_code == 200, resp.text
    resp = await running.call("farm.meshlet.getWorkloadStatus", who=BOB, params={"uri": uri})
    assert resp.status_code == 404 and error(resp) == "NotFound"


async def test_pause_and_resume_by_the_owner(running: Running) -> None:
    uri = await make_workload(running)
    resp = await running.call("farm.meshlet.pauseWorkload", who=ALICE, body={"uri": uri})
    assert resp.status_code == 200
    status = await running.call("farm.meshlet.getWorkloadStatus", who=BOB, params={"uri": uri})
    assert status.json()["workload"]["paused"] is True
    assert status.json()["replicas"][0]["state"] == "paused"
    await running.call("farm.meshlet.resumeWorkload", who=ALICE, body={"uri": uri})
    status = await running.call("farm.meshlet.getWorkloadStatus", who=BOB, params={"uri": uri})
    assert status.json()["replicas"][0]["state"] == "running"


async def test_only_this_meshlets_owner_may_drain_it_over_the_network(running: Running) -> None:
    resp = await running.call("farm.meshlet.drain", who=BOB, body={})
    assert resp.status_code == 403 and error(resp) == "Forbidden"
    resp = await running.call("farm.meshlet.drain", who=ALICE, body={})
    assert resp.json() == {"state": "draining"}
    resp = await running.call("farm.meshlet.undrain", who=ALICE, body={})
    assert resp.json() == {"state": "active"}


async def test_control_methods_are_not_reachable_over_tcp(running: Running) -> None:
    for nsid in ("farm.meshlet.putSecret", "farm.meshlet.shutdown"):
        resp = await running.call(nsid, who=ALICE, body={})
        assert resp.status_code == 403, nsid
    resp = await running.call("farm.meshlet.ctl.getStatus", who=ALICE)
    assert resp.status_code == 403


async def test_malformed_calls_get_stable_error_names(running: Running) -> None:
    resp = await running.tcp.get("/xrpc/farm.meshlet.nothing")
    assert resp.status_code == 501 and error(resp) == "MethodNotImplemented"
    resp = await running.tcp.post("/xrpc/farm.meshlet.ping", json={})
    assert resp.status_code == 400 and error(resp) == "InvalidRequest"
    resp = await running.call("farm.meshlet.listWorkloads", who=BOB, params={"limit": "x"})
    assert error(resp) == "InvalidRequest"
    resp = await running.call("farm.meshlet.listWorkloads", who=BOB, params={"limit": "0"})
    assert error(resp) == "InvalidRequest"
    resp = await running.call("farm.meshlet.getWorkloadStatus", who=BOB)
    assert error(resp) == "InvalidRequest" and "uri" in resp.json()["message"]
    resp = await running.tcp.get("/other")
    assert resp.status_code == 501


async def test_parameters_are_checked_by_their_lexicon(running: Running) -> None:
    # Formats and lengths come from lexicons/farm/meshlet/*.json, not from a copy in the
    # daemon: getWorkloadStatus's `uri` is an at-uri, getLogs' `cursor` at most 1024 bytes.
    resp = await running.call("farm.meshlet.getWorkloadStatus", who=BOB, params={"uri": "x"})
    assert resp.status_code == 400 and error(resp) == "InvalidRequest"
    assert "uri: not a valid at-uri" in resp.json()["message"]
    uri = f"at://{ALICE}/commune.scheduler.workload/3kweb"
    params = {"uri": uri, "cursor": "c" * 1025}
    resp = await running.call("farm.meshlet.getLogs", who=ALICE, params=params)
    assert resp.status_code == 400 and "cursor: longer than 1024 bytes" in resp.json()["message"]


async def test_list_workloads_pages_with_a_cursor(running: Running) -> None:
    for i in range(3):
        await make_workload(running, f"w{i}")
    first = (await running.call("farm.meshlet.listWorkloads", who=BOB, params={"limit": 2})).json()
    assert len(first["workloads"]) == 2 and first["cursor"]
    rest = await running.call(
        "farm.meshlet.listWorkloads", who=BOB, params={"limit": 2, "cursor": first["cursor"]}
    )
    assert [w["name"] for w in rest.json()["workloads"]] == ["w2"]
    assert "cursor" not in rest.json()


async def test_list_workloads_names_the_invalid_records_with_field_and_reason(
    running: Running,
) -> None:
    from meshletd.atproto.frames import Refusal
    from meshletd.daemon.fake_node import InMemoryNode

    await make_workload(running, "ok")
    node = running.daemon.node
    assert isinstance(node, InMemoryNode)
    bad = f"at://{ALICE}/commune.scheduler.workload/3kbad"
    cid = "bafyreia" + "a" * 52
    node.refuse(Refusal(bad, cid, "image", "starts with '-': podman reads an option", "evil"))
    node.refuse(
        Refusal(f"at://{BOB}/commune.scheduler.workload/3knoname", None, None, "not an object")
    )
    node.refuse(Refusal(f"at://{BOB}/commune.scheduler.bid/3kbid", None, "round", "too large"))
    call = "farm.meshlet.listWorkloads"
    first = (await running.call(call, who=BOB, params={"limit": 1})).json()
    assert [w["name"] for w in first["workloads"]] == ["ok"]
    assert first["invalid"] == [  # workloads only, newest first
        {"uri": f"at://{BOB}/commune.scheduler.workload/3knoname", "ownerDid": BOB,
         "problem": {"field": "", "reason": "not an object"}},
        {"uri": bad, "ownerDid": ALICE, "cid": cid, "name": "evil",
         "problem": {"field": "image", "reason": "starts with '-': podman reads an option"}},
    ]  # fmt: skip
    mine = (await running.call(call, who=BOB, params={"owner": ALICE})).json()
    assert [w["uri"] for w in mine["invalid"]] == [bad]
    # Answered once, on the first page: a client paging on does not list them twice.
    await make_workload(running, "ok2")
    rest = (await running.call(call, who=BOB, params={"limit": 1, "cursor": "1"})).json()
    assert "invalid" not in rest
    # A newer refused version of the same record replaces the older one.
    node.refuse(Refusal(bad, cid, "image", "again"))
    again = (await running.call(call, who=BOB, params={"owner": ALICE})).json()
    assert [w["problem"]["reason"] for w in again["invalid"]] == ["again"]


async def test_get_logs_pages_forward_from_a_cursor(running: Running) -> None:
    uri = await make_workload(running)
    logs = "farm.meshlet.getLogs"
    first = (await running.call(logs, who=ALICE, params={"uri": uri, "lines": 5})).json()
    assert first["lines"] == ["web: started 1"] and first["entries"][0]["time"].endswith("Z")
    for verb in ("pause", "resume", "pause"):
        await running.call(f"farm.meshlet.{verb}Workload", who=ALICE, body={"uri": uri})
    # Only what came after the cursor, oldest first, at most `lines` of it.
    params = {"uri": uri, "lines": 2, "cursor": first["cursor"]}
    page = (await running.call(logs, who=ALICE, params=params)).json()
    assert page["lines"] == ["web: paused", "web: resumed"]
    params["cursor"] = page["cursor"]
    page = (await running.call(logs, who=ALICE, params=params)).json()
    assert page["lines"] == ["web: paused"]
    params["cursor"] = page["cursor"]
    page = (await running.call(logs, who=ALICE, params=params)).json()
    assert page["entries"] == [] and page["cursor"] == params["cursor"]
    params["cursor"] = "not-a-cursor"
    resp = await running.call(logs, who=ALICE, params=params)
    assert resp.status_code == 400 and error(resp) == "InvalidRequest"
    resp = await running.call(logs, who=BOB, params={"uri": uri})
    assert error(resp) == "Forbidden"


async def test_root_on_the_control_socket_may_read_and_mutate(running: Running) -> None:
    resp = await running.unix.get("/xrpc/farm.meshlet.ctl.getStatus")
    assert resp.status_code == 200 and resp.json()["did"] == ME
    value = base64.b64encode(b"hunter2").decode()
    resp = await running.unix.post(
        "/xrpc/farm.meshlet.putSecret", json={"name": "db", "value": {"$bytes": value}}
    )
    assert resp.status_code == 200
    resp = await running.unix.post("/xrpc/farm.meshlet.drain", json={})
    assert resp.json()["state"] == "draining"


async def test_every_control_method_answers_in_the_shape_of_its_lexicon(
    running: Running,
) -> None:
    uri = await make_workload(running)
    ctl = "/xrpc/farm.meshlet.ctl."
    calls = [
        running.unix.get(ctl + "getStatus"),
        running.unix.get(ctl + "listMembers"),
        running.unix.get(ctl + "getBids", params={"uri": uri}),
        running.unix.get(ctl + "getBalance"),
        running.unix.get(ctl + "getUsage", params={"days": 2}),
        running.unix.get(ctl + "getHandles"),
        running.unix.get(ctl + "getEndpoints", params={"uri": uri}),
        running.unix.get(ctl + "getPolicy"),
        running.unix.post(ctl + "setPolicy", json={"key": "evict", "value": "did:plc:mallory"}),
    ]
    for call in calls:
        resp = await call  # the response hook validates the output against the lexicon
        assert resp.status_code == 200, resp.text
    names = {m.nsid for m in running.daemon.app.methods.values()}
    assert {n for n in names if n.startswith("farm.meshlet.ctl.")} == {
        "farm.meshlet.ctl." + m
        for m in (
            "getStatus",
            "listMembers",
            "createWorkload",
            "getBids",
            "getBalance",
            "getUsage",
            "getHandles",
            "getEndpoints",
            "getPolicy",
            "setPolicy",
        )
    }


async def test_create_workload_fills_the_defaults_once(running: Running) -> None:
    # `meshletctl run` may leave out what createWorkload's lexicon lists; the publisher's
    # round-0 window ([scheduling] bid_window_ms) travels in the record.
    resp = await running.unix.post(
        "/xrpc/farm.meshlet.ctl.createWorkload",
        json={
            "record": {"name": "lean", "image": "i", "resources": {"milliCpu": 1, "memoryMiB": 4}}
        },
    )
    assert resp.status_code == 200, resp.text
    stored = running.daemon.node._workloads[resp.json()["uri"]].record  # type: ignore[attr-defined]
    cfg = running.daemon.cfg
    assert stored["cluster"] == cfg.clusters[0].name and stored["kind"] == "service"
    assert stored["replicas"] == 1 and stored["bidWindowMs"] == cfg.scheduling.bid_window_ms
    assert stored["createdAt"].endswith("Z")


async def test_create_workload_input_is_checked_against_its_lexicon(running: Running) -> None:
    resp = await running.unix.post("/xrpc/farm.meshlet.ctl.createWorkload", json={})
    assert resp.status_code == 400 and error(resp) == "InvalidRequest"
    assert "record: required" in resp.json()["message"]


async def test_local_callers_are_sorted_by_group(running: Running) -> None:
    app = running.daemon.app
    app.reader_gids, app.admin_gids = frozenset({500}), frozenset({501})
    nobody, reader, admin = (
        PeerCred(pid=1, uid=1000, gid=1000, groups=frozenset({g})) for g in (1000, 500, 501)
    )
    root = PeerCred(pid=1, uid=0, gid=0)
    for cred, expected in (
        (nobody, (False, False)),
        (reader, (True, False)),
        (admin, (True, True)),
    ):
        caller = app.local_caller(cred)
        assert (caller.is_reader, caller.is_admin) == expected
    assert app.local_caller(root).is_admin

    async def status_of(cred: PeerCred, method: str, nsid: str) -> int:
        request = Request(method, f"/xrpc/{nsid}", [], {}, b"{}", peercred=cred)
        return (await app.unix_handler(request)).status

    # Group members read; only admins change anything.
    reads, changes = ("GET", "farm.meshlet.ctl.getStatus"), ("POST", "farm.meshlet.undrain")
    assert await status_of(reader, *reads) == 200
    assert await status_of(nobody, *reads) == 403
    assert await status_of(reader, *changes) == 403
    assert await status_of(admin, *changes) == 200


async def test_shutdown_over_the_control_socket_stops_the_daemon(running: Running) -> None:
    resp = await running.unix.post("/xrpc/farm.meshlet.shutdown", json={})
    assert resp.status_code == 200
    with trio.fail_after(5):
        while not any(m.get("STOPPING") == "1" for m in running.notifier.messages):
            await trio.sleep(0.01)


async def test_the_host_policy_is_set_one_key_at_a_time_and_shown(running: Running) -> None:
    ctl = "/xrpc/farm.meshlet.ctl."
    got = (await running.unix.get(ctl + "getPolicy")).json()
    assert got["published"] is False and got["settings"] == {}
    for key, value in [
        ("default_share", "250"),
        ("schedule", "Mon-Fri 08:00-18:00; Sat 10:00-12:00"),
        ("evict", "did:plc:mallory"),
        ("images", "registry.example:5000/alice/*"),
    ]:
        resp = await running.unix.post(ctl + "setPolicy", json={"key": key, "value": value})
        assert resp.status_code == 200, resp.text
    got = (await running.unix.get(ctl + "getPolicy")).json()
    assert got["published"] is True
    assert got["settings"] == {
        "default_share": 250,
        "evicted": ["did:plc:mallory"],
        "images": ["registry.example:5000/alice/*"],
        "schedule": ["Mon-Fri 08:00-18:00", "Sat 10:00-12:00"],
    }
    assert got["policy"]["owners"] == {"defaultShare": 250}
    resp = await running.unix.post(ctl + "setPolicy", json={"key": "default_share", "value": ""})
    assert "owners" not in resp.json()["policy"]
    bad = await running.unix.post(ctl + "setPolicy", json={"key": "network", "value": "wan"})
    assert bad.status_code == 400 and "network" in bad.json()["message"]
