"""The dashboard in a real browser: Debian's Chromium driven by Playwright against ``callbridge serve``, with a
simulated caller on the line. Login, the live call on the list, its transcript growing on the call page without a
reload, markup said on the call shown as text, the recording playing and its waveform drawn, no console errors;
a forged cookie and a hang-up without its CSRF token refused.

A campaign's progress and outcomes on the campaigns page.

``CALLBRIDGE_SCREENSHOTS=docs/images`` saves screenshots of the pages there."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from callbridge.api.app import create_app
from callbridge.config import Settings
from callbridge.store.repository import Store
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, Dtmf, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from callbridge.testing.fake_twilio import Busy, Human, NoAnswer
from support import API_TOKEN, GREETING, Service, service, twilio_call, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MARKUP_REPLY = "<img src=x onerror=alert(1)> We open at nine."
MARKUP_CALLER = "<b>bold</b><script>alert(2)</script> when do you open?"
CHROMIUM = shutil.which("chromium")
WAIT_MS = 15_000


def behavior() -> FakeBehavior:
    return FakeBehavior(
        transcripts=[MARKUP_CALLER, "And on Sundays?"],
        reply=lambda text: MARKUP_REPLY if "open" in text else "Closed." if "Sundays" in text else "Noted.",
        greeting=GREETING,
        ms_per_char=30,
    )


def script() -> CallScript:
    first, second = Say(audio.tone(900, 330)), Say(audio.tone(700, 440))
    return CallScript([Pause(2500), first, Pause(3000), second, Pause(2500), Dtmf("5"), Pause(3000), HangUp()])


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "no Chromium: `make install-test` installs Debian's chromium package"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
        )
        yield launched
        await launched.close()


def watch_console(page: Page, errors: list[str]) -> None:
    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"{message.text} at {message.location.get('url')}")

    def on_error(error: Error) -> None:
        errors.append(str(error))

    page.on("console", on_console)
    page.on("pageerror", on_error)
    page.on("dialog", lambda dialog: errors.append(f"a dialog opened: {dialog.message}"))


async def screenshot(page: Page, name: str) -> None:
    directory = os.environ.get("CALLBRIDGE_SCREENSHOTS")
    if directory:
        await page.screenshot(path=str(Path(directory) / name), full_page=True)  # makes the directory


async def log_in(page: Page, running: Service, errors: list[str]) -> None:
    await page.goto(f"{running.base_url}/dashboard")
    await expect(page).to_have_url(f"{running.base_url}/dashboard/login")
    await page.fill("input[name=token]", "not-the-token")
    await page.click("button[type=submit]")
    await expect(page.locator(".error")).to_have_text("That is not the API token.")
    assert [error.endswith("/dashboard/login") and "401" in error for error in errors] == [True]  # the refusal
    errors.clear()
    await page.fill("input[name=token]", API_TOKEN)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{running.base_url}/dashboard")


async def test_the_dashboard_shows_a_call_live_then_its_recording(tmp_path: Path, browser: Browser) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    recordings = str(tmp_path / "recordings")
    async with service(tmp_path, behavior(), database, CALLBRIDGE_RECORDINGS_DIR=recordings) as (running, twilio):
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        watch_console(page, errors)
        await log_in(page, running, errors)
        csp = (await page.request.get(f"{running.base_url}/dashboard")).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp

        # The call starts while the list is open: its row appears without a reload.
        known = await twilio_call(twilio)  # a call (fake) Twilio can hang up
        placed = asyncio.create_task(running.caller().place_call(script(), max_duration_s=30, call_sid=known))
        row = page.locator("#live-calls tbody tr")
        await expect(row).to_have_count(1, timeout=WAIT_MS)
        call_sid = await row.get_attribute("data-call-sid")
        assert call_sid is not None and call_sid.startswith("CA")

        # The call page, while the call runs: the lines arrive as they are spoken; the markup is text.
        await row.locator("a").click()
        await expect(page).to_have_url(f"{running.base_url}/dashboard/calls/{call_sid}")
        await expect(page.locator("#hang-up button")).to_be_visible()
        await page.evaluate("() => { window.sameDocument = true; }")  # gone, were the page reloaded
        reply = page.locator("#transcript li.agent .text", has_text="We open at nine")
        await expect(reply).to_have_text(MARKUP_REPLY, timeout=WAIT_MS)
        await expect(page.locator("#transcript li.caller .text").first).to_have_text(MARKUP_CALLER)
        assert await page.locator("#transcript img, #transcript script, #transcript b").count() == 0
        assert await page.evaluate("() => window.sameDocument === true")

        # A hang-up without the session's CSRF token is refused, and the call goes on.
        cookies = {cookie["name"]: cookie["value"] for cookie in await context.cookies()}
        async with httpx.AsyncClient(base_url=running.base_url, cookies=cookies) as client:
            refused = await client.post(f"/dashboard/calls/{call_sid}/hangup")
            assert refused.status_code == 403, refused.text
            # The session reads the API (GET), never acts through it.
            assert (await client.get(f"/api/calls/{call_sid}")).status_code == 200
            assert (await client.post(f"/api/calls/{call_sid}/hangup")).status_code == 401
            # The history's filters and paging.
            today = datetime.now(UTC).date().isoformat()
            for filters, found in [
                ({"number": "+15550100001"}, True),
                ({"number": "+15550100009"}, False),
                ({"agent": "nobody"}, False),
                ({"status": "in-progress", "agent": "reception", "day": today}, True),
            ]:
                history = (await client.get("/dashboard", params=filters)).text.split('id="calls"')[1]
                assert (call_sid in history) == found, filters
            for path, params, status, said in [
                ("/dashboard", {"day": "yesterday"}, 400, "The date must be YYYY-MM-DD."),
                ("/dashboard", {"cursor": "not-a-cursor"}, 400, "That page of calls does not exist."),
                ("/dashboard/calls/CA" + "f" * 32, {}, 404, "No such call on record."),
            ]:
                answer = await client.get(path, params=params)
                assert (answer.status_code, answer.headers["content-type"]) == (status, "text/html; charset=utf-8")
                assert said in answer.text
        assert twilio.calls[call_sid].status == "in-progress"

        # With it (the button's form), Twilio is asked to end the call.
        await page.click("#hang-up button")
        await expect(page.locator("#call-end-reason")).to_have_text("hung_up_through_api")
        assert twilio.calls[call_sid].status == "completed"

        # The page reloaded while the call runs: the live stream's replay of the call adds nothing twice.
        key = page.locator("#timeline tr", has_text="dtmf")  # a key press, as it happens
        await expect(key).to_contain_text('"digit":"5"', timeout=WAIT_MS)
        await expect(page.locator("#transcript li", has_text="when do you open")).to_have_count(1)
        await expect(page.locator("#transcript li", has_text="We open at nine")).to_have_count(1)
        await expect(page.locator("#timeline tr.stream_started")).to_have_count(1)

        await asyncio.wait_for(placed, 30)
        await expect(page.locator("#call-end-reason")).not_to_have_text("\N{EN DASH}", timeout=WAIT_MS)
        await wait_until(lambda: running.logs("recording.saved"), 10, what="the recording saved")

        # Once it has ended: the recording plays from a clicked line, and its waveform is drawn.
        await page.reload()
        await expect(page.locator("#waveform")).to_have_attribute("data-drawn", "yes", timeout=WAIT_MS)
        drawn = await page.evaluate(
            """() => { const c = document.getElementById("waveform");
                       const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                       let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
        )
        assert drawn > 1000, drawn
        await page.locator("#transcript li.agent").nth(1).click()
        await page.wait_for_function(
            "() => { const a = document.getElementById('recording'); return !a.paused && a.currentTime > 0; }",
            timeout=WAIT_MS,
        )
        await screenshot(page, "dashboard-call.png")
        await expect(page.locator("#timeline tr.turn").first).to_contain_text(re.compile(r"latency \d+ ms"))  # kept
        await page.goto(f"{running.base_url}/dashboard")
        await expect(page.locator("#calls tbody tr", has_text=call_sid)).to_have_count(1)
        await expect(page.locator("#figure-latency")).to_have_text(re.compile(r"^\d+ / \d+ ms$"))
        await screenshot(page, "dashboard-calls.png")
        assert errors == []

        # The history a page at a time.
        store = await Store.open(database)
        for number in range(30):
            await store.record_call(call_sid=f"CA{number:032x}", direction="outbound", status="completed")
            await store.update_call(f"CA{number:032x}", ended_at=datetime.now(UTC), end_reason="no-answer")
        await store.close()
        await page.goto(f"{running.base_url}/dashboard")
        await expect(page.locator("#calls tbody tr")).to_have_count(25)
        await page.click("text=Older calls")
        await expect(page.locator("#calls tbody tr")).to_have_count(6)
        await expect(page.locator("#figure-calls")).to_have_text("31")
        await page.locator("#calls a").first.click()  # a call that was never recorded: said, with nothing to load
        await expect(page.locator("#recording-missing")).to_contain_text("the call was not recorded")
        await expect(page.locator("#waveform, #recording")).to_have_count(0)
        assert errors == []
        await page.click("header .logout button")
        await expect(page).to_have_url(f"{running.base_url}/dashboard/login")
        await page.goto(f"{running.base_url}/dashboard")
        await expect(page).to_have_url(f"{running.base_url}/dashboard/login")

        # A forged session cookie: a clear 401 that echoes nothing of it, and a line in the log.
        forged = "eyJjc3JmIjoiZm9yZ2VkIn0.forged.signature"
        async with httpx.AsyncClient(base_url=running.base_url, cookies={"callbridge_dashboard": forged}) as client:
            page_answer = await client.get("/dashboard")
            live_answer = await client.get(f"/api/calls/{call_sid}/recording")
        assert page_answer.status_code == 401 and forged not in page_answer.text
        assert "session is not valid" in page_answer.text
        assert live_answer.status_code == 401 and forged not in live_answer.text
        logged = await running.wait_for_logs("dashboard.bad_session", 2)
        assert len(logged) >= 2 and all(forged not in str(line) for line in logged)
        await context.close()


