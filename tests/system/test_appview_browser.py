"""The appview in a real browser (issue 17): headless Chromium against the pages each
meshletd of the three-host commune serves, with `meshletctl run` publishing a workload
while the page is open. Screenshots (desktop and phone) are written by the run
(tests/system/browser.py: build/screenshots, or $MESHLET_SCREENSHOTS)."""

from __future__ import annotations

import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system import browser
from tests.system.commune import Commune, booted, wait_for, wait_formed
from tests.system.hostenv import host_kind

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        host_kind() == "local", reason="boots three hosts of its own: dev/hostenv hosts only"
    ),
]

SERVICE = ["sh", "-c", "while true; do sleep 1; done"]
LIVE_LIMIT_S = 2.0  # from the record reaching the meshlet to the page showing it


@pytest.fixture(scope="module")
def commune(devnet: Any) -> Iterator[Commune]:
    if not browser.available():
        pytest.fail("needs Debian's chromium and chromium-driver (dev/test installs them)", False)
    with booted(devnet) as c:
        yield c


@pytest.fixture(scope="module")
def formed(commune: Commune) -> Commune:
    return wait_formed(commune, 90)


@pytest.fixture
def chrome() -> Iterator[Any]:
    # One browser per test: the leak check fails a test that leaves processes behind.
    with browser.chromium() as driver:
        yield driver


def short(did: str) -> str:
    """A DID as the page prints it in tables (meshletd/web/app.py `_short`)."""
    return did if len(did) <= 28 else did[:20] + "…" + did[-6:]


def clean_load(driver: Any, url: str) -> None:
    """Open `url`; no console error and no failed request on the way."""
    driver.get_log("browser"), driver.get_log("performance")  # forget earlier pages
    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 10, url)
    time.sleep(0.3)  # the event stream connects and the icon loads after `complete`
    assert browser.console_errors(driver) == [], url
    assert browser.failed_requests(driver) == [], url


def placed_on_page(driver: Any, name: str) -> list[tuple[str, str]]:
    """(meshlet DID, state) of every slot of the row named `name` in the open page."""
    rows = driver.execute_script(
        """
        const out = [];
        for (const tr of document.querySelectorAll("table.workloads tbody tr")) {
          const a = tr.querySelector("td a");
          if (!a || a.textContent !== arguments[0]) continue;
          for (const li of tr.querySelectorAll("li.slot"))
            out.push([li.dataset.meshlet, li.querySelector(".pill").textContent]);
        }
        return out;
        """,
        name,
    )
    return [(str(d), str(s)) for d, s in rows]


def test_every_page_of_every_meshlet_loads_clean(formed: Commune, chrome: Any) -> None:
    for m in formed:
        clean_load(chrome, m.web_url + "/members")
        text = chrome.find_element("id", "main").text
        for o in formed:
            assert o.did in text, (m.person, o.person)
        assert text.count("verified both ways") == 3, text
        for path in ("/workloads", "/fairshare"):
            clean_load(chrome, m.web_url + path)
    metrics = urllib.request.urlopen(formed["alice"].web_url + "/metrics", timeout=5).read()
    assert re.search(rb'^meshlet_meshlets\{state="active"\} 3\.0$', metrics, re.M)


