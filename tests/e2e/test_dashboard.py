"""The web dashboard in headless Chromium against a real control plane (Postgres, Redis, HTTP
server, local worker agents): live progress, sign-in, feed resume, the Terminate button.

Chromium is Debian's (`/usr/bin/chromium`, installed by `.ci/run`), driven by Playwright; the
flags keep it off the network (no background connections, no QUIC).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from control_plane.api_keys import create_api_key
from tests.conftest import RunningControlPlane, eventually

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000
KEY_NAME = "cp.dashboard.apiKey"  # the page's sessionStorage entry (app.js)
"""Bound of every wait on the page."""
PNG = b"\x89PNG\r\n\x1a\n"
LOCAL = {"provider": "local", "instance_type": "local-gpu", "model": "org/dashboard-model"}

# Records, per instance row, each percentage its progress label shows (distinct, in order).
RECORD_PERCENTAGES = """() => {
  window.__percentages = {};
  const record = () => {
    for (const tr of document.querySelectorAll("#instances tr[data-instance-id]")) {
      const m = /^(\\d+) %$/.exec(tr.querySelector(".pct").textContent);
      if (!m) continue;
      const seen = (window.__percentages[tr.dataset.instanceId] ||= []);
      if (seen[seen.length - 1] !== Number(m[1])) seen.push(Number(m[1]));
    }
  };
  new MutationObserver(record).observe(document.getElementById("instances"),
                                       {subtree: true, childList: true, characterData: true});
  record();
}"""

# Records each state the live indicator goes through.
RECORD_LIVE_STATES = """() => {
  const live = document.getElementById("live");
  window.__liveStates = [live.dataset.state];
  new MutationObserver(() => window.__liveStates.push(live.dataset.state))
    .observe(live, {attributes: true, attributeFilter: ["data-state"]});
}"""


@pytest.fixture(scope="module")
async def browser() -> Any:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> Any:
    """A fresh browser context (its own session storage); fails the test on a script error or
    a Content-Security-Policy violation."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text else None)
    yield page
    await context.close()
    assert problems == []


async def sign_in(page: Page, cp: RunningControlPlane, key: str | None = None) -> None:
    await page.goto(f"{cp.url}/")
    await page.fill("#api-key", key or cp.admin_key)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await page.evaluate("window.__sameDocument = true")  # gone if the page reloads


async def create_instance(cp: RunningControlPlane) -> str:
    async with cp.client() as client:
        response = await client.post("/v1/instances", json=LOCAL)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def row(page: Page, instance_id: str):
    return page.locator(f'#instances tr[data-instance-id="{instance_id}"]')


