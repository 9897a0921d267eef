"""First contact with the real services, end to end: ``callbridge serve`` as a subprocess, over real sockets, against
fakes that do what OpenAI and Twilio do (their refusals and odd behaviours included)."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

from callbridge.telephony import g711 as audio
from callbridge.telephony.params import MAX_PARAMETER_CHARS, PARAMETER_NAME
from callbridge.testing.caller import CallScript, HangUp, Pause, Say, SayWhenHearing
from callbridge.testing.conformance import validate_client_event
from callbridge.testing.fake_realtime import FakeBehavior, FakeSession
from support import CALLBRIDGE, FALLBACK_SAY, GREETING, Service, api, redirects, service, stream_of, twilio_call

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

READY_TIMEOUT_S = 4.0


def database(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"


async def record_and_events(running: Service, call_sid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await running.wait_for_logs("call.summary", 1, seconds=10, call_sid=call_sid)
    async with api(running) as client:
        record = (await client.get(f"/api/calls/{call_sid}")).json()
        events = (await client.get(f"/api/calls/{call_sid}/events")).json()
    return record, events


def all_client_events_conform(sessions: list[FakeSession]) -> None:
    for session in sessions:
        for event in session.client_events:
            validate_client_event(event, session.dialect)


# --- a session is live only once the model confirmed it ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "behavior", "param"),
    [
        ({"CALLBRIDGE_AGENT_VOICE": "marine"}, FakeBehavior(), "session.audio.output.voice"),
        (
            {"CALLBRIDGE_TRANSCRIPTION_MODEL": "whisper-1"},
            FakeBehavior(retired_models=frozenset({"whisper-1"})),
            "session.audio.input.transcription.model",
        ),
    ],
    ids=["misspelt voice", "retired transcription model"],
)
async def test_a_rejected_session_update_hands_the_caller_to_the_fallback(
    env: dict[str, str], behavior: FakeBehavior, param: str, tmp_path: Path
) -> None:
    settings = {"CALLBRIDGE_REALTIME_READY_TIMEOUT_SECONDS": str(READY_TIMEOUT_S), **env}
    async with service(tmp_path, behavior, database(tmp_path), **settings) as (running, twilio):
        call_sid = await twilio_call(twilio)
        # The caller talks: the model, still on its defaults, would answer in PCM16 at 24 kHz.
        script = CallScript([Say(audio.tone(800, 440)), Pause(200), Say(audio.tone(800, 440)), Pause(20000)])
        started = time.monotonic()
        recording = await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        record, events = await record_and_events(running, call_sid)
    (session,) = running.fake.sessions
    (update,) = session.client_events_of("session.update")
    (error,) = session.errors
    assert error["error"]["event_id"] == update["event_id"] and error["error"]["param"] == param
    assert not session.server_events_of("session.updated")
    assert recording.received_audio_bytes == 0 and not recording.heard_audio  # no static, no agent audio at all
    assert not session.client_events_of("response.create")  # the greeting waited for a confirmation never given
    (fallback,) = redirects(twilio, call_sid)
    assert (fallback[0].tag, fallback[0].text) == ("Say", FALLBACK_SAY)
    assert recording.duration_s < READY_TIMEOUT_S + 2 and time.monotonic() - started < READY_TIMEOUT_S + 5
    assert record["end_reason"] == "realtime_session_rejected"
    (rejected,) = [event["data"] for event in events if event["kind"] == "realtime_session_rejected"]
    assert rejected["param"] == param and rejected["code"] and rejected["message"]
    all_client_events_conform(running.fake.sessions)


# --- errors a retry cannot fix -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_band", [True, False], ids=["error event (OpenAI)", "HTTP 401 (a gateway)"])
async def test_a_wrong_api_key_is_not_retried(in_band: bool, tmp_path: Path) -> None:
    behavior = FakeBehavior(api_key="sk-the-right-key", reject_api_key_in_band=in_band)
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        call_sid = await twilio_call(twilio)
        recording = await running.caller().place_call(CallScript([Pause(20000)]), call_sid=call_sid)
        record, events = await record_and_events(running, call_sid)
    assert recording.duration_s < 3 and not running.logs("realtime.retry")  # once, not four times
    assert len(running.fake.sessions) == (1 if in_band else 0)  # a refused handshake opens no session
    assert record["end_reason"] == "realtime_auth_failed"
    assert len(redirects(twilio, call_sid)) == 1
    (error,) = [event["data"] for event in events if event["kind"] == "error"]
    assert error["code"] in ("invalid_api_key", "http_401") and "sk-the-right-key" not in str(events)


async def test_beta_against_openai_is_refused_before_listening(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "CALLBRIDGE_REALTIME_DIALECT": "beta",
        "CALLBRIDGE_REALTIME_URL": "wss://api.openai.com/v1/realtime",
        "CALLBRIDGE_DATABASE_URL": database(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        str(CALLBRIDGE), "serve", "--port", "9", env=environment, stderr=asyncio.subprocess.PIPE, cwd=tmp_path
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"beta_api_shape_disabled" in stderr and b"CALLBRIDGE_REALTIME_DIALECT" in stderr
    assert b"Traceback" not in stderr and len(stderr.splitlines()) <= 2


async def test_a_server_that_refuses_the_beta_shape_ends_the_call_at_once(tmp_path: Path) -> None:
    behavior = FakeBehavior(accepts_beta=False)
    async with service(tmp_path, behavior, database(tmp_path), CALLBRIDGE_REALTIME_DIALECT="beta") as (
        running,
        twilio,
    ):
        call_sid = await twilio_call(twilio)
        await running.caller().place_call(CallScript([Pause(20000)]), call_sid=call_sid)
        record, _ = await record_and_events(running, call_sid)
    assert record["end_reason"] == "realtime_beta_refused"
    assert len(running.fake.sessions) == 1  # not retried


# --- responses: several items, failures, expiry ------------------------------------------------------------


async def test_barge_in_takes_back_every_unheard_item_of_a_long_reply(tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["Tell me everything.", "Stop."],
        reply=lambda heard: (
            "First sentence of the answer. Second sentence of the answer. Third one. Fourth one is here."
            if "everything" in heard
            else "Okay."
        ),
        greeting="Hi.",
        split_reply_items=True,
        ms_per_char=40,
        delta_ms=20,
        speed=4.0,  # the model runs ahead of playback, as the real one does
    )
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        call_sid = await twilio_call(twilio)
        script = CallScript(
            [
                Pause(2500),  # the greeting (1.5 s) plays out
                Say(audio.tone(700, 440)),
                SayWhenHearing(audio.tone(700, 440), after_heard_ms=1700),  # into the answer's second sentence
                Pause(3000),
                HangUp(),
            ]
        )
        recording = await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        _, events = await record_and_events(running, call_sid)
        async with api(running) as client:
            lines = (await client.get(f"/api/calls/{call_sid}/transcript")).json()["lines"]
    (session,) = running.fake.sessions
    (answer,) = [e for e in session.server_events_of("response.done") if len(e["response"]["output"]) > 1]
    items = [item["id"] for item in answer["response"]["output"]]
    truncated = [t["item_id"] for t in session.truncations]
    deleted = [e["item_id"] for e in session.client_events_of("conversation.item.delete")]
    assert len(truncated) == 1 and truncated[0] in items
    cut = items.index(truncated[0])
    assert cut >= 1 and deleted == items[cut + 1 :]  # every item after the one playing goes, none is left whole
    assert not session.errors
    barge_in = [event["data"] for event in events if event["kind"] == "barge_in"]
    assert barge_in and barge_in[-1]["item_id"] == truncated[0]
    agent_lines = {line["item_id"]: line for line in lines if line["speaker"] == "agent"}
    assert all(item not in agent_lines for item in deleted)  # absent: the caller heard none of it
    assert agent_lines[truncated[0]]["interrupted"]
    assert all(not agent_lines[item]["interrupted"] for item in items[:cut])
    # Agent audio reached Twilio in chunks of 40 ms, never the model's 20 ms deltas one by one.
    assert recording.received_audio_bytes and recording.clears
    all_client_events_conform(running.fake.sessions)


async def test_failed_and_incomplete_responses(tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["What are your hours?"],
        reply=lambda _: "We open at eight. We close at six.",
        greeting=GREETING,
        fail_responses=frozenset({1}),  # the greeting fails once: retried
        incomplete_responses=frozenset({3}),  # the answer stops halfway
        ms_per_char=20,
    )
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        call_sid = await twilio_call(twilio)
        script = CallScript([Pause(2500), Say(audio.tone(700, 440)), Pause(3000), HangUp()])
        recording = await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        record, events = await record_and_events(running, call_sid)
    (session,) = running.fake.sessions
    statuses = [e["response"]["status"] for e in session.server_events_of("response.done")]
    assert statuses[:3] == ["failed", "completed", "incomplete"]
    creates = session.client_events_of("response.create")
    assert len(creates) == 2 and creates[0]["response"] == creates[1]["response"]  # the greeting, tried again
    assert recording.heard_audio  # the caller heard the greeting after all
    kinds = [event["kind"] for event in events]
    assert kinds.count("response_failed") == 1 and kinds.count("response_incomplete") == 1
    (incomplete,) = [e["data"] for e in events if e["kind"] == "response_incomplete"]
    assert incomplete["status_details"]["reason"] == "max_output_tokens"
    assert record["end_reason"] == "caller_hung_up"
    usage = record["usage"]
    assert usage["responses"] == 3 and usage["output_audio_tokens"] > 0 and usage["input_tokens"] > 0


async def test_an_expired_session_goes_on_in_a_new_one(tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["What are your hours?"],
        reply=lambda _: "We open at eight.",
        greeting=GREETING,
        session_expires_after_s=3.0,
        ms_per_char=20,
    )
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        call_sid = await twilio_call(twilio)
        script = CallScript([Pause(4500), Say(audio.tone(700, 440)), Pause(2500), HangUp()])
        recording = await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        record, events = await record_and_events(running, call_sid)
    first, second = running.fake.sessions[:2]
    assert [e["error"]["code"] for e in first.errors] == ["session_expired"]
    replayed = [e["item"]["content"][0]["text"] for e in second.client_events_of("conversation.item.create")]
    assert GREETING in replayed  # the new session knows the conversation
    assert not second.client_events_of("response.create")  # no second greeting: the conversation goes on
    assert second.server_events_of("response.done")  # and answered the caller
    assert record["end_reason"] == "caller_hung_up" and recording.ended_by == "caller"
    kinds = [event["kind"] for event in events]
    reasons = [e["data"]["reason"] for e in events if e["kind"] == "realtime_rollover"]
    assert "error" not in kinds and reasons and set(reasons) == {"expired"}  # every session expires in the fake
    assert running.logs("realtime.session_expired")[0]["level"] == "info"


# --- what Twilio carries ------------------------------------------------------------------------------------


async def test_the_stream_parameter_is_a_short_reference_whatever_the_context(tmp_path: Path) -> None:
    context = {
        "reference": "r" * 200,
        "name": "Grace",
        "instructions": "i" * 1500,
        "greeting": "Hello Grace, this is the reminder line.",
        "items": [["user", "t" * 2000]] * 10,
        "metadata": {f"k{n}": "v" * 1000 for n in range(20)},
    }
    behavior = FakeBehavior(ms_per_char=10)
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        async with api(running) as client:
            created = await client.post(
                "/api/calls", json={"to": "+15550100077", "from": "+15550100001", "context": context}
            )
            assert created.status_code == 201, created.text
        call_sid = created.json()["call_sid"]
        (request,) = [r for r in twilio.requests if r.path.endswith("/Calls.json")]
        twiml = request.form["Twiml"][0]
        _, parameters = stream_of(twiml)
        assert len(parameters[PARAMETER_NAME]) <= MAX_PARAMETER_CHARS and "Grace" not in twiml
        twilio.calls[call_sid].status = "in-progress"
        script = CallScript([Pause(2000), HangUp()])
        await running.caller().place_call(script, twiml=twiml, call_sid=call_sid, max_duration_s=20)
        await record_and_events(running, call_sid)
    (session,) = running.fake.sessions
    (update,) = session.client_events_of("session.update")
    assert update["session"]["instructions"] == "i" * 1500  # loaded from the record
    texts = [str(e["item"]) for e in session.client_events_of("conversation.item.create")]
    assert any("Grace" in text for text in texts)
    (greeting,) = session.client_events_of("response.create")
    assert "Hello Grace, this is the reminder line." in greeting["response"]["instructions"]


async def test_agent_audio_reaches_twilio_in_steady_chunks(tmp_path: Path) -> None:
    behavior = FakeBehavior(greeting="A greeting long enough to be heard in several chunks.", delta_ms=20, speed=0)
    async with service(tmp_path, behavior, database(tmp_path)) as (running, twilio):
        call_sid = await twilio_call(twilio)
        sizes: list[int] = []

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "received" and data.get("event") == "media":
                sizes.append(len(base64.b64decode(data["media"]["payload"])))

        script = CallScript([Pause(4000), HangUp()])
        await running.caller().place_call(script, call_sid=call_sid, max_duration_s=20, on_event=on_event)
    # The model runs ahead of playback: its 20 ms deltas reach Twilio joined, 40 ms each (but the first two, sent
    # at once while Twilio had nothing queued, and the last).
    assert len(sizes) > 20 and max(sizes) == 320 and sizes.count(320) >= len(sizes) - 3


# --- what callers expect of a real phone agent --------------------------------------------------------------------

SLOW_TOOLS = '''
import asyncio

from callbridge.service.tools import ToolRegistry

tools = ToolRegistry()


@tools.tool
async def check_order(order_id: int) -> dict[str, object]:
    """Look up an order.

    Args:
        order_id: the order number
    """
    await asyncio.sleep(2.5)
    return {"order_id": order_id, "status": "shipped"}
'''


async def test_a_slow_tool_gets_one_filler_then_its_answer(tmp_path: Path) -> None:
    (tmp_path / "slow_tools.py").write_text(SLOW_TOOLS)
    behavior = FakeBehavior(
        transcripts=["Where is my order?"],
        tool_cues={"order": ("check_order", '{"order_id": 42}')},
        greeting=GREETING,
        ms_per_char=20,
    )
    env = {"CALLBRIDGE_TOOLS": "slow_tools:tools", "CALLBRIDGE_TOOL_FILLER_AFTER_MS": "1000"}
    async with service(tmp_path, behavior, database(tmp_path), **env) as (running, twilio):
        call_sid = await twilio_call(twilio)
        script = CallScript([Pause(1500), Say(audio.tone(700, 440)), Pause(6000), HangUp()])
        await running.caller().place_call(script, call_sid=call_sid, max_duration_s=30)
        _, events = await record_and_events(running, call_sid)
    (session,) = running.fake.sessions
    said = [e["transcript"] for e in session.server_events_of("response.output_audio_transcript.done")]
    assert said[1:] == ["One moment while I check.", 'Here is what I found: {"order_id":42,"status":"shipped"}']
    (tool_call,) = [event["data"] for event in events if event["kind"] == "tool_call"]
    assert tool_call["ok"] and "shipped" in tool_call["output"]
    assert not session.errors


async def test_an_idle_caller_is_re_prompted_then_hung_up_on(tmp_path: Path) -> None:
    behavior = FakeBehavior(greeting=GREETING, idle_prompt="Are you still there?", ms_per_char=20)
    env = {"CALLBRIDGE_IDLE_TIMEOUT_MS": "5000", "CALLBRIDGE_IDLE_HANGUP_AFTER": "1"}
    async with service(tmp_path, behavior, database(tmp_path), **env) as (running, twilio):
        call_sid = await twilio_call(twilio)
        recording = await running.caller().place_call(CallScript([Pause(30000)]), call_sid=call_sid)
        record, events = await record_and_events(running, call_sid)
    (session,) = running.fake.sessions
    (update,) = session.client_events_of("session.update")
    assert update["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
    assert len(session.server_events_of("input_audio_buffer.timeout_triggered")) == 2
    said = [e["transcript"] for e in session.server_events_of("response.output_audio_transcript.done")]
    assert said[:2] == [GREETING, "Are you still there?"] and "goodbye" in said[-1].lower()
    assert [e["response_id"] for e in session.client_events_of("response.cancel")]  # the 2nd re-prompt, replaced
    assert record["end_reason"] == "caller_idle" and recording.ended_by == "server" and recording.duration_s < 20
    assert [event["data"]["re_prompts"] for event in events if event["kind"] == "caller_idle"] == [1, 2]
    assert twilio.calls[call_sid].status in ("completed", "canceled")  # hung up through Twilio
