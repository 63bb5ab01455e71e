"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): cards and charts show, a filter
applies, a row opens its detail, the CSV downloads, hostile text stays text, the console stays clean and no request
leaves 127.0.0.1. Saves test-artifacts/dashboard.png. Fails (not skips) without Chromium when CI requires it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from proxy_app.state import state_of
from proxy_app.store import writes
from tests.conftest import ROOT, need
from tests.fake_ollama import serve
from tests.test_queries import XSS, known_calls

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
def browser():
    """A headless Chromium from the system; never a downloaded one."""
    need(Path(CHROMIUM).exists(), f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - requirements-dev.txt pins playwright
        need(False, f"the playwright package is missing: {exc}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def served(app):
    """Our app with known_calls() stored, on a real port."""
    writes.insert_calls(state_of(app).dashboard["db"], known_calls(datetime.now(UTC)))
    handle = serve(app, threads=8)
    yield handle
    handle.close()


def test_browser_dashboard_end_to_end(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    problems, hosts, dialogs = [], set(), []
    page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: hosts.add(urlsplit(request.url).hostname or request.url.split(":")[0]))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    page.goto(served.url + "/analytics?since=7d")
    assert page.locator("#cards .card").count() == 12
    assert page.locator('[data-card="calls"] .value').inner_text() == "7"
    assert page.locator('[data-card="cache_hit_ratio"] .value').inner_text() == "60.68 %"
    assert page.locator("#models-table th", has_text="Cold starts").count() == 1
    assert page.locator("#chart-residency svg").count() == 1  # no events stored: an empty timeline that says so
    assert page.locator("#charts svg").count() == 4 and page.locator("#chart-calls rect").count() >= 5
    assert page.locator("#chart-latency path").count() >= 1
    assert page.locator("#refresh-toggle").is_visible()  # the static script ran under the CSP
    xss_cell = page.locator("td.text", has_text="onerror")
    assert xss_cell.inner_text() == XSS and page.locator("img").count() == 0
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    page.fill('input[name="model"]', "llama3.2")
    page.click('button[type="submit"]')
    page.wait_for_url("**model=llama3.2**")
    assert page.locator('[data-card="calls"] .value').inner_text() == "3"
    assert page.locator("a.detail").count() == 3

    with page.expect_download() as waiting:
        page.click("#export")
    download = waiting.value
    saved = tmp_path / "export.csv"
    download.save_as(saved)
    lines = saved.read_text().splitlines()
    assert (
        lines[0].startswith("timestamp,request_id,")
        and len(lines) == 4
        and download.suggested_filename.endswith(".csv")
    )

    page.locator("a.detail").first.click()
    page.wait_for_url("**/analytics/calls/r1")
    assert page.locator("dt", has_text="response_preview").count() == 1 and "Hi there" in page.content()

    page.goto(served.url + "/analytics/calls/r3")
    assert page.locator("pre", has_text="onerror").first.inner_text() == XSS and page.locator("img").count() == 0

    context.close()
    assert problems == [] and dialogs == []
    assert hosts == {"127.0.0.1"}, hosts