async def test_pages_are_static_files_with_a_strict_policy(control_plane):
    async with control_plane.client(key=None) as anon:
        for path, kind in [("/", "text/html"), ("/dashboard/index.html", "text/html"),
                           ("/dashboard/app.js", "text/javascript"), ("/dashboard/app.css", "text/css")]:
            response = await anon.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(kind), path
            assert response.headers["cache-control"] == "no-cache"
            policy = response.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe" not in policy
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
            again = await anon.get(path, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        html = (await anon.get("/")).text
        assert "<script>" not in html and "style=" not in html and "http" not in html
        for path in ("/dashboard/secret.txt", "/dashboard/..%2Fapi%2Fapp.py", "/dashboard/",
                     "/dashboard/%2e%2e%2fsettings.py"):
            assert (await anon.get(path)).status_code == 404, path


async def test_a_new_instance_boots_live_on_the_page(settings, page, tmp_path):
    async with RunningControlPlane(dataclasses.replace(settings, local_boot_seconds=3)) as cp:
        await sign_in(page, cp)
        await expect(page.locator("#instances-empty")).to_be_visible()
        await page.evaluate(RECORD_PERCENTAGES)

        instance_id = await create_instance(cp)
        shown = row(page, instance_id)
        await expect(shown).to_be_visible()
        await expect(shown.locator(".bar")).to_be_visible()
        await expect(shown.locator(".badge")).to_have_text("ready", timeout=WAIT_MS)
        await expect(shown.locator(".pct")).to_have_text("100 %")
        await expect(shown.locator(".bar")).to_have_attribute("aria-valuenow", "100")
        assert await page.evaluate("window.__sameDocument") is True, "the page was reloaded"

        seen = await page.evaluate(f"window.__percentages[{instance_id!r}]")
        assert seen[-1] == 100, seen
        assert seen == sorted(set(seen)), f"progress went backwards or repeated: {seen}"
        assert len([p for p in seen if 0 < p < 100]) >= 3, f"too few intermediate values: {seen}"
        print("percentages shown:", seen)

        # The fleet summary follows status events.
        await expect(page.locator("[data-testid=fleet-active]")).to_have_text("1")
        await expect(page.locator('[data-testid=fleet-status] .chip[data-status="ready"]')).to_have_text("1 ready")
        await expect(page.locator('#fleet li[data-provider="local"]')).to_contain_text("ready")
        await expect(shown.locator(".load .queue")).to_contain_text("run ")
        await expect(shown.locator(".hb")).to_have_text(re.compile(r"^\d+ s ago$"))
        png = await page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
        assert png.startswith(PNG) and (tmp_path / "dashboard.png").stat().st_size > 1000

        # The instance page: status, agent, history, actions with durations, volumes.
        await shown.locator(".load").click()
        await expect(page).to_have_url(re.compile(f"#/instances/{instance_id}$"))
        view = page.locator("#instance-view")
        await expect(view.locator(".detail-head .badge")).to_have_text("ready")
        await expect(view.locator("table.history tbody tr")).to_have_count(3)
        await expect(view.locator("table.history tbody")).to_contain_text("booting_to_ready")
        await expect(view.locator("table.actions tbody")).to_contain_text("PROVIDER_CREATE")
        await expect(view.locator("table.actions tbody")).to_contain_text(re.compile(r"\d+(\.\d)? (ms|s)"))
        await expect(view.locator("table.volumes tbody tr").first).to_be_visible()
        await expect(view.locator("table.offers tbody")).to_contain_text("current")
        from worker_agent import AGENT_VERSION
        await expect(view.locator("[data-testid=agent]")).to_contain_text(AGENT_VERSION)
        png = await page.screenshot(path=tmp_path / "instance.png", full_page=True)
        assert png.startswith(PNG) and (tmp_path / "instance.png").stat().st_size > 1000

        await page.click("#instance-view a.back")
        await expect(shown).to_be_visible()
        async with cp.client() as client:
            await client.delete(f"/v1/instances/{instance_id}")
        await expect(shown.locator(".badge")).to_have_text("terminated", timeout=WAIT_MS)


async def test_a_wrong_key_is_refused_and_the_key_stays_in_this_tab(control_plane, page):
    cp = control_plane
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(f"{cp.url}/")
    await page.fill("#api-key", "cpk_not-a-key")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_be_visible()
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await expect(page.locator("#fleet-view")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0

    key = await create_api_key(cp.runtime.sessions, "browser", ["admin"])
    await sign_in(page, cp, key)
    await expect(page.locator("#login-error")).to_be_hidden()
    assert await page.evaluate("Object.values(sessionStorage)") == [key]
    assert await page.evaluate("localStorage.length") == 0
    assert await page.context.cookies() == []
    assert all(key not in url for url in [*urls, page.url])

    # Kept for this tab across a reload, and nowhere else.
    await page.reload()
    await expect(page.locator("#live")).to_have_attribute("data-state", "live")
    assert await page.evaluate("Object.values(sessionStorage)") == [key]
    assert await page.evaluate("localStorage.length") == 0

    # A key revoked meanwhile is refused: the page says so, forgets it and asks again.
    async with cp.runtime.sessions.begin() as session:
        from sqlalchemy import text
        await session.execute(text("UPDATE api_keys SET revoked_at = now() WHERE name = 'browser'"))
    # (Its next call finds out: the periodic refresh, within seconds, without a reload.)
    await expect(page.locator("#login-error")).to_contain_text("refused", timeout=WAIT_MS)
    await expect(page.locator("#api-key")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    assert all(key not in url for url in [*urls, page.url])

    # A refused key found in the session at load is dropped the same way.
    await page.evaluate(f"sessionStorage.setItem({KEY_NAME!r}, {key!r})")
    await page.reload()
    await expect(page.locator("#login-error")).to_contain_text("refused", timeout=WAIT_MS)
    assert await page.evaluate("sessionStorage.length") == 0


async def test_the_page_resumes_the_feed_after_the_server_cuts_it(control_plane, page, db):
    cp = control_plane
    resume_points: list[str | None] = []
    page.on("request", lambda request: resume_points.append(request.headers.get("last-event-id"))
            if "/v1/events" in request.url else None)
    await sign_in(page, cp)
    await page.evaluate(RECORD_LIVE_STATES)
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM events")
    instance_id = await create_instance(cp)
    shown = row(page, instance_id)
    await expect(shown.locator(".badge")).to_have_text("ready")
    assert resume_points == [None], "one connection so far, from the start"

    cp.runtime.hub.drop_streams()  # every SSE response ends, as on a network cut
    await eventually(lambda: _reconnected(resume_points), timeout=WAIT_MS / 1000,
                     message="the page reconnected")
    async with cp.client() as client:
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
    await expect(shown.locator(".badge")).to_have_text("terminated", timeout=WAIT_MS)
    assert await page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    assert "reconnecting" in await page.evaluate("window.__liveStates")
    # It reconnected once, resumed from an event id, and the terminate arrived live.
    assert len(resume_points) == 2 and int(resume_points[1]) > 0, resume_points

    # Nothing missed, nothing twice: the activity list holds exactly the stored events.
    async def same_events() -> bool:
        stored = [r["id"] for r in await db.fetch("SELECT id FROM events WHERE id > $1 ORDER BY id",
                                                  before)]
        shown_ids = await page.evaluate(
            "[...document.querySelectorAll('#activity li')].map(li => Number(li.dataset.eventId))")
        assert len(shown_ids) == len(set(shown_ids)), "an event was shown twice"
        return sorted(i for i in shown_ids if i > before) == stored
    await eventually(same_events, timeout=WAIT_MS / 1000, interval=0.2,
                     message="the page has every stored event")


async def _reconnected(resume_points: list[str | None]) -> bool:
    return len(resume_points) > 1


async def test_the_terminate_button_asks_first(control_plane, page):
    cp = control_plane
    deletes: list[str] = []
    page.on("request", lambda request: deletes.append(request.url)
            if request.method == "DELETE" else None)
    await sign_in(page, cp)
    instance_id = await create_instance(cp)
    shown = row(page, instance_id)
    button = shown.locator("button[data-action=terminate]")
    await expect(button).to_be_visible()

    questions: list[str] = []

    async def dismiss(dialog) -> None:
        questions.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog) -> None:
        questions.append(dialog.message)
        await dialog.accept()

    page.once("dialog", dismiss)
    await button.click()
    await page.evaluate("1")  # the click's handler has run to its end
    assert deletes == [] and len(questions) == 1

    page.once("dialog", accept)
    await button.click()
    await expect(page.locator("#notice")).to_contain_text(f"Termination of {instance_id[:8]} requested")
    await expect(shown.locator(".badge")).to_have_text("terminated", timeout=WAIT_MS)
    assert deletes == [f"{cp.url}/v1/instances/{instance_id}"]
    assert len(questions) == 2 and all(instance_id[:8] in q and "Terminate" in q for q in questions)
    async with cp.client() as client:
        shown_by_api = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert shown_by_api["status"] == "terminated"
