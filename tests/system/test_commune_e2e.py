"""A real commune end to end (issue 7): three meshlets, each meshletd on its own booted
systemd host, mutually consenting, on two PDSes of the local atproto network.

The tests share one commune (booted once for the module) and one service workload
("ticker"). What a test needs done before it is a module-scoped fixture that does it once:
`formed` (every meshlet verified the other two), `ticker_running` (ticker placed the same
everywhere), `failover` (a hosting machine powered off and its slot run elsewhere),
`host_back` (that machine powered on again, with a fresh disk), `ticker_stopped`. So each
test runs alone too (`-k`), doing only the steps it depends on; in file order each fixture
runs once, where the test that checks it first needs it.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshletd.daemon.http_peers import PING_ANSWER_S, PING_CONNECT_S
from tests.system.commune import CTL, PEOPLE, Commune, Meshlet, booted, wait_for
from tests.system.hostenv import host_kind

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
)

# A service printing one line a second, run with the issue's own `--cpu 200 --memory 64`:
# a bare integer is milli-CPU and a bare memory is MiB (Nomad-like; docs/cli.md).
TICKER = ["sh", "-c", 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 1; done']
RUN_TICKER = ["--name", "ticker", "--replicas", "2", "--cpu", "200", "--memory", "64"]
BID_WINDOW_S = 30  # generous: bid window + settle + image check + unit start, on 2 busy cores
# The failover target is 10 s (dev/bench failover measures it); the test allows
# 5 s more so a loaded 2-core CI machine does not turn a slow run red.
FAILOVER_TARGET_S = 10.0
FAILOVER_LIMIT_S = FAILOVER_TARGET_S + 5.0
# A frozen host's kernel still accepts the watchers' probes; a probe fails when no answer
# comes within PING_ANSWER_S instead of when the connection fails after PING_CONNECT_S, so
# its last failure before suspicion lands that much later than a powered-off host's
# (docs/protocol.md, section 8). Measured to the watchers' agreed placement, not to the
# replacement running.
FROZEN_LIMIT_S = FAILOVER_LIMIT_S + PING_ANSWER_S - PING_CONNECT_S
WORKLOAD = "commune.scheduler.workload"
# Fair share within minutes, not days (the fair-share test): a usage record per meshlet
# every 5 s and a one-minute half-life, so old use fades while bob's fresh use counts
# (docs/protocol.md §11).
# Both are commune-wide settings: every meshlet of the commune gets the same values.
SCHEDULING = {"usage_period_ms": 5000, "half_life_ms": 60_000}


@pytest.fixture(scope="module")
def commune(devnet: Any) -> Iterator[Commune]:
    # Traced (cheap): a slow failover says which rounds and bids each watcher saw.
    with booted(devnet, scheduling=SCHEDULING, trace=True) as c:
        yield c


# -- helpers ------------------------------------------------------------------------------


def find(m: Meshlet, name: str, owner: str | None = None) -> dict[str, Any] | None:
    """The workload view named `name` as m's meshletd reports it (`workloads --all`)."""
    for w in m.ctl_json("workloads", "--all"):
        if w.get("name") == name and (owner is None or w["ownerDid"] == owner):
            return w
    return None


def slots(view: dict[str, Any] | None) -> dict[int, tuple[str, str]]:
    """slot -> (meshlet DID, state) of the highest round each slot has (its owner)."""
    best: dict[int, dict[str, Any]] = {}
    for r in (view or {}).get("running", []):
        s = int(r["slot"])
        if r.get("meshletDid") and (s not in best or r.get("round", -1) > best[s].get("round", -1)):
            best[s] = r
    return {s: (r["meshletDid"], r["state"]) for s, r in sorted(best.items())}


def running_placement(view: dict[str, Any] | None, replicas: int) -> dict[int, str] | None:
    """slot -> meshlet when every slot is owned and running, else None."""
    got = slots(view)
    if len(got) != replicas or any(state != "running" for _, state in got.values()):
        return None
    return {s: d for s, (d, _) in got.items()}


def agreed_placement(
    commune: Commune, name: str, replicas: int, people: tuple[str, ...] = PEOPLE
) -> dict[int, str] | None:
    """The placement when every meshlet in `people` reports the same running one."""
    seen = [running_placement(find(commune[p], name), replicas) for p in people]
    if seen[0] is None or any(s != seen[0] for s in seen):
        return None
    return seen[0]


