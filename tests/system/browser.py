"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, for the
appview's browser tests: no driver or browser download, console and network logs on."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 900)
PHONE = (390, 844)


def screenshot_dir() -> Path:
    """Where a test run writes its screenshots (`MESHLET_SCREENSHOTS`, else build/)."""
    d = Path(os.environ.get("MESHLET_SCREENSHOTS", ROOT / "build" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


@contextmanager
def chromium(size: tuple[int, int] = DESKTOP) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--window-size={size[0]},{size[1]}",
    ):
        opts.add_argument(arg)
    # Without this capability get_log("browser") is always empty.
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """Console messages at level SEVERE since the last call (a failed load shows here too)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def failed_requests(driver: Any) -> list[str]:
    """Requests since the last call that failed or were answered >= 400 (performance log)."""
    bad = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg.get("method") == "Network.loadingFailed" and not params.get("canceled"):
            bad.append(f"failed: {params.get('errorText')} ({params.get('type')})")
        elif msg.get("method") == "Network.responseReceived":
            resp = params.get("response", {})
            if int(resp.get("status", 0)) >= 400:
                bad.append(f"{resp.get('status')} {resp.get('url')}")
    return bad
