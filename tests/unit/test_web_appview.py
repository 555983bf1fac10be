"""The appview: meshletd's read-only page of the commune and its /metrics, served by the
daemon itself on `[web] listen` (here an in-memory node on a free loopback port)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from meshletd import metrics
from meshletd.config import Cluster, Config, Control, Listen, Web
from meshletd.daemon.service import Daemon
from meshletd.notify import RecordingNotifier
from meshletd.store import MemoryStore
from meshletd.web.app import shown
from tests.unit.daemon_parts import (
    BOB,
    BOB_MESH,
    ME,
    OWNER,
    STAMP,
    owner_record,
    parts,
    put,
    workload_value,
)

pytestmark = pytest.mark.unit

HOSTILE = "<script>alert('x')</script>\u202egnp.exe\u2066"


def config(tmp_path: Path, web: str = "127.0.0.1:0") -> Config:
    return Config(
        did=ME,
        owner=OWNER,
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="friends", members=[BOB])],
        listen=Listen(xrpc="127.0.0.1:0", control_socket=tmp_path / "control.sock"),
        control=Control(group="meshlet-test-nogroup", admin_group="meshlet-test-noadmin"),
        web=Web(listen=web),
        state_dir=tmp_path / "state",
        backend="memory",
    )


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    d = Daemon(
        config(tmp_path),
        notifier=RecordingNotifier(),
        handle_signals=False,
        environ={},
        store=MemoryStore(),
    )
    await nursery.start(d.run)
    yield d
    d.request_stop()


def web(d: Daemon) -> httpx.AsyncClient:
    assert d.web_address is not None
    host, port = d.web_address
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=5)


async def publish(d: Daemon, name: str, replicas: int = 1) -> str:
    got = await d.node.create_workload(
        {
            "name": name,
            "image": "localhost/busybox",
            "replicas": replicas,
            "resources": {"milliCpu": 100, "memoryMiB": 64},
            "kind": "service",
            "cluster": "friends",
        }
    )
    return str(got["uri"])


def test_the_page_listens_on_loopback_by_default() -> None:
    assert Web().listen == "127.0.0.1:8788" and Web().host == "127.0.0.1"
    with pytest.raises(ValueError):
        Web(listen="8788")


async def test_every_page_answers_and_hostile_names_are_escaped(daemon: Daemon) -> None:
    uri = await publish(daemon, HOSTILE, replicas=2)
    async with web(daemon) as c:
        for path in (
            "/",
            "/members",
            "/workloads",
            "/workloads?owner=" + OWNER,
            f"/workload?uri={uri}",
            f"/rounds?uri={uri}&slot=1",
            f"/rounds?uri={uri}",
            "/fairshare",
        ):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith("text/html")
            assert "<script>alert" not in r.text, path
            assert "\u202e" not in r.text and "\u2066" not in r.text, path
            # Only our own script, served here (no CDN); a policy forbids any other.
            assert re.findall(r"<script[^>]*>", r.text) == ['<script src="/static/live.js" defer>']
            assert "script-src 'self'" in r.headers["content-security-policy"]
        page = (await c.get("/workloads")).text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;\\u202egnp.exe\\u2066" in page
        assert (await c.get("/static/live.js")).status_code == 200
        assert (await c.get("/nowhere")).status_code == 404
        assert (await c.get("/workload?uri=at://did:plc:x/y/z")).status_code == 404
        assert (await c.post("/workloads")).status_code == 405


async def test_workloads_are_filtered_by_owner_state_and_meshlet(daemon: Daemon) -> None:
    await publish(daemon, "alpha")
    async with web(daemon) as c:
        assert "alpha" in (await c.get("/workloads", params={"meshlet": ME})).text
        assert "alpha" not in (await c.get("/workloads", params={"meshlet": BOB_MESH})).text
        assert "alpha" not in (await c.get("/workloads", params={"owner": BOB})).text
        assert "alpha" in (await c.get("/workloads", params={"state": "running"})).text
        assert "alpha" not in (await c.get("/workloads", params={"state": "pending"})).text


async def test_a_new_placement_is_announced_on_the_event_stream(daemon: Daemon) -> None:
    async with web(daemon) as c, c.stream("GET", "/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.aiter_lines()
        assert (await lines.__anext__()).startswith("retry:")
        t0 = trio.current_time()
        await publish(daemon, "live-one")
        with trio.fail_after(2):
            async for line in lines:
                if line == "event: change":
                    break
        assert trio.current_time() - t0 < 2
        assert "live-one" in (await c.get("/workloads")).text


async def test_metrics_are_prometheus_text_and_move_with_a_placement(daemon: Daemon) -> None:
    async with web(daemon) as c:
        before = (await c.get("/metrics")).text
        assert re.search(r'^meshlet_replicas\{state="running"\} 0\.0$', before, re.M)
        await publish(daemon, "counted", replicas=2)
        r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=")
        assert re.search(r'^meshlet_replicas\{state="running"\} 2\.0$', r.text, re.M)
        assert re.search(r"^meshlet_workloads 1\.0$", r.text, re.M)
        for name in (
            "meshlet_bids_written_total",
            "meshlet_rounds_won_total",
            "meshlet_pds_write_points_total",
            "meshlet_firehose_reconnects_total",
            "meshlet_probe_failures_total",
            "meshlet_pds_write_queue_depth",
            "meshlet_failover_seconds",
            "meshlet_firehose_lag_seconds",
            "process_resident_memory_bytes",
        ):
            assert f"# TYPE {name.removesuffix('_total')}" in r.text, name


def _bid(priority: int, slots: int = 1) -> dict[str, object]:
    ref = {"uri": f"at://{OWNER}/commune.scheduler.workload/3kweb", "cid": "bafyreiabcdefgh"}
    return {"workload": ref, "round": 0, "priority": priority, "slots": slots, "createdAt": STAMP}


def test_record_counters_count_rounds_bids_and_placements_once() -> None:
    p = parts()

    def value(counter: object, *labels: str) -> float:
        c = counter.labels(*labels) if labels else counter  # type: ignore[attr-defined]
        return float(c._value.get())

    opened0, offers0 = value(metrics.ROUNDS_OPENED, "first"), value(metrics.BIDS_SEEN, "offer")
    placed0, failovers0 = value(metrics.PLACEMENTS_SEEN), value(metrics.FAILOVERS)
    for ev in (put(ME, "bid", "b1", _bid(5)), put(BOB_MESH, "bid", "b2", _bid(5))):
        metrics.count_record(ev, p.followed)
        p.feed(ev)
    metrics.count_record(put(ME, "bid", "b1", _bid(5)), p.followed)  # seen again: not counted
    assert value(metrics.ROUNDS_OPENED, "first") == opened0 + 1
    assert value(metrics.BIDS_SEEN, "offer") == offers0 + 2
    status = {
        "workload": _bid(0)["workload"],
        "round": 1,
        "slot": 0,
        "state": "running",
        "updatedAt": STAMP,
    }
    for _ in range(2):
        ev = put(BOB_MESH, "workloadStatus", "s0", status)
        metrics.count_record(ev, p.followed)
        p.feed(ev)
    assert value(metrics.PLACEMENTS_SEEN) == placed0 + 1
    assert value(metrics.FAILOVERS) == failovers0 + 1


def test_failover_duration_runs_from_the_replacement_round_to_the_replica_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import generate_latest

    p = parts()
    now = [1000.0]
    monkeypatch.setattr(metrics, "clock", lambda: now[0])
    hist = metrics.FAILOVER_SECONDS
    count0, sum0 = _sample(hist, "_count"), _sample(hist, "_sum")
    replacement = {**_bid(5), "round": 1, "slot": 3}
    # Our own bid of the replacement round starts the clock; bob's, seen later, does not.
    metrics.bid_written(replacement)
    now[0] += 4.0
    for ev in (put(BOB_MESH, "bid", "r1", replacement), put(ME, "bid", "r2", replacement)):
        metrics.count_record(ev, p.followed)
        p.feed(ev)
    now[0] += 8.5
    status = {**replacement, "state": "running", "updatedAt": STAMP}
    del status["priority"], status["slots"], status["createdAt"]
    for _ in range(2):  # seen twice (hint, then firehose): one failover
        ev = put(BOB_MESH, "workloadStatus", "s3", status)
        metrics.count_record(ev, p.followed)
        p.feed(ev)
    assert _sample(hist, "_count") == count0 + 1
    assert _sample(hist, "_sum") == pytest.approx(sum0 + 12.5)
    text = generate_latest(metrics.REGISTRY).decode()
    assert re.search(r'^meshlet_failover_seconds_bucket\{le="15\.0"\} [1-9]', text, re.M)


def test_firehose_lag_is_now_minus_the_frames_time_per_pds() -> None:
    from datetime import UTC, datetime, timedelta

    from meshletd.atproto.frames import FrameDecoder, Interest
    from meshletd.atproto.testing import FakeRepo

    alice = FakeRepo("did:plc:alice")
    out = FrameDecoder(Interest(dids={alice.did}), {alice.did: alice.key.did_key}).process(
        alice.put("commune.scheduler.membership", "home", {"members": []})
    )
    assert out.time == "2026-11-27T00:00:00.000Z"
    sent = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    metrics.firehose_frame("http://pds.test:2583", sent)
    metrics.firehose_frame("http://pds.test:2583", "not a time")  # ignored
    lag = metrics.FIREHOSE_LAG.labels("http://pds.test:2583")._value.get()
    assert 30 <= lag < 40


def _sample(metric: object, suffix: str) -> float:
    for fam in metric.collect():  # type: ignore[attr-defined]
        for s in fam.samples:
            if s.name.endswith(suffix):
                return float(s.value)
    raise AssertionError(suffix)


def test_meshlets_show_both_directions_of_the_link_and_rounds_rank_the_bids() -> None:
    p = parts()
    # bob's meshlet names bob as its owner, but bob has no meshlet record naming it.
    p.view.apply(put(BOB_MESH, "meshletOwner", "self", owner_record(BOB_MESH, BOB)))
    p.feed(put(OWNER, "workload", "3kweb", workload_value()))
    uri = f"at://{OWNER}/commune.scheduler.workload/3kweb"
    p.feed(put(ME, "bid", "b1", _bid(1)), put(BOB_MESH, "bid", "b7", _bid(7)))
    rows = {m["meshletDid"]: m for m in p.read.meshlets()}
    assert rows[ME]["self"] and rows[ME]["verified"]
    assert BOB_MESH not in rows  # nobody claims it: not a member's meshlet
    (r0,) = p.read.rounds(uri)["rounds"]
    assert [b["meshletDid"] for b in r0["bids"]] == [BOB_MESH, ME]  # higher priority first
    assert r0["slot"] == -1 and not r0["bids"][0]["eligible"]
    assert p.read.workload_record(uri)["kind"] == "service"


def test_fair_share_plots_lent_and_used_per_owner_per_usage_period() -> None:
    from meshletd.core.records import format_datetime_ms
    from meshletd.web.app import WebApp
    from meshletd.web.testing import ViewNode

    p = parts()
    p.view.apply(put(BOB_MESH, "meshletOwner", "self", owner_record(BOB_MESH, BOB)))
    p.view.apply(put(ME, "meshletOwner", "self", owner_record(ME, OWNER)))
    length = p.local.cfg.scheduling.usage_period_ms
    base = 1_799_990_000_000 - 1_799_990_000_000 % length

    def usage(host: str, rkey: str, period: int, entries: list[tuple[str, int]]) -> None:
        start = base + period * length
        value = {
            "periodStart": format_datetime_ms(start),
            "periodEnd": format_datetime_ms(start + length),
            "entries": [
                {"ownerDid": o, "milliCpuSeconds": m, "memoryMiBSeconds": 1} for o, m in entries
            ],
            "createdAt": format_datetime_ms(start + length),
        }
        p.feed(put(host, "usage", rkey, value))

    usage(BOB_MESH, "u0", 0, [(OWNER, 6000), (BOB, 999)])  # bob's own use counts as neither
    usage(ME, "u1", 1, [(BOB, 2500)])
    usage(BOB_MESH, "u2", 1, [(OWNER, 1000)])
    usage("did:plc:stranger", "u3", 1, [(OWNER, 7)])  # no known owner: left out
    page = WebApp(ViewNode(p.read)).render("/fairshare", {})
    history = page.split("<h2>Over time</h2>", 1)[1]
    assert "2 period(s)" in history
    assert history.count('<figure class="history">') == 2  # alice (OWNER) and bob
    assert history.count("<polyline") == 4 and history.count("<circle") == 8  # a dot a period
    # alice used 6000 then 1000 and lent 0 then 2500; bob the mirror image.
    assert re.search(r"lent 0, used 6000</title>.*lent 2500, used 1000</title>", history, re.S)
    assert re.search(r"lent 6000, used 0</title>.*lent 1000, used 2500</title>", history, re.S)
    assert "lent 2500, used 7000" in history  # alice's caption: the stranger's 7 not counted


def test_fair_share_without_usage_records_says_so() -> None:
    from meshletd.web.app import WebApp
    from meshletd.web.testing import ViewNode

    page = WebApp(ViewNode(parts().read)).render("/fairshare", {})
    assert "No usage records yet" in page


def test_shown_escapes_controls_and_bidi_but_keeps_text() -> None:
    assert shown("a\u202eb\x1b[2Jc") == "a\\u202eb\\x1b[2Jc"
    assert shown("café 日本") == "café 日本"
    assert shown(None) == "" and shown(3) == 3


def test_a_large_commune_is_shown_fifty_workloads_a_page() -> None:
    from meshletd.web.app import WebApp
    from meshletd.web.testing import big_commune

    app = WebApp(big_commune(meshlets=50, workloads=120))
    first = app.render("/workloads", {})
    assert first.count('<tr data-uri="') == 50 and "1\u201350 of 120" in first
    assert 'rel="next"' in first and 'rel="prev"' not in first
    last = app.render("/workloads", {"page": "3"})
    assert last.count('<tr data-uri="') == 20 and "101\u2013120 of 120" in last
    members = app.render("/members", {})
    assert members.count('class="meshlet"') == 50
    assert members.count("verified both ways") == 50


def test_a_workload_page_shows_each_replica_s_health_and_endpoints() -> None:
    from meshletd.web.app import WebApp
    from meshletd.web.testing import _Ev, big_commune

    node = big_commune(meshlets=3, workloads=1, replicas=1)
    f = node.read.followed
    uri = sorted(f.workloads)[0]
    host = next(iter(f.statuses[uri].values())).meshlet
    status = {
        "workload": {"uri": uri, "cid": "bafyx"},
        "round": 0,
        "slot": 0,
        "state": "running",
        "restarts": 1,
        "health": "healthy",
        "endpoints": [{"name": "http", "address": "10.251.4.3", "port": 20000, "protocol": "tcp"}],
        "updatedAt": "2026-12-04T06:00:02.000Z",
    }
    f.apply(_Ev(host, "workloadStatus", next(iter(f.statuses[uri])).rsplit("/", 1)[1], status))
    page = WebApp(node).render("/workload", {"uri": uri})
    assert "10.251.4.3:20000" in page and ">healthy<" in page
    [row] = node.read.workload(uri)["running"]
    assert row["endpoints"][0]["port"] == 20000 and row["health"] == "healthy"