def units_of(m: Meshlet, workload_uri: str) -> list[str]:
    """m's active replica units of one workload (unit names carry the record key)."""
    rkey = workload_uri.rsplit("/", 1)[1]
    return [u for u in m.replica_units() if rkey in u]


def unit_of(m: Meshlet, workload_uri: str, slot: int) -> str | None:
    w = next((w for w in m.ctl_json("workloads", "--all") if w["uri"] == workload_uri), None)
    for r in (w or {}).get("running", []):
        if r["slot"] == slot and r.get("meshletDid") == m.did and r.get("unit"):
            return str(r["unit"])
    return None


def list_records(pds_url: str, repo: str, collection: str) -> list[dict[str, Any]]:
    """Every record of one collection of a repo (public read, no auth)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {"repo": repo, "collection": collection, "limit": "100"}
        if cursor:
            q["cursor"] = cursor
        url = f"{pds_url}/xrpc/com.atproto.repo.listRecords?{urllib.parse.urlencode(q)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            page = json.load(r)
        out.extend(page["records"])
        cursor = page.get("cursor")
        if not cursor or not page["records"]:
            return out


def repo_dump(pds_url: str, repo: str) -> bytes:
    """The whole repo as a CAR (every record it holds, in any collection)."""
    url = f"{pds_url}/xrpc/com.atproto.sync.getRepo?did={urllib.parse.quote(repo)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return bytes(r.read())


def publish(m: Meshlet, image_args: list[str], *args: str) -> str:
    done = m.ctl_json("run", *args, "localhost/busybox:latest", "--", *image_args)
    return str(done["uri"])


def stop_workload(m: Meshlet, name: str) -> None:
    done = m.ctl("stop", name)
    assert done.returncode in (0, 4), done.stderr  # 4: gone already


# -- fixtures: the steps the tests depend on ----------------------------------------------


@pytest.fixture(scope="module")
def formed(commune: Commune) -> dict[str, list[dict[str, Any]]]:
    """The cluster has formed: each meshlet lists the other two as verified members
    (person -> `meshletctl members --json`)."""
    out = {}
    for m in commune:
        others = {o.owner_did: o.did for o in commune if o is not m}

        def verified(m: Meshlet = m, others: dict[str, str] = others) -> list[dict[str, Any]]:
            rows = m.ctl_json("members")
            ok = {r["ownerDid"]: r["meshletDids"] for r in rows if r["verified"]}
            return rows if ok == {o: [d] for o, d in others.items()} else []

        out[m.person] = wait_for(verified, 60, f"{m.person}'s meshletd to verify the other two")
    return out


@pytest.fixture(scope="module")
def ticker(commune: Commune, formed: Any) -> dict[str, Any]:
    """alice's 2-replica service, published once; the fixtures below record in it what
    they did (`placement`, `victim`)."""
    t0 = time.monotonic()
    uri = publish(commune["alice"], TICKER, *RUN_TICKER)
    return {"uri": uri, "published": t0}


@pytest.fixture(scope="module")
def ticker_running(commune: Commune, ticker: dict[str, Any]) -> dict[int, str]:
    """ticker runs its two replicas and every meshlet reports the same placement
    (slot -> meshlet DID), within the bid window."""
    placement = wait_for(
        lambda: agreed_placement(commune, "ticker", 2),
        BID_WINDOW_S,
        "every meshlet to report the same running placement of ticker",
    )
    ticker["placement"] = placement
    ticker["running_after_s"] = time.monotonic() - ticker["published"]
    return placement


@pytest.fixture(scope="module")
def failover(commune: Commune, ticker: dict[str, Any], ticker_running: Any) -> dict[str, Any]:
    """A machine hosting a replica of ticker (not alice's if possible) is powered off, and
    the other two agree on a placement without it: {victim, slot, t0, placement}."""
    placement = wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "ticker placed")
    victim = _victim(commune, placement)
    lost = next(s for s, d in placement.items() if d == victim.did)
    watchers = tuple(p for p in PEOPLE if p != victim.person)
    t0 = time.monotonic()
    commune.power_off(victim.person)
    ticker["victim"] = victim.person

    def replaced() -> dict[int, str] | None:
        now = agreed_placement(commune, "ticker", 2, watchers)
        return now if now and victim.did not in now.values() else None

    after = wait_for(replaced, 60, f"slot {lost} of ticker to run off {victim.person}'s machine")
    return {
        "victim": victim,
        "slot": lost,
        "t0": t0,
        "t0_wall": time.time() - (time.monotonic() - t0),
        "placement": after,
    }


@pytest.fixture(scope="module")
def host_back(commune: Commune, failover: dict[str, Any]) -> Meshlet:
    """The powered-off machine is on again (a fresh disk: new state dir and keys) and its
    meshletd has rejoined: the commune is whole again."""
    victim = failover["victim"]
    commune.power_on(victim.person)
    back = commune[victim.person]
    wait_for(
        lambda: back.ctl_json("status")["members"] == 2, 60, f"{victim.person}'s meshletd to rejoin"
    )
    return back


@pytest.fixture(scope="module")
def ticker_stopped(commune: Commune, ticker: dict[str, Any], ticker_running: Any) -> Any:
    """alice has run `meshletctl stop ticker` (its answer)."""
    return commune["alice"].ctl("stop", "ticker")


def _victim(commune: Commune, placement: dict[int, str]) -> Meshlet:
    """A hosting meshlet, not alice's if possible (her machine stays up to watch)."""
    hosting = [commune.by_did(d) for d in placement.values()]
    return next((m for m in hosting if m.person != "alice"), hosting[0])


# -- the cluster forms --------------------------------------------------------------------


def test_the_cluster_forms_and_each_meshlet_lists_the_other_two(
    commune: Commune, formed: dict[str, list[dict[str, Any]]]
) -> None:
    for m in commune:
        rows = formed[m.person]
        assert {r["cluster"] for r in rows} == {"commune"}
        status = m.ctl_json("status")
        assert status["members"] == 2 and status["state"] == "active"
        assert status["did"] == m.did and status["ownerDid"] == m.owner_did
        # The human table shows them too, by handle (--json keeps the DIDs, checked above).
        table = m.ctl("members").stdout
        assert table.count("yes") == 2, table
        for o in commune:
            if o is not m:
                assert o.owner.handle in table and o.mesh.handle in table, table


# -- a service with two replicas ----------------------------------------------------------


def test_a_service_runs_two_replicas_with_the_same_placement_on_every_meshlet(
    commune: Commune, ticker: dict[str, Any], ticker_running: dict[int, str]
) -> None:
    placement = ticker_running
    hosts = set(placement.values())
    assert len(hosts) == 2, f"two replicas on one meshlet: {placement}"
    # `journalctl -u <unit>` on each hosting machine shows the output.
    for slot, did in placement.items():
        m = commune.by_did(did)
        unit = unit_of(m, ticker["uri"], slot)
        assert unit, f"{m.person} does not name the unit of slot {slot}"
        assert m.run("systemctl", "is-active", unit).stdout.strip() == "active"
        wait_for(
            lambda m=m, unit=unit: "tick " in m.journal(unit, 20),
            15,
            f"ticks in journalctl -u {unit} on {m.person}",
        )
    # Nobody else runs a replica of it.
    for m in commune:
        assert len(units_of(m, ticker["uri"])) == (1 if m.did in hosts else 0), m.person


def test_alice_reads_every_replica_s_logs_from_her_own_machine(
    commune: Commune, ticker_running: dict[int, str]
) -> None:
    alice = commune["alice"]
    placement = ticker_running
    assert any(d != alice.did for d in placement.values())  # at least one is remote
    for slot, did in placement.items():
        done = alice.ctl("logs", "ticker", "--slot", str(slot), "-n", "5")
        assert done.returncode == 0, (
            f"logs of slot {slot} (on {commune.by_did(did).person}): exit {done.returncode} "
            f"{done.stderr.strip()}"
        )
        assert "tick " in done.stdout, done.stdout
        # Plain lines, as the container printed them, wherever it runs (no journal prefix).
        # (systemd's own lines about the unit, e.g. "Starting meshlet-…", are shown too.)
        ticks = [line for line in done.stdout.splitlines() if "tick " in line]
        assert ticks and all(line.startswith("tick ") for line in ticks), done.stdout


def test_alice_follows_a_replica_on_another_meshlet_without_repeats_or_gaps(
    commune: Commune, ticker_running: dict[int, str]
) -> None:
    alice = commune["alice"]
    placement = ticker_running
    slot = next(s for s, d in placement.items() if d != alice.did)
    # Follow for 8 s (a tick a second), stopped by ^C as a user would; -n 2, so the window
    # of the last lines is full long before the end.
    done = alice.run(
        "timeout", "--preserve-status", "-s", "INT", "8",
        CTL, "logs", "ticker", "--slot", str(slot), "-n", "2", "-f", "--timestamps",
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 130, f"exit {done.returncode}: {done.stdout}{done.stderr}"
    ticks = [line.split(" ", 1) for line in done.stdout.splitlines() if " tick " in line]
    numbers = [int(text.split()[1]) for _, text in ticks]
    assert len(numbers) >= 5, done.stdout  # the 2 last lines, then new ones for ~8 s
    # Each line once and none skipped: the ticker counts up by one.
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), done.stdout
    stamps = [t for t, _ in ticks]
    assert stamps == sorted(stamps) and all(t.endswith("Z") and "T" in t for t in stamps)


# -- a job --------------------------------------------------------------------------------


def test_a_job_runs_to_completion_and_its_exit_code_is_in_its_status_record(
    commune: Commune, formed: Any
) -> None:
    bob = commune["bob"]
    uri = publish(
        bob,
        ["sh", "-c", "echo working; sleep 1; exit 3"],
        "--name", "job3", "--kind", "job", "--restart", "never", "--cpu", "100m",
        "--memory", "32Mi",
    )  # fmt: skip

    def final_status() -> tuple[Meshlet, dict[str, Any]] | None:
        for m in commune:
            for rec in list_records(m.mesh.pds_url, m.did, "commune.scheduler.workloadStatus"):
                v = rec["value"]
                if v["workload"]["uri"] == uri and v["state"] in ("exited", "failed", "succeeded"):
                    return m, v
        return None

    host, status = wait_for(final_status, BID_WINDOW_S + 15, "the job's final status record")
    assert status["exitCode"] == 3, status
    assert status["slot"] == 0
    # The job ran once (restart never): no unit is left active anywhere.
    for m in commune:
        assert not units_of(m, uri), f"{m.person} still runs the job"
    assert "working" in host.run("journalctl", "--no-pager", "-o", "cat", "-n", "2000").stdout
    stop_workload(bob, "job3")


def test_meshletctl_shows_a_job_s_exit_code_on_every_meshlet(commune: Commune, formed: Any) -> None:
    bob = commune["bob"]
    uri = publish(
        bob,
        ["sh", "-c", "exit 4"],
        "--name", "job4", "--kind", "job", "--restart", "never", "--cpu", "100m",
        "--memory", "32Mi",
    )  # fmt: skip
    try:
        for m in commune:
            view = wait_for(
                lambda m=m: next(
                    (
                        w
                        for w in m.ctl_json("workloads", "--all")
                        if w["uri"] == uri and any("exitCode" in r for r in w["running"])
                    ),
                    None,
                ),
                BID_WINDOW_S,
                f"{m.person}'s meshletctl to show job4's exit code",
            )
            assert [r["exitCode"] for r in view["running"] if "exitCode" in r] == [4]
    finally:
        stop_workload(bob, "job4")


# -- power-off failover -------------------------------------------------------------------


def test_a_powered_off_host_s_replica_runs_elsewhere_within_the_target(
    commune: Commune, ticker: dict[str, Any], failover: dict[str, Any]
) -> None:
    lost, t0, after = failover["slot"], failover["t0"], failover["placement"]
    new_host = commune.by_did(after[lost])
    unit = unit_of(new_host, ticker["uri"], lost)
    assert unit, f"{new_host.person} names no unit for slot {lost}"
    # When systemd started the replacement, not when our polling noticed it.
    started = new_host.active_since(unit)
    assert started is not None, f"{unit} is not active on {new_host.person}"
    elapsed = started - t0
    ticker["failover_s"] = elapsed
    if elapsed > FAILOVER_LIMIT_S:
        victim = failover["victim"].person
        story = commune.story(failover["t0_wall"], ticker["uri"], skip=(victim,))
        pytest.fail(f"replacement running after {elapsed:.1f} s; the watchers' logs:\n{story}")


def test_the_host_coming_back_starts_no_duplicate(
    commune: Commune, ticker: dict[str, Any], host_back: Meshlet
) -> None:
    back = host_back
    # It sees the workload and the current placement, and runs nothing of it.
    wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "one placement everywhere")
    time.sleep(8)  # longer than a bid window: a wrongly started duplicate would show by now
    placement = agreed_placement(commune, "ticker", 2)
    assert placement and back.did not in placement.values(), placement
    assert not units_of(back, ticker["uri"])
    assert sum(len(units_of(m, ticker["uri"])) for m in commune) == 2


