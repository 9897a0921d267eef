"""Campaigns end to end: ``callbridge serve`` dials a list through the fake Twilio, whose numbers answer as people,
answering machines, nobody, or a busy line, with a fake model for the agent.

The campaign of 30: 10 people talk to the agent; 8 machines get the voicemail, whole, and are not called again;
6 numbers ring out once and are answered the second time; 3 busy lines are tried until ``max_attempts`` and end
``exhausted``; 2 numbers on the do-not-call list are never dialed; 1 person's calling window is still closed when
the campaign starts (the campaigns' clock is set a few seconds before it opens). Once with the service running
throughout, once with it killed (SIGKILL) at a random moment and started again.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from callbridge.telephony.g711 import tone
from callbridge.testing import FakeBehavior
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_twilio import Busy, FakeCall, FakeTwilio, Human, Machine, NoAnswer, Outcome
from support import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    WEBHOOK_SECRET,
    Service,
    WebhookReceiver,
    cli,
    database,
    free_port,
    receiving,
    serve,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FROM = "+12025550100"
VOICEMAIL = "Hi {name}, this is Bright Dental about your appointment tomorrow at {time}. Please call us back."
AGENTS = f"""
default_agent = "reminders"

[agents.reminders]
greeting = "Hello, this is Bright Dental calling about your appointment."
machine_detection = true
voicemail_message = "{VOICEMAIL}"
"""
CLOCK = "2026-12-07T13:59:52Z"  # a Monday: 13:59 in London (open), 08:59 in New York (opens in 8 s)
MS_PER_CHAR = 25
MAX_CONCURRENT = 6
CALLS_PER_SECOND = 3
CONVERSATION = CallScript([Pause(1500), Say(tone(400)), Pause(1000), HangUp()])


def number(n: int) -> str:
    return f"+1202555{n:04d}"


# Who is behind each number, by kind: (how many, what each successive call to them meets).
KINDS: dict[str, tuple[int, list[Outcome]]] = {
    "window_closed": (1, [Human(CONVERSATION, ring_s=0.5)] * 3),  # first: the dialer's first step meets it
    "person": (10, [Human(CONVERSATION, ring_s=0.5)] * 3),
    "machine": (8, [Machine(greeting=1000, ring_s=0.5)] * 3),
    "ring_out_once": (6, [NoAnswer(ring_s=0.5), *[Human(CONVERSATION, ring_s=0.5)] * 3]),
    "busy": (3, [Busy()] * 4),
    "do_not_call": (2, [Human(CONVERSATION)] * 3),
}
EXPECTED = {"answered": 17, "voicemail_left": 8, "exhausted": 3, "dnc": 2}


def contacts() -> dict[str, str]:
    """Number → kind, numbered in the order of :data:`KINDS`."""
    kinds, n = {}, 101
    for kind, (count, _) in KINDS.items():
        for _ in range(count):
            kinds[number(n)] = kind
            n += 1
    return kinds


def csv_of(kinds: dict[str, str]) -> str:
    rows = ["to,name,timezone,time"]
    for index, (to, kind) in enumerate(kinds.items()):
        zone = "America/New_York" if kind == "window_closed" else "Europe/London"
        rows.append(f"{to},Person {index},{zone},{9 + index % 8} am")
    return "\n".join(rows) + "\n"


@asynccontextmanager
async def campaign_service(
    tmp_path: Path, twilio: FakeTwilio, db: str, port: str, **env: str
) -> AsyncIterator[Service]:
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "agents.toml").write_text(AGENTS)
    async with serve(
        tmp_path,
        FakeBehavior(ms_per_char=MS_PER_CHAR),
        port=port,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_API_BASE_URL=twilio.base_url,
        CALLBRIDGE_API_TOKEN=API_TOKEN,
        CALLBRIDGE_DATABASE_URL=db,
        CALLBRIDGE_AGENTS_FILE=str(tmp_path / "agents.toml"),
        CALLBRIDGE_DEV_CAMPAIGN_CLOCK=CLOCK,
        **env,
    ) as running:
        yield running


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)


async def create_campaign(base_url: str, kinds: dict[str, str]) -> str:
    body = {
        "name": "reminders",
        "agent": "reminders",
        "from": FROM,
        "calling_hours": "09:00-20:00",
        "max_concurrent": MAX_CONCURRENT,
        "calls_per_second": CALLS_PER_SECOND,
        "retry": {"max_attempts": 3, "backoff": ["2s"]},
    }
    async with client(base_url) as api:
        created = await api.post("/api/campaigns", json=body)
        assert created.status_code == 201, created.text
        campaign_id: str = created.json()["id"]
        added = await api.post(
            f"/api/campaigns/{campaign_id}/contacts",
            content=csv_of(kinds).encode(),
            headers={"Content-Type": "text/csv"},
        )
        assert added.json() == {"added": 30}
        for to, kind in kinds.items():
            if kind == "do_not_call":
                assert (await api.post("/api/dnc", json={"number": to, "reason": "asked"})).status_code == 201
        started = await api.post(f"/api/campaigns/{campaign_id}/start")
        assert started.json()["status"] == "running"
    return campaign_id


async def summary(base_url: str, campaign_id: str) -> dict[str, Any]:
    async with client(base_url) as api:
        body: dict[str, Any] = (await api.get(f"/api/campaigns/{campaign_id}")).json()
    return body


async def until_completed(base_url: str, campaign_id: str, seconds: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = await summary(base_url, campaign_id)
        if body["status"] == "completed":
            return body
        await asyncio.sleep(0.5)
    raise AssertionError(f"the campaign did not complete: {await summary(base_url, campaign_id)}")


async def all_contacts(base_url: str, campaign_id: str) -> list[dict[str, Any]]:
    async with client(base_url) as api:
        page = (await api.get(f"/api/campaigns/{campaign_id}/contacts", params={"limit": 1000})).json()
    contacts: list[dict[str, Any]] = page["contacts"]
    return contacts


def calls_to(twilio: FakeTwilio, to: str) -> list[FakeCall]:
    return sorted((call for call in twilio.calls.values() if call.to == to), key=lambda call: call.attempt)


def check_the_line(twilio: FakeTwilio, kinds: dict[str, str], contacts: list[dict[str, Any]]) -> None:
    """What the fake Twilio saw: pacing, concurrency, one call per attempt, whole voicemails."""
    times = sorted(twilio.create_times)
    crowded = [t for i, t in enumerate(times) if i >= CALLS_PER_SECOND and t - times[i - CALLS_PER_SECOND] < 1.0]
    assert crowded == [], "more creates in one second than calls_per_second"
    assert twilio.peak_live <= MAX_CONCURRENT
    assert not [r for r in twilio.requests if r.status == 429], "Twilio never had to throttle the dialer"
    by_number = {contact["to"]: contact for contact in contacts}
    for to, kind in kinds.items():
        made = calls_to(twilio, to)
        attempts = by_number[to]["attempts"]
        # Every call Twilio created is an attempt of the contact's, and each attempt has exactly one call.
        assert sorted(call.sid for call in made) == sorted(attempt["call_sid"] for attempt in attempts), to
        assert [attempt["number"] for attempt in attempts] == list(range(1, len(attempts) + 1)), to
        if kind == "do_not_call":
            assert made == []
        if kind == "busy":
            assert [call.status for call in made] == ["busy"] * 3
        if kind == "machine":
            left = [call for call in made if call.voicemail is not None and call.answered_by == "machine_end_beep"]
            whole = [call for call in left if call.voicemail is not None and call.voicemail.message_ms > 0]
            assert whole, to
            last = whole[-1]
            assert last.voicemail is not None and last.ended_by == "rest"  # callbridge hung up after the message
            name = f"Person {list(kinds).index(to)}"
            spoken_ms = len(message_for(name, list(kinds).index(to))) * MS_PER_CHAR
            assert last.voicemail.heard_during_greeting_ms == 0  # nothing was said over the greeting
            assert abs(last.voicemail.message_ms - spoken_ms) <= 200, (last.voicemail.message_ms, spoken_ms)


def message_for(name: str, index: int) -> str:
    return VOICEMAIL.format(name=name, time=f"{9 + index % 8} am")


def outcomes(kinds: dict[str, str]) -> dict[str, list[Outcome]]:
    return {to: list(KINDS[kind][1]) for to, kind in kinds.items()}


async def test_a_campaign_of_thirty_reaches_everyone_it_may(tmp_path: Path) -> None:
    kinds = contacts()
    port = str(free_port())
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, creates_per_second=CALLS_PER_SECOND, outcomes=outcomes(kinds)) as twilio,
        campaign_service(tmp_path, twilio, db, port) as running,
    ):
        campaign_id = await create_campaign(running.base_url, kinds)
        (window,) = [to for to, kind in kinds.items() if kind == "window_closed"]

        waiting: dict[str, Any] = {}
        for _ in range(100):  # the dialer's first steps see its window closed: it waits for it to open
            found = await all_contacts(running.base_url, campaign_id)
            waiting = next(contact for contact in found if contact["to"] == window)
            if waiting["status"] == "scheduled":
                break
            await asyncio.sleep(0.1)
        assert waiting["status"] == "scheduled" and waiting["next_attempt_at"].startswith("2026-12-07T14:00:00")
        assert calls_to(twilio, window) == []
        body = await until_completed(running.base_url, campaign_id)
        found = await all_contacts(running.base_url, campaign_id)
    assert {status: count for status, count in body["counts"].items() if count} == EXPECTED
    check_the_line(twilio, kinds, found)
    statuses = Counter((kinds[contact["to"]], contact["status"]) for contact in found)
    assert statuses == Counter(
        {
            ("person", "answered"): 10,
            ("machine", "voicemail_left"): 8,
            ("ring_out_once", "answered"): 6,
            ("busy", "exhausted"): 3,
            ("do_not_call", "dnc"): 2,
            ("window_closed", "answered"): 1,
        }
    )
    # Without the kill, nobody was called more often than their script asked.
    assert sorted(len(calls_to(twilio, to)) for to in kinds) == sorted(
        {"person": 1, "machine": 1, "ring_out_once": 2, "busy": 3, "do_not_call": 0, "window_closed": 1}[kind]
        for kind in kinds.values()
    )


async def test_a_campaign_survives_a_kill_at_any_moment(tmp_path: Path) -> None:
    kinds = contacts()
    port = str(free_port())
    kill_after = random.uniform(3.0, 15.0)
    print(f"SIGKILL {kill_after:.1f} s after the start")
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, creates_per_second=CALLS_PER_SECOND, outcomes=outcomes(kinds)) as twilio,
    ):
        async with campaign_service(tmp_path, twilio, db, port) as first:
            campaign_id = await create_campaign(first.base_url, kinds)
            await asyncio.sleep(kill_after)
            first.process.kill()
            await first.process.wait()
        async with campaign_service(tmp_path, twilio, db, port) as second:
            body = await until_completed(second.base_url, campaign_id)
            found = await all_contacts(second.base_url, campaign_id)
    assert {status: count for status, count in body["counts"].items() if count} == EXPECTED
    check_the_line(twilio, kinds, found)


async def test_bad_imports_are_refused_whole_with_every_row_and_field_named(tmp_path: Path) -> None:
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        campaign_service(tmp_path, twilio, db, str(free_port())) as running,
        client(running.base_url) as api,
    ):
        base = {"name": "c", "agent": "reminders", "from": FROM}
        unknown = await api.post("/api/campaigns", json={**base, "agent": "ghost"})
        assert unknown.status_code == 422
        assert unknown.json()["problems"] == [{"row": "", "field": "agent", "message": "unknown"}]
        window = await api.post("/api/campaigns", json={**base, "calling_hours": "25:00-09:00"})
        assert window.status_code == 422
        (issue,) = window.json()["detail"]
        assert issue["loc"] == ["body", "calling_hours"] and "00:00 to 24:00" in issue["msg"]
        created = await api.post("/api/campaigns", json=base)
        campaign_id = created.json()["id"]
        csv = (
            "to,name,time\n"
            "+12025550101,Ada,10 am\n"
            "12345,Bo,11 am\n"  # line 3: not a number
            "+1 202 555 0101,Cy,noon\n"  # line 4: Ada's number again
            "+12025550104,Di,\n"  # line 5: no {time} for the voicemail
        )
        refused = await api.post(
            f"/api/campaigns/{campaign_id}/contacts", content=csv, headers={"Content-Type": "text/csv"}
        )
        assert refused.status_code == 422
        named = [(problem["row"], problem["field"]) for problem in refused.json()["problems"]]
        assert named == [("line 3", "to"), ("line 4", "to"), ("line 5", "time")]
        assert (await summary(running.base_url, campaign_id))["total"] == 0  # nothing half-imported
        contacts = [{"to": "+12025550101", "name": "Ada", "metadata": {"time": "10 am"}}, {"to": "+12025550102"}]
        missing = await api.post("/api/campaigns", json={**base, "contacts": contacts})
        assert missing.status_code == 422
        assert [(p["row"], p["field"]) for p in missing.json()["problems"]] == [
            ("contacts[1]", "name"),
            ("contacts[1]", "time"),
        ]
        assert len((await api.get("/api/campaigns")).json()) == 1  # only the empty draft above


async def test_one_dialer_runs_on_postgresql_and_another_takes_over_when_it_dies(tmp_path: Path) -> None:
    async with (
        database("postgresql", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        campaign_service(tmp_path / "one", twilio, db, str(free_port())) as one,
        campaign_service(tmp_path / "two", twilio, db, str(free_port())) as two,
    ):
        await asyncio.sleep(2)  # several steps of each
        leaders = [service for service in (one, two) if service.logs("dialer.leading")]
        assert len(leaders) == 1
        (leader,) = leaders
        (other,) = [service for service in (one, two) if service is not leader]
        leader.process.kill()
        await leader.process.wait()
        took_over = await other.wait_for_logs("dialer.leading", 1, seconds=30)
        assert took_over, "the other process did not take the dialer over within 30 s"
        # It dials: a campaign started now is served by the process that is left.
        twilio.script("+12025550101", Human(CONVERSATION, ring_s=0.2))
        async with client(other.base_url) as api:
            body = {"name": "c", "agent": "reminders", "from": FROM, "machine_detection": False}
            body["contacts"] = [{"to": "+12025550101", "timezone": "Europe/London", "name": "Ada"}]
            campaign_id = (await api.post("/api/campaigns", json=body)).json()["id"]
            await api.post(f"/api/campaigns/{campaign_id}/start")
        done = await until_completed(other.base_url, campaign_id, seconds=60)
        assert done["counts"]["answered"] == 1


async def test_the_agent_is_silent_until_the_verdict_then_greets_a_person(tmp_path: Path) -> None:
    to = "+12025550150"
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        campaign_service(tmp_path, twilio, db, str(free_port())) as running,
        client(running.base_url) as api,
    ):
        body: dict[str, Any] = {"to": to, "from": FROM, "agent": "reminders", "machine_detection": True}
        missing = await api.post("/api/calls", json=body)  # the voicemail needs {name} and {time}
        assert missing.status_code == 422 and "{name}, {time}" in missing.json()["detail"]
        assert twilio.calls == {}  # refused before anything was dialed
        twilio.script(to, Human(CallScript([Pause(6000), HangUp()]), ring_s=0.3, amd_after_s=2.5))
        body["context"] = {"name": "Ada", "metadata": {"time": "10 am"}}
        created = await api.post("/api/calls", json=body)
        assert created.status_code == 201, created.text
        call = await twilio.ended(created.json()["call_sid"])
        record = (await api.get(f"/api/calls/{call.sid}")).json()
        events = (await api.get(f"/api/calls/{call.sid}/events")).json()
    assert call.one("MachineDetection") == "DetectMessageEnd" and call.one("AsyncAmd") == "true"
    assert record["answered_by"] == "human"
    (amd,) = [event["data"] for event in events if event["kind"] == "amd"]
    assert amd["answered_by"] == "human" and amd["acted"] is True
    (session,) = running.fake.sessions
    kinds = [event["type"] for event in session.client_events if event["type"] in ("session.update", "response.create")]
    assert kinds[:3] == ["session.update", "session.update", "response.create"]  # listen, verdict, greeting
    first, second = session.client_events_of("session.update")[:2]
    assert first["session"]["audio"]["input"]["turn_detection"]["create_response"] is False
    assert "create_response" not in second["session"]["audio"]["input"]["turn_detection"]
    # What the callee heard started only once Twilio had decided (the verdict's time is counted from the answer,
    # the stream's from just after it).
    verdict_s = int(call.amd_callbacks[0].params["MachineDetectionDuration"]) / 1000
    assert call.recording is not None and call.recording.heard_timeline
    first_heard_s = call.recording.heard_timeline[0][0]
    print(f"greeting heard {first_heard_s - verdict_s:.2f} s after the verdict")
    assert first_heard_s >= verdict_s - 0.5


async def test_the_cli_runs_a_campaign_the_dashboard_shows_it_and_the_host_app_hears_it_end(tmp_path: Path) -> None:
    receiver, hook_port = WebhookReceiver(), free_port()
    numbers = ["+12025550161", "+12025550162"]
    (tmp_path / "contacts.csv").write_text(
        "to,name,timezone,time\n" + "".join(f"{n},Ada,Europe/London,9 am\n" for n in numbers)
    )
    (tmp_path / "bad.csv").write_text("to,name,time\nnot a number,Bo,9 am\n")
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, outcomes={n: Human(CONVERSATION, ring_s=0.2) for n in numbers}) as twilio,
        receiving(receiver, hook_port),
        campaign_service(
            tmp_path,
            twilio,
            db,
            str(free_port()),
            CALLBRIDGE_WEBHOOK_URL=f"http://127.0.0.1:{hook_port}/hooks",
            CALLBRIDGE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        ) as running,
    ):
        refused = await cli(
            running, "campaign", "create", str(tmp_path / "bad.csv"), "--agent", "reminders", "--from", FROM, status=4
        )
        assert "line 2: to:" in refused and "nothing imported" in refused
        created = await cli(
            running,
            "campaign",
            "create",
            str(tmp_path / "contacts.csv"),
            "--agent",
            "reminders",
            "--from",
            FROM,
            "--hours",
            "08:00-21:00",
            "--max-concurrent",
            "1",
        )
        campaign_id = created.split()[0]
        assert created.startswith(f"{campaign_id} running: 2 contacts")
        await until_completed(running.base_url, campaign_id, seconds=60)
        status = await cli(running, "campaign", "status", campaign_id)
        assert "completed" in status and "2/2 done" in status and "answered" in status
        assert "409" in await cli(running, "campaign", "pause", campaign_id, status=4)  # completed: nothing to pause
        async with httpx.AsyncClient(base_url=running.base_url) as browser:
            await browser.post("/dashboard/login", data={"token": API_TOKEN})
            page = (await browser.get("/dashboard/campaigns")).text
        await wait_until(lambda: receiver.accepted, 15, what="the campaign.completed webhook")
        async with client(running.base_url) as api:
            listed = (await api.get("/api/campaigns")).json()
    # The refused file left no draft to start by mistake: its campaign is cancelled, with nobody in it.
    assert sorted((item["status"], item["total"]) for item in listed) == [("cancelled", 0), ("completed", 2)]
    assert f'href="/dashboard/campaigns/{campaign_id}">contacts</a>' in page  # named after the file
    assert "2 / 2" in page and "answered 2" in page
    body, headers = receiver.accepted[-1]
    event = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert event["event"] == "campaign.completed" and event["campaign"]["id"] == campaign_id
    assert event["counts"]["answered"] == 2


async def test_the_agent_puts_a_person_who_asks_on_the_do_not_call_list(tmp_path: Path) -> None:
    to = "+12025550180"
    agents = AGENTS.replace('voicemail_message = "', 'tools = ["do_not_call", "end_call"]\nvoicemail_message = "')
    behavior = FakeBehavior(
        transcripts=["Please stop calling me."],
        tool_cues={"stop calling": ("do_not_call", '{"reason": "asked to stop"}')},
        ms_per_char=MS_PER_CHAR,
    )
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "dnc-agents.toml").write_text(agents)
    async with (
        database("sqlite", tmp_path) as db,
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        serve(
            tmp_path,
            behavior,
            TWILIO_ACCOUNT_SID=ACCOUNT_SID,
            TWILIO_API_BASE_URL=twilio.base_url,
            CALLBRIDGE_API_TOKEN=API_TOKEN,
            CALLBRIDGE_DATABASE_URL=db,
            CALLBRIDGE_AGENTS_FILE=str(tmp_path / "dnc-agents.toml"),
        ) as running,
        client(running.base_url) as api,
    ):
        twilio.script(to, Human(CallScript([Pause(2500), Say(tone(800)), Pause(4000), HangUp()]), ring_s=0.2))
        body = {"to": to, "from": FROM, "agent": "reminders", "machine_detection": False}
        created = await api.post("/api/calls", json=body)
        assert created.status_code == 201, created.text
        call_sid = created.json()["call_sid"]
        await twilio.ended(call_sid)
        listed = (await api.get("/api/dnc")).json()
        events = (await api.get(f"/api/calls/{call_sid}/events")).json()
    assert [(entry["number"], entry["source"], entry["call_sid"]) for entry in listed] == [(to, "agent", call_sid)]
    assert listed[0]["reason"] == "asked to stop"
    assert [event["data"]["number"] for event in events if event["kind"] == "do_not_call"] == [to]