async def test_the_session_cookie_is_secure_behind_https(tmp_path: Path) -> None:
    settings = Settings(
        api_token=API_TOKEN,
        database_url=f"sqlite:///{tmp_path / 'calls.db'}",
        realtime_url="ws://127.0.0.1:9/v1/realtime",
        public_url="https://calls.example.com",
        _env_file=None,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app)
    base_url = "https://calls.example.com"
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http, app.router.lifespan_context(app):
        page = await http.get("/dashboard/login")
        refused = await http.post("/dashboard/login", data={"token": "wrong"})
        answer = await http.post("/dashboard/login", data={"token": API_TOKEN})
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    assert (answer.status_code, answer.headers["location"]) == (303, "/dashboard")
    cookie = answer.headers["set-cookie"].lower()
    assert cookie.startswith("callbridge_dashboard=")
    assert all(part in cookie for part in ("; httponly", "; secure", "; samesite=strict", "; path=/"))


async def test_the_campaigns_page_shows_progress_and_outcomes(tmp_path: Path, browser: Browser) -> None:
    people = [f"+1202555{n:04d}" for n in range(170, 176)]
    body = {
        "name": "Tuesday reminders",
        "agent": "reception",
        "from": "+12025550100",
        "calling_hours": "00:00-24:00",
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "machine_detection": False,
        "retry": {"max_attempts": 2, "backoff": ["1s"]},
        "contacts": [{"to": to, "name": f"Patient {n}", "timezone": "UTC"} for n, to in enumerate(people)],
    }
    async with service(tmp_path, behavior(), f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}") as (running, twilio):
        for to in people[:4]:
            twilio.script(to, Human(CallScript([Pause(1500), HangUp()]), ring_s=0.2))
        twilio.script(people[4], Busy(), Busy())
        twilio.script(people[5], NoAnswer(ring_s=0.2), Human(CallScript([Pause(1500), HangUp()]), ring_s=0.2))
        async with httpx.AsyncClient(
            base_url=running.base_url, headers={"Authorization": f"Bearer {API_TOKEN}"}
        ) as api:
            campaign_id = (await api.post("/api/campaigns", json=body)).json()["id"]
            await api.post(f"/api/campaigns/{campaign_id}/start")

            async def completed() -> bool:
                return bool((await api.get(f"/api/campaigns/{campaign_id}")).json()["status"] == "completed")

            for _ in range(300):
                if await completed():
                    break
                await asyncio.sleep(0.2)
        page = await browser.new_page(viewport={"width": 1100, "height": 700})
        errors: list[str] = []
        watch_console(page, errors)
        await log_in(page, running, errors)
        await page.click("text=Campaigns")
        row = page.locator(f"tr[data-campaign-id='{campaign_id}']")
        await expect(row).to_contain_text("Tuesday reminders", timeout=WAIT_MS)
        await expect(row).to_contain_text("completed")
        await expect(row).to_contain_text("6 / 6")
        await expect(row).to_contain_text("answered 5")
        await expect(row).to_contain_text("exhausted 1")
        await screenshot(page, "dashboard-campaigns.png")
        await row.locator("a").click()
        await expect(page.locator("#contacts tbody tr")).to_have_count(6)
        await expect(page.locator("#count-answered")).to_have_text("5")
        assert errors == []