def test_a_host_cut_off_and_back_stops_its_stale_replica(
    commune: Commune, ticker: dict[str, Any], ticker_running: Any, host_back: Meshlet
) -> None:
    # host_back: the commune is whole again after the power-off (when that ran at all).
    placement = wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "ticker placed")
    victim = _victim(commune, placement)
    watchers = tuple(p for p in PEOPLE if p != victim.person)
    unit = units_of(victim, ticker["uri"])
    assert unit, f"{victim.person} runs no replica to go stale"
    frozen = time.monotonic()
    commune.freeze(victim.person)  # a hung machine: its replica survives, frozen
    try:
        wait_for(
            lambda: (
                (p := agreed_placement(commune, "ticker", 2, watchers))
                and victim.did not in p.values()
            ),
            # Its kernel still accepts the watchers' probes (its frozen meshletd does not
            # answer): a probe fails after PING_ANSWER_S unanswered (docs/protocol.md,
            # section 8).
            FROZEN_LIMIT_S,
            f"ticker to be re-placed away from the frozen {victim.person}",
        )
        ticker["frozen_replaced_s"] = time.monotonic() - frozen
    finally:
        commune.thaw(victim.person)
    # Thawed, its replica runs again: it must learn it lost the slot and stop it.
    wait_for(lambda: not units_of(victim, ticker["uri"]), 90, f"{victim.person} to stop it")
    assert sum(len(units_of(m, ticker["uri"])) for m in commune) == 2
    placement = wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "one placement")
    assert victim.did not in placement.values()


