"""Calls on record, end to end: ``callbridge serve`` as a subprocess, fake Twilio REST, fake Realtime, a caller."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import websockets
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook
from twilio.request_validator import RequestValidator

from callbridge.api.rest import router
from callbridge.config import Settings
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.core.usage import TokenUsage
from callbridge.service.agents import load_agents
from callbridge.service.calls import CallServices
from callbridge.service.tools import ToolRegistry
from callbridge.store import Store
from callbridge.telephony import g711 as audio
from callbridge.telephony.params import StreamParameterSigner
from callbridge.telephony.rest import TwilioCalls
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from support import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    CALLBRIDGE,
    WEBHOOK_SECRET,
    Service,
    WebhookReceiver,
    api,
    database,
    free_port,
    no_live_call,
    place_outbound,
    receiving,
    service,
    stream_of,
    wait_closed,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def twilio_status(running: Service, call_sid: str, status: str) -> None:
    """Twilio's status callback, signed as Twilio signs it."""
    url = f"{running.base_url}/twilio/status"
    form = {"CallSid": call_sid, "CallStatus": status, "AccountSid": ACCOUNT_SID}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    async with httpx.AsyncClient() as client:
        response = await client.post(url, data=form, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 204


def seeded_texts(running: Service) -> list[str]:
    (session,) = running.fake.sessions
    return [
        json.dumps(event)
        for event in session.client_events
        if event["type"] in ("conversation.item.create", "response.create", "session.update")
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_outbound_call_with_resolved_context_on_record(kind: str, tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["Yes, I can make it."], reply=lambda _: "Wonderful, see you then.", ms_per_char=30
    )
    async with database(kind, tmp_path) as db, service(tmp_path, behavior, db) as (running, twilio):
        async with api(running) as client:
            assert (await client.get("/api/calls", headers={"Authorization": "Bearer wrong"})).status_code == 401
            call_sid, create = await place_outbound(client, twilio)

            # The right request reached (fake) Twilio: inline TwiML with the signed stream parameters.
            assert create.form["To"] == ["+15550100009"] and create.form["From"] == ["+15550100001"]
            assert create.form["StatusCallback"] == [f"{running.base_url}/twilio/status"]
            assert create.form["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
            twiml = create.form["Twiml"][0]
            stream_url, parameters = stream_of(twiml)
            assert stream_url == running.base_url.replace("http", "ws") + "/twilio/media-stream"

            # Twilio connects exactly the TwiML's stream, with its parameters.
            script = CallScript([Pause(2500), Say(audio.tone(800, 330)), Pause(2500), HangUp()])
            recording = await running.caller().place_call(script, twiml=twiml, call_sid=call_sid, max_duration_s=30)
            assert recording.parameters == parameters
            await wait_closed(running.fake.sessions)
            await twilio_status(running, call_sid, "completed")
            await running.wait_for_logs("call.summary", 1)

            # The resolved context reached the model: seeded items and a greeting by name.
            seeded = "\n".join(seeded_texts(running))
            assert (
                "You placed this call. You are speaking with Ada. Their phone number is +15550100009." in seeded
                and "Last visit: a cleaning in May." in seeded
            )
            assert "Hello Ada, this is Bright Dental" in seeded

            record = (await client.get(f"/api/calls/{call_sid}")).json()
            assert (record["direction"], record["status"], record["end_reason"]) == (
                "outbound",
                "completed",
                "caller_hung_up",
            )
            assert record["metrics"]["frames_in"] > 0
            assert record["usage"] is not None  # kept when the call ended, as the metrics are
            lines = (await client.get(f"/api/calls/{call_sid}/transcript")).json()["lines"]
            assert [line["speaker"] for line in lines] == ["agent", "caller", "agent"]
            assert lines[0]["text"].startswith("Hello Ada")
            text = (await client.get(f"/api/calls/{call_sid}/transcript?format=text")).text
            assert "caller: Yes, I can make it." in text
            listed = (await client.get("/api/calls", params={"number": "+15550100009"})).json()
            assert [call["call_sid"] for call in listed["calls"]] == [call_sid]

        cli = await asyncio.create_subprocess_exec(
            str(CALLBRIDGE),
            "transcript",
            call_sid,
            "--url",
            running.base_url,
            "--token",
            API_TOKEN,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await cli.communicate())[0].decode()
        assert cli.returncode == 0 and "Hello Ada" in output and "Yes, I can make it." in output, output


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_token_usage_on_record_and_in_the_post_call_webhook(kind: str, tmp_path: Path) -> None:
    """The tokens a call used are kept when it ends: ``GET /api/calls/{sid}`` and the webhook's call carry them."""
    async with database(kind, tmp_path) as db:
        settings = Settings(
            api_token=API_TOKEN,
            database_url=db,
            webhook_url="https://host.example/hooks/calls",
            webhook_secret=WEBHOOK_SECRET,
            _env_file=None,
        )
        store = await Store.open(db)
        signer = StreamParameterSigner("s" * 32, 600)
        services = CallServices(settings, store, signer, load_agents(settings, ToolRegistry(), None), None)
        app = FastAPI()
        app.include_router(router())
        app.state.services = services
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app),
            base_url="http://callbridge",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        try:
            call_sid = "CA" + "5" * 32
            await store.record_call(call_sid=call_sid, direction="inbound", status="in-progress")
            assert (await client.get(f"/api/calls/{call_sid}")).json()["usage"] is None  # not until the call ends

            session = CallSession(SessionConfig(agent=AgentConfig(), verify_parameters=signer.verify))
            session.call_sid, session.context, session.end_reason = call_sid, CallContext(), "caller_hung_up"
            session.usage = TokenUsage(
                input_text=300, input_audio=1200, input_cached=256, output_text=90, output_audio=2100, responses=4
            )
            await services.call_ended(session)

            record = (await client.get(f"/api/calls/{call_sid}")).json()
            assert record["end_reason"] == "caller_hung_up"
            assert record["usage"] == {
                "input_tokens": 1500,
                "output_tokens": 2190,
                "total_tokens": 3690,
                "input_text_tokens": 300,
                "input_audio_tokens": 1200,
                "input_cached_tokens": 256,
                "output_text_tokens": 90,
                "output_audio_tokens": 2100,
                "responses": 4,
            }
            (webhook,) = await store.due_webhooks(datetime.now(UTC))
            assert webhook.payload["call"]["usage"] == record["usage"]

            schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["CallRecord"]
            assert "usage" in schema["required"]
            assert schema["properties"]["usage"]["anyOf"] == [
                {"type": "object", "additionalProperties": {"type": "integer"}},
                {"type": "null"},
            ]
        finally:
            await client.aclose()
            await services.aclose()
            await store.close()


async def test_handing_a_live_call_to_the_agent(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=30)
    async with service(tmp_path, behavior, f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}") as (running, twilio):
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        call_sid = await rest.create(
            to="+15550100002", from_="+15550100008", twiml="<Response><Enqueue>q</Enqueue></Response>"
        )
        await rest.aclose()
        twilio.calls[call_sid].status = "in-progress"  # waiting in a queue
        async with api(running) as client:
            handed = await client.post(
                f"/api/calls/{call_sid}/agent", json={"context": {"name": "Grace"}, "say": "Connecting you now."}
            )
            assert handed.status_code == 200, handed.text
        (update,) = [r for r in twilio.requests if r.path.endswith(f"/Calls/{call_sid}.json") and r.method == "POST"]
        twiml = update.form["Twiml"][0]
        assert ET.fromstring(twiml).find("Say") is not None
        script = CallScript([Pause(1500), HangUp()])
        await running.caller().place_call(script, twiml=twiml, call_sid=call_sid, max_duration_s=30)
        await wait_closed(running.fake.sessions)
        assert "You are speaking with Grace" in "\n".join(seeded_texts(running))
        admitted = running.logs("call.admitted")
        assert [line["call_sid"] for line in admitted] == [call_sid]


@pytest.mark.parametrize(
    ("said", "tool", "end_reason"),
    [("That's all, bye.", "end_call", "agent_ended_call"), ("I want a human.", "transfer_call", "transferred")],
)
async def test_call_control_tools_through_twilio(said: str, tool: str, end_reason: str, tmp_path: Path) -> None:
    behavior = FakeBehavior(transcripts=[said], tool_cues={said: (tool, '{"reason": "asked"}')}, ms_per_char=20)
    async with service(tmp_path, behavior, f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}") as (running, twilio):
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        call_sid = await rest.create(to="+15550100002", from_="+15550100001", twiml="<Response/>")
        await rest.aclose()
        twilio.calls[call_sid].status = "in-progress"
        script = CallScript([Pause(2000), Say(audio.tone(700, 330)), Pause(8000)])
        # An incoming call: Twilio asks /twilio/voice, then connects the stream.
        recording = await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        assert recording.ended_by == "server"  # the agent ended the call, not the caller
        await running.wait_for_logs("call.summary", 1)
        async with api(running) as client:
            record = (await client.get(f"/api/calls/{call_sid}")).json()
        assert record["end_reason"] == end_reason
        # The goodbye was said (and heard) before the call ended.
        assert recording.received_audio_bytes > 0 and len(recording.heard_audio) == recording.received_audio_bytes
    (update,) = [r.form for r in twilio.requests if r.path.endswith(f"/Calls/{call_sid}.json")]
    if tool == "end_call":
        assert update == {"Status": ["completed"]}
    else:
        dial = ET.fromstring(update["Twiml"][0]).find("Dial")
        assert dial is not None and dial.text == "+15550109999"


async def test_post_call_webhook_is_signed_retried_and_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()
    behavior = FakeBehavior(transcripts=["Hello."], ms_per_char=20)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    # Waits of a second at most between attempts (a minute by default), drawn at random.
    hook = {
        "CALLBRIDGE_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks/calls",
        "CALLBRIDGE_WEBHOOK_BACKOFF_SECONDS": "0.5",
    }
    script = CallScript([Pause(1000), Say(audio.tone(600, 330)), Pause(2000), HangUp()])

    receiver = WebhookReceiver(failures=2)  # the host app is flaky: two 503s, then it accepts
    async with receiving(receiver, port), service(tmp_path, behavior, db, **hook) as (running, _):
        first = await running.caller().place_call(script, max_duration_s=30)
        await wait_until(lambda: receiver.accepted, 15, what="the webhook delivered")
    body, headers = receiver.accepted[0]
    payload = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert payload["call"]["call_sid"] == first.call_sid and payload["call"]["end_reason"] == "caller_hung_up"
    assert [line["speaker"] for line in payload["transcript"]] == ["agent", "caller", "agent"]
    assert len(receiver.attempts) == 3
    assert len(set(receiver.ids)) == 1  # the retries of one delivery carry its webhook-id

    # The receiver is down when the next call ends, and callbridge restarts before it comes back.
    async with service(tmp_path, behavior, db, **hook) as (running, _):
        second = await running.caller().place_call(script, max_duration_s=30)
        await running.wait_for_logs("webhook.failed", 1)
    later = WebhookReceiver()
    async with receiving(later, port), service(tmp_path, behavior, db, **hook):
        await wait_until(lambda: later.accepted, 15, what="the webhook delivered after the restart")
    assert json.loads(later.accepted[0][0])["call"]["call_sid"] == second.call_sid


async def test_key_presses_and_a_hanging_resolver(tmp_path: Path) -> None:
    from callbridge.testing.caller import Dtmf, SimulatedCaller

    behavior = FakeBehavior(ms_per_char=20)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    async with service(tmp_path, behavior, db, CALLBRIDGE_CONTEXT_TIMEOUT_SECONDS="0.5") as (running, _):
        caller = SimulatedCaller(running.base_url, AUTH_TOKEN, from_="+15550100666")
        script = CallScript([Pause(2500), Dtmf("7"), Pause(1500), HangUp()])
        recording = await caller.place_call(script, max_duration_s=30)
        await running.wait_for_logs("call.summary", 1)
        # The resolver never answered; after its deadline the agent greeted with its defaults.
        assert running.logs("context.resolve_failed")
        assert recording.heard_timeline and recording.heard_timeline[0][0] < 2.0
        # The key press reached the model as a conversation item, and the call's record as an event.
        (session,) = running.fake.sessions
        assert any("pressed the key 7" in json.dumps(event) for event in session.client_events)
        async with api(running) as client:
            events = (await client.get(f"/api/calls/{recording.call_sid}/events")).json()
        assert {"kind": "dtmf", "data": {"digit": "7"}} in [{"kind": e["kind"], "data": e["data"]} for e in events]


async def test_admission_control_turns_calls_away_past_the_limit(tmp_path: Path) -> None:
    from callbridge.testing.caller import CallRefused

    behavior = FakeBehavior(ms_per_char=20)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    async with service(tmp_path, behavior, db, CALLBRIDGE_MAX_CALLS="1") as (running, _):
        first = asyncio.create_task(running.caller().place_call(CallScript([Pause(4000), HangUp()]), max_duration_s=30))
        await running.wait_for_logs("call.admitted", 1)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{running.base_url}/readyz")).status_code == 503
        # A second caller hears the fallback: the webhook answers <Say> and <Hangup>, no stream.
        with pytest.raises(CallRefused) as refused:
            await running.caller().place_call(CallScript([Pause(500)]), max_duration_s=10)
        assert "<Hangup />" in refused.value.body and "<Connect>" not in refused.value.body
        # And a stream that connects anyway (a replayed upgrade) is refused before any Realtime connection.
        stream_url = running.base_url.replace("http://", "ws://") + "/twilio/media-stream"
        upgrade = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(stream_url, {})}
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(stream_url, additional_headers=upgrade)
        assert running.logs("admission.stream_refused")
        await first
        await no_live_call(running)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{running.base_url}/readyz")).status_code == 200
        async with api(running) as client:
            calls = (await client.get("/api/calls")).json()["calls"]
        assert sorted((call["end_reason"] or "") for call in calls) == ["caller_hung_up", "over_capacity"]
        assert len(running.fake.sessions) == 1