def test_a_published_workload_appears_with_its_placement_live(formed: Commune, chrome: Any) -> None:
    alice, bob = formed["alice"], formed["bob"]
    clean_load(chrome, bob.web_url + "/workloads")
    chrome.execute_script("window.__noReload = true")
    scrape = lambda: urllib.request.urlopen(bob.web_url + "/metrics", timeout=5).read()  # noqa: E731
    before = scrape()
    done = alice.ctl_json(
        "run",
        "--name",
        "appview-web",
        "--replicas",
        "2",
        "--cpu",
        "100",
        "--memory",
        "32",
        "localhost/busybox:latest",
        "--",
        *SERVICE,
    )
    uri = done["uri"]

    def running_on_page() -> list[tuple[str, str]] | None:
        got = placed_on_page(chrome, "appview-web")
        return got if len(got) == 2 and all(s == "running" and d for d, s in got) else None

    placed = wait_for(running_on_page, 60, "appview-web running on bob's page, live")
    assert chrome.execute_script("return window.__noReload") is True  # no reload happened
    # The page agrees with what bob's meshletd says, and it arrived within LIVE_LIMIT_S.
    view = next(w for w in bob.ctl_json("workloads", "--all") if w["uri"] == uri)
    want = sorted((r["meshletDid"], r["state"]) for r in view["running"] if r.get("meshletDid"))
    assert sorted(placed) == want

    # Every page of it loads clean; the rounds page names the winners and the rule.
    q = urllib.parse.quote(uri, safe="")
    clean_load(chrome, f"{bob.web_url}/workload?uri={q}")
    clean_load(chrome, f"{bob.web_url}/rounds?uri={q}&slot=0")
    text = chrome.find_element("id", "main").text
    assert "Round 0" in text and "won by" in text and "(-priority, score)" in text
    assert browser.console_errors(chrome) == []

    after = scrape()
    running = rb'^meshlet_replicas\{state="running"\} (\d+)\.0$'
    n0 = int(re.search(running, before, re.M).group(1))  # type: ignore[union-attr]
    n1 = int(re.search(running, after, re.M).group(1))  # type: ignore[union-attr]
    assert n1 == n0 + 2
    assert re.search(rb"^meshlet_bids_seen_total\{decision=\"offer\"\} [1-9]", after, re.M)

    shots = browser.screenshot_dir()
    clean_load(chrome, bob.web_url + "/workloads")
    chrome.save_screenshot(str(shots / "appview-workloads-desktop.png"))
    clean_load(chrome, bob.web_url + "/members")
    chrome.save_screenshot(str(shots / "appview-members-desktop.png"))
    chrome.set_window_size(*browser.PHONE)
    try:
        clean_load(chrome, bob.web_url + "/workloads")
        chrome.save_screenshot(str(shots / "appview-workloads-phone.png"))
    finally:
        chrome.set_window_size(*browser.DESKTOP)
    assert (shots / "appview-workloads-phone.png").stat().st_size > 10_000


def test_a_placement_reaches_the_open_page_within_two_seconds(formed: Commune, chrome: Any) -> None:
    """From the moment bob's meshletd reports the new slot running (its read model) to the
    moment the open page shows it, without reload."""
    alice, carol = formed["alice"], formed["carol"]
    clean_load(chrome, carol.web_url + "/workloads")
    alice.ctl_json(
        "run",
        "--name",
        "appview-job",
        "--replicas",
        "1",
        "--cpu",
        "100",
        "--memory",
        "32",
        "localhost/busybox:latest",
        "--",
        *SERVICE,
    )
    seen_by_daemon: list[float] = []
    seen_by_page: list[float] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not seen_by_page:
        if not seen_by_daemon:
            view = next(
                (w for w in carol.ctl_json("workloads", "--all") if w["name"] == "appview-job"),
                None,
            )
            if view and any(r.get("state") == "running" for r in view["running"]):
                seen_by_daemon.append(time.monotonic())
        if any(s == "running" for _, s in placed_on_page(chrome, "appview-job")):
            seen_by_page.append(time.monotonic())
        time.sleep(0.05)
    assert seen_by_page, "appview-job never appeared running on carol's page"
    if seen_by_daemon:
        assert seen_by_page[0] - seen_by_daemon[0] <= LIVE_LIMIT_S


def test_the_rounds_page_of_a_failed_over_slot_shows_the_replacement_winner(
    formed: Commune, chrome: Any
) -> None:
    """A host of appview-web is powered off: on alice's page the slot's rounds show the
    replacement round (round >= 1) and the meshlet that won it."""
    alice = formed["alice"]
    view = wait_for(
        lambda: next(
            (w for w in alice.ctl_json("workloads", "--all") if w["name"] == "appview-web"), None
        ),
        30,
        "appview-web on alice's meshlet",
    )
    hosts = {r["slot"]: r["meshletDid"] for r in view["running"] if r.get("meshletDid")}
    victim_slot, victim = next(
        ((s, d) for s, d in sorted(hosts.items()) if d != alice.did), next(iter(hosts.items()))
    )
    victim_person = formed.by_did(victim).person
    if victim_person == "alice":
        pytest.skip("both replicas on alice's meshlet: no other host to power off")
    formed.power_off(victim_person)
    q = urllib.parse.quote(view["uri"], safe="")
    url = f"{alice.web_url}/rounds?uri={q}&slot={victim_slot}"

    def replaced() -> str | None:
        chrome.get(url)
        text = str(chrome.find_element("id", "main").text)
        m = re.search(rf"Slot #{victim_slot} won by (\S+)", text.split("(replacement)")[-1])
        return text if "(replacement)" in text and m and m.group(1) != short(victim) else None

    text = wait_for(replaced, 60, f"a replacement round for slot {victim_slot} on alice's page")
    assert re.search(rf"Round [1-9]\d* · slot #{victim_slot} \(replacement\)", text)
    assert "the first bid in the order wins slot s" in text
    chrome.save_screenshot(str(browser.screenshot_dir() / "appview-rounds-failover.png"))
    assert browser.console_errors(chrome) == []