# -- drain --------------------------------------------------------------------------------


def test_drain_moves_replicas_away_and_takes_no_new_work_until_undrain(
    commune: Commune, ticker: dict[str, Any], ticker_running: Any, host_back: Meshlet
) -> None:
    placement = wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "ticker placed")
    drained = _victim(commune, placement)
    others = [m for m in commune if m is not drained]
    done = drained.ctl("drain", "--wait", "--deadline", "90", "--json", timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["replicas"] == 0
    try:
        assert not units_of(drained, ticker["uri"])
        after = wait_for(lambda: agreed_placement(commune, "ticker", 2), 30, "ticker re-placed")
        assert drained.did not in after.values()
        assert {commune.by_did(d).person for d in after.values()} == {m.person for m in others}
        assert drained.ctl_json("status")["state"] == "draining"
        # New work goes elsewhere: three replicas, two meshlets that take work.
        uri = publish(
            commune["carol"], ["sleep", "1000"], "--name", "trio", "--replicas", "3",
            "--cpu", "100m", "--memory", "32Mi",
        )  # fmt: skip
        wait_for(
            lambda: sum(s == "running" for _, s in slots(find(drained, "trio")).values()) == 2,
            BID_WINDOW_S,
            "two replicas of trio to run",
        )
        time.sleep(5)
        assert not units_of(drained, uri), "a draining meshlet took new work"
    finally:
        undone = drained.ctl("undrain", "--json")
        assert undone.returncode == 0, undone.stderr
        stop_workload(commune["carol"], "trio")
    assert json.loads(undone.stdout)["state"] == "active"
    assert drained.ctl_json("status")["state"] == "active"
    # Undrained, it takes new work again: three replicas need all three meshlets.
    uri = publish(
        commune["carol"], ["sleep", "1000"], "--name", "trio2", "--replicas", "3",
        "--cpu", "100m", "--memory", "32Mi",
    )  # fmt: skip
    try:
        placed = wait_for(
            lambda: agreed_placement(commune, "trio2", 3), BID_WINDOW_S, "trio2 placed"
        )
        assert drained.did in placed.values()
        assert units_of(drained, uri)
    finally:
        stop_workload(commune["carol"], "trio2")


# -- stop ---------------------------------------------------------------------------------


def test_stop_stops_every_replica_on_every_host(
    commune: Commune, ticker: dict[str, Any], ticker_stopped: Any
) -> None:
    done = ticker_stopped
    assert done.returncode == 0, done.stderr
    for m in commune:
        wait_for(lambda m=m: not units_of(m, ticker["uri"]), 30, f"{m.person} to stop ticker")
    for m in commune:
        wait_for(lambda m=m: find(m, "ticker") is None, 15, f"{m.person} to forget ticker")


# -- pending ------------------------------------------------------------------------------


def test_a_workload_larger_than_any_free_capacity_is_pending_with_a_reason(
    commune: Commune, formed: Any
) -> None:
    alice = commune["alice"]
    publish(alice, ["sleep", "1000"], "--name", "huge", "--cpu", "1500m", "--memory", "32Mi")
    try:
        time.sleep(BID_WINDOW_S / 3)
        for m in commune:
            view = find(m, "huge")
            assert view is not None, f"{m.person} does not know huge"
            rows = view["running"]
            assert rows and all(r["state"] == "pending" for r in rows), rows
            assert not slots(view), f"{m.person}: a meshlet owns a slot of huge: {rows}"
            reasons = [r.get("reason") for r in rows]
            assert all(reasons), f"{m.person}: pending without a reason: {rows}"
        table = alice.ctl("workloads").stdout
        assert "pending" in table and "capacity" in table.lower(), table
    finally:
        stop_workload(alice, "huge")


def test_a_pending_workload_is_placed_once_capacity_frees(commune: Commune, formed: Any) -> None:
    alice, bob = commune["alice"], commune["bob"]
    publish(
        alice, ["sleep", "1000"], "--name", "filler", "--replicas", "3", "--cpu", "700m",
        "--memory", "32Mi",
    )  # fmt: skip
    wait_for(lambda: agreed_placement(commune, "filler", 3), BID_WINDOW_S, "filler placed")
    publish(bob, ["sleep", "1000"], "--name", "big", "--cpu", "600m", "--memory", "32Mi")
    try:
        time.sleep(BID_WINDOW_S / 3)
        for m in commune:
            assert not running_placement(find(m, "big"), 1), f"{m.person}: big runs already"
        stop_workload(alice, "filler")
        wait_for(lambda: agreed_placement(commune, "big", 1), 60, "big placed after filler")
    finally:
        stop_workload(alice, "filler")
        stop_workload(bob, "big")


# -- secrets ------------------------------------------------------------------------------

SECRET = "mesh-let-s3cr3t-9f2c7a"


def test_a_secret_reaches_the_container_and_no_record_unit_or_log(
    commune: Commune, host_back: Meshlet
) -> None:
    alice = commune["alice"]
    # The meshlets that kept their disk (the power-cycled one is the next test's).
    avoid = host_back.did
    alice.write("/root/db-password", SECRET, "600")  # on stdin: never in an argv
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    # The container proves it holds the value by printing its hash, never the value.
    uri = publish(
        alice, ["sh", "-c", "sha256sum /run/secrets/db; sleep 1000"],
        "--name", "vault", "--replicas", "2", "--secret", "db=@/root/db-password",
        "--cpu", "100m", "--memory", "32Mi", "--constraint", f"avoid={avoid}",
    )  # fmt: skip
    try:
        try:
            placement = wait_for(
                lambda: agreed_placement(commune, "vault", 2),
                BID_WINDOW_S,
                "both replicas of vault",
            )
        except AssertionError as e:
            said = {
                m.person: [x for x in m.journal(lines=300).splitlines() if "secret" in x]
                for m in commune
            }
            views = {m.person: slots(find(m, "vault")) for m in commune}
            raise AssertionError(f"{e}\nviews: {views}\nmeshletd on secrets: {said}") from None
        for slot, did in placement.items():
            m = commune.by_did(did)
            unit = unit_of(m, uri, slot) or pytest.fail(f"no unit for slot {slot}", False)
            wait_for(lambda m=m, u=unit: digest in m.journal(u, 20), 15, f"the hash on {m.person}")
            props = m.run("systemctl", "show", unit, "--no-pager").stdout
            assert SECRET not in props and "db-password" not in props
        needle = SECRET.encode()
        for m in commune:
            for repo, pds in ((m.did, m.mesh.pds_url), (m.owner_did, m.owner.pds_url)):
                assert needle not in repo_dump(pds, repo), f"secret in {m.person}'s repo {repo}"
            journal = m.run("journalctl", "--no-pager", "-o", "verbose", "-n", "20000").stdout
            assert SECRET not in journal, f"secret in {m.person}'s journal"
        rec = next(
            r["value"]
            for r in list_records(
                alice.owner.pds_url, alice.owner_did, "commune.scheduler.workload"
            )
            if r["uri"] == uri
        )
        assert rec["secrets"] == [{"name": "db"}]
    finally:
        stop_workload(alice, "vault")


def test_a_secret_reaches_a_meshlet_that_came_back_with_a_fresh_disk(
    commune: Commune, host_back: Meshlet
) -> None:
    alice, back = commune["alice"], host_back
    alice.write("/root/db-password", SECRET, "600")
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    others = [m.did for m in commune if m is not back and m is not alice]
    uri = publish(
        alice, ["sh", "-c", "sha256sum /run/secrets/db; sleep 1000"],
        "--name", "vault2", "--secret", "db=@/root/db-password", "--cpu", "100m",
        "--memory", "32Mi", "--constraint", f"avoid={alice.did}",
        *(x for d in others for x in ("--constraint", f"avoid={d}")),
    )  # fmt: skip
    try:
        wait_for(lambda: units_of(back, uri), BID_WINDOW_S, f"vault2 on {back.person}")
        unit = units_of(back, uri)[0]
        wait_for(lambda: digest in back.journal(unit, 20), 15, f"the hash on {back.person}")
    finally:
        stop_workload(alice, "vault2")


# -- fair share ---------------------------------------------------------------------------


# What every meshlet computes alike; `standing` and `served` are each host's own view
# (its own owner is "host" there: docs/protocol.md section 23).
LEDGER_KEYS = ("ownerDid", "tookMilliCpuSeconds", "priority")


def _ledger(m: Meshlet) -> dict[str, Any]:
    got = m.ctl_json("balance")
    owners = [{k: e.get(k) for k in LEDGER_KEYS} for e in got["owners"]]
    return {"at": got.get("at"), "owners": sorted(owners, key=lambda e: e["ownerDid"])}


def test_after_bob_consumes_heavily_placement_favours_his_meshlet(
    commune: Commune, formed: Any
) -> None:
    bob, carol = commune["bob"], commune["carol"]
    # bob takes from alice's and carol's machines (one replica per meshlet: 3 replicas).
    publish(
        bob, ["sleep", "1000"], "--name", "hog", "--replicas", "3", "--cpu", "600m",
        "--memory", "64Mi",
    )  # fmt: skip
    try:
        wait_for(lambda: agreed_placement(commune, "hog", 3), BID_WINDOW_S, "hog placed")

        def bob_took_most() -> dict[str, Any] | None:
            # Every meshlet computes the same ledger (same usage records, same period start),
            # and bob has taken more than anyone, so his meshlet has the highest priority.
            ledgers = [_ledger(m) for m in commune]
            if any(
                json.dumps(x, sort_keys=True) != json.dumps(ledgers[0], sort_keys=True)
                for x in ledgers
            ):
                return None
            rows = {e["ownerDid"]: e for e in ledgers[0]["owners"]}
            others = [rows[commune[p].owner_did] for p in ("alice", "carol")]
            me = rows[bob.owner_did]
            if all(me["tookMilliCpuSeconds"] > o["tookMilliCpuSeconds"] for o in others) and all(
                me["priority"] > o["priority"] for o in others
            ):
                return ledgers[0]
            return None

        # Usage is published once per 5 s period and old use halves every minute.
        wait_for(bob_took_most, 120, "every ledger to show bob took most", every=1.0)
        stop_workload(bob, "hog")
        # ... so bob's meshlet now bids with the highest priority and wins. Two replicas:
        # round 0 then asks every meshlet (replicas + 1 candidates), and slot 0 goes to the
        # highest priority.
        publish(
            carol, ["sleep", "1000"], "--name", "after", "--replicas", "2", "--cpu", "100m",
            "--memory", "32Mi",
        )  # fmt: skip
        placement = wait_for(
            lambda: agreed_placement(commune, "after", 2), BID_WINDOW_S, "after placed"
        )
        assert placement[0] == bob.did, placement
        rounds = carol.ctl_json("bids", "after")["rounds"]
        top = max(rounds[0]["bids"], key=lambda b: b["priority"])
        assert top["meshletDid"] == bob.did and all(
            b["priority"] < top["priority"] for b in rounds[0]["bids"] if b is not top
        ), rounds
        stop_workload(carol, "after")
    finally:
        stop_workload(bob, "hog")
