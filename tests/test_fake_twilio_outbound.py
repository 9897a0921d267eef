"""FakeTwilio plays outbound calls out by itself: status and AMD callbacks, the stream, the voicemail, REST control.

The fake is driven with callbridge's REST client (the official client where it must send AMD parameters callbridge
does not send yet) against a receiver in the test: a small app that verifies every callback's signature, and a
minimal agent on the stream. The receiver's URLs name a public address; the fake reaches it through ``service_url``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from callbridge.telephony.g711 import BYTES_PER_MS, tone
from callbridge.telephony.rest import TwilioCalls, TwilioRestException
from callbridge.testing import Busy, Failed, FakeTwilio, Human, Machine, NoAnswer
from callbridge.testing.caller import CallScript, HangUp, Pause, Say, SayWhenHearing
from callbridge.testing.fake_realtime import FakeBehavior
from callbridge.testing.fake_twilio import FakeCall, Outcome
from support import api, service, wait_until

pytestmark = [pytest.mark.e2e]

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "fake-twilio-outbound-token"
PUBLIC = "https://callbridge.example.com"
STREAM_URL = "wss://callbridge.example.com/stream"
TWIML = (
    f'<Response><Connect><Stream url="{STREAM_URL}"><Parameter name="ref" value="r-1"/></Stream></Connect></Response>'
)
FROM = "+15550100001"
EVENTS = ["initiated", "ringing", "answered", "completed"]

Then = Literal["hang_up", "close", "nothing"]


@dataclass
class Agent:
    """What the minimal agent on the stream does: say ``say_ms`` of audio (at start, or once the AMD callback says
    the machine's greeting ended), then, once the caller echoed the mark after it, ``then``."""

    say_ms: int = 0
    say_on: Literal["start", "beep"] = "start"
    then: Then = "nothing"


@dataclass
class Receiver:
    """The service's side: status and AMD callbacks (signatures checked) and the media stream."""

    agent: Agent = field(default_factory=Agent)
    twilio_url: str = ""
    callbacks: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    """``(path, params)`` of every callback with a valid signature, in arrival order."""
    bad_signatures: list[str] = field(default_factory=list)
    streams: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per call SID, every message its stream sent the agent."""
    started: dict[str, asyncio.Event] = field(default_factory=dict)
    beeps: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, events: dict[str, asyncio.Event], call_sid: str) -> asyncio.Event:
        return events.setdefault(call_sid, asyncio.Event())

    def app(self) -> FastAPI:
        app = FastAPI()
        validator = RequestValidator(AUTH_TOKEN)

        async def callback(request: Request) -> Response:
            params = {key: str(value) for key, value in (await request.form()).items()}
            url = PUBLIC + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            signed = params  # a GET is signed over its URL with the parameters in the query string
            if request.method == "GET":
                params, signed = dict(request.query_params), {}
            if not validator.validate(url, signed, request.headers.get("x-twilio-signature", "")):
                self.bad_signatures.append(request.url.path)
                return Response(status_code=403)
            self.callbacks.append((request.url.path, params))
            if params.get("AnsweredBy", "").startswith("machine_end") and request.url.path == "/amd":
                self.event(self.beeps, params["CallSid"]).set()
            return Response(status_code=204)

        app.add_api_route("/status", callback, methods=["POST", "GET"])
        app.add_api_route("/amd", callback, methods=["POST"])
        app.add_api_websocket_route("/stream", self.stream)
        return app

    async def stream(self, ws: WebSocket) -> None:
        if not RequestValidator(AUTH_TOKEN).validate(STREAM_URL, {}, ws.headers.get("x-twilio-signature", "")):
            self.bad_signatures.append("/stream")
            await ws.close(1008)
            return
        await ws.accept()
        messages: list[dict[str, Any]] = []
        speaking: asyncio.Task[None] | None = None
        try:
            while True:
                message = json.loads(await ws.receive_text())
                messages.append(message)
                if message["event"] == "start":
                    call_sid, stream_sid = message["start"]["callSid"], message["streamSid"]
                    self.streams[call_sid] = messages
                    self.event(self.started, call_sid).set()
                    speaking = asyncio.create_task(self.say(ws, call_sid, stream_sid))
                elif message["event"] == "mark" and message["mark"]["name"] == "said":
                    if self.agent.then == "close":
                        await ws.close(1000)
                        return
                    if self.agent.then == "hang_up":
                        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=self.twilio_url)
                        await rest.hang_up(call_sid)
                        await rest.aclose()
                elif message["event"] == "stop":
                    return
        except WebSocketDisconnect:
            return
        finally:
            if speaking is not None:
                speaking.cancel()

    async def say(self, ws: WebSocket, call_sid: str, stream_sid: str) -> None:
        if not self.agent.say_ms:
            return
        if self.agent.say_on == "beep":
            await self.event(self.beeps, call_sid).wait()
        payload = base64.b64encode(tone(self.agent.say_ms, 300)).decode()
        await ws.send_text(json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}))
        await ws.send_text(json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": "said"}}))

    def of(self, path: str, call_sid: str) -> list[dict[str, str]]:
        return [params for p, params in self.callbacks if p == path and params["CallSid"] == call_sid]


@contextlib.asynccontextmanager
async def receiving(agent: Agent | None = None, **fake: Any) -> AsyncIterator[tuple[Receiver, FakeTwilio]]:
    """The receiver under uvicorn on a free port, and a FakeTwilio that reaches it through ``service_url``."""
    receiver = Receiver(agent or Agent())
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(receiver.app(), log_level="warning", access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        service_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, service_url=service_url, **fake) as twilio:
            receiver.twilio_url = twilio.base_url
            yield receiver, twilio
    finally:
        server.should_exit = True
        await task


async def place(
    twilio: FakeTwilio,
    to: str,
    *,
    events: list[str] | None = EVENTS,
    amd: str | None = None,
    twiml: str = TWIML,
    **extra: Any,
) -> str:
    """Create a call with the stream TwiML and a status callback; with AMD, asynchronous, through the official
    client (callbridge's does not send those parameters)."""
    if amd is None and not extra:
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        try:
            return await rest.create(
                to=to, from_=FROM, twiml=twiml, status_callback=f"{PUBLIC}/status", status_callback_event=events
            )
        finally:
            await rest.aclose()
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=AsyncTwilioHttpClient())
    client.api.base_url = twilio.base_url
    client.edge = client.region = None
    amd_params: dict[str, Any] = (
        {}
        if amd is None
        else {"machine_detection": amd, "async_amd": "true", "async_amd_status_callback": f"{PUBLIC}/amd"}
    )
    try:
        call = await client.calls.create_async(
            to=to,
            from_=FROM,
            twiml=twiml,
            status_callback=f"{PUBLIC}/status",
            status_callback_event=events,
            **amd_params,
            **extra,
        )
    finally:
        await client.http_client.close()
    sid: str = call.sid
    return sid


def call_statuses(call: FakeCall) -> list[str]:
    return [callback.params["CallStatus"] for callback in call.status_callbacks]


def assert_status_callbacks_well_formed(receiver: Receiver, call: FakeCall) -> None:
    """Every status callback reached the receiver, validly signed, in order, as Twilio forms them."""
    assert receiver.bad_signatures == []
    assert [c.status_code for c in call.callbacks] == [204] * len(call.callbacks)
    received = receiver.of("/status", call.sid)
    assert received == [c.params for c in call.status_callbacks]
    assert [params["SequenceNumber"] for params in received] == [str(n) for n in range(len(received))]
    for params in received:
        assert (params["AccountSid"], params["From"], params["To"]) == (ACCOUNT_SID, FROM, call.to)
        assert (params["Direction"], params["ApiVersion"]) == ("outbound-api", "2010-04-01")
        assert params["Timestamp"].endswith("+0000")
    assert ["CallDuration" in params for params in received] == [False] * (len(received) - 1) + [True]


async def test_human_answers_and_hangs_up() -> None:
    script = CallScript([SayWhenHearing(tone(400), after_heard_ms=200), Pause(300), HangUp()])
    async with receiving(Agent(say_ms=200)) as (receiver, twilio):
        twilio.script("+15550100010", Human(script, ring_s=0.2))
        sid = await place(twilio, "+15550100010")
        call = await twilio.ended(sid)
        async with httpx.AsyncClient(base_url=twilio.base_url, auth=(ACCOUNT_SID, AUTH_TOKEN)) as http:
            resource = (await http.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json")).json()

    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]
    assert_status_callbacks_well_formed(receiver, call)
    assert call.statuses == ["queued", "initiated", "ringing", "in-progress", "completed"]
    assert (call.ended_by, call.answered_by, call.amd_callbacks, call.attempt) == ("callee", None, [], 1)
    assert (resource["status"], resource["answered_by"]) == ("completed", None)
    assert resource["start_time"] is not None and resource["end_time"] is not None
    # The stream was the TwiML's, carrying the caller's script, and the caller heard the agent.
    assert call.recording is not None and call.recording.ended_by == "caller"
    assert call.recording.parameters == {"ref": "r-1"}
    assert len(call.recording.heard_audio) == 200 * BYTES_PER_MS
    messages = receiver.streams[sid]
    assert [m["event"] for m in messages][:2] == ["connected", "start"] and messages[-1]["event"] == "stop"
    assert messages[1]["start"]["customParameters"] == {"ref": "r-1"}


@pytest.mark.parametrize(
    ("outcome", "events", "expected"),
    [
        (NoAnswer(ring_s=0.2), EVENTS, ["initiated", "ringing", "no-answer"]),
        (NoAnswer(), EVENTS, ["initiated", "ringing", "no-answer"]),  # rings out at the create's Timeout
        (Human(CallScript([HangUp()]), ring_s=5), EVENTS, ["initiated", "ringing", "no-answer"]),
        (Busy(), EVENTS, ["initiated", "busy"]),
        (Failed(), EVENTS, ["initiated", "failed"]),
        (NoAnswer(ring_s=0.2), None, ["no-answer"]),  # no events asked for: only the final one
        (Busy(), ["ringing"], ["busy"]),  # ringing asked for, but a busy line never rings
    ],
)
async def test_unanswered_outcomes(outcome: Outcome, events: list[str] | None, expected: list[str]) -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100011", outcome)
        sid = await place(twilio, "+15550100011", events=events, timeout=1)
        call = await twilio.ended(sid)
    assert call_statuses(call) == expected
    assert_status_callbacks_well_formed(receiver, call)
    assert call.status == expected[-1] and call.statuses[-1] == expected[-1]
    assert call.status_callbacks[-1].params["CallDuration"] == "0"
    assert call.recording is None and call.start_time is None and call.ended_by is None
    assert receiver.streams == {}


async def test_outcomes_per_number_one_per_call_then_unscripted() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100012", NoAnswer(ring_s=0.1), Human(CallScript([Pause(200), HangUp()]), ring_s=0.1))
        first = await twilio.ended(await place(twilio, "+15550100012"))
        second = await twilio.ended(await place(twilio, "+15550100012"))
        third = twilio.calls[await place(twilio, "+15550100012")]
        await asyncio.sleep(0.3)  # long enough for a scripted call to have moved on; this one must not
    assert (first.attempt, second.attempt, third.attempt) == (1, 2, 3)
    assert isinstance(first.outcome, NoAnswer) and isinstance(second.outcome, Human) and third.outcome is None
    assert call_statuses(first) == ["initiated", "ringing", "no-answer"]
    assert call_statuses(second) == ["initiated", "ringing", "in-progress", "completed"]
    assert (third.status, third.callbacks) == ("queued", [])
    assert list(receiver.streams) == [second.sid]


async def test_amd_says_human_shortly_after_answer() -> None:
    script = CallScript([Pause(1500), HangUp()])
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100013", Human(script, ring_s=0.1, amd_after_s=0.3))
        sid = await place(twilio, "+15550100013", amd="DetectMessageEnd")
        call = await twilio.ended(sid)
    (amd,) = receiver.of("/amd", sid)
    assert set(amd) == {"CallSid", "AccountSid", "AnsweredBy", "MachineDetectionDuration"}
    assert (amd["AccountSid"], amd["AnsweredBy"]) == (ACCOUNT_SID, "human")
    assert int(amd["MachineDetectionDuration"]) >= 300
    # The verdict came while the call was live: before the final status callback, which carries it.
    assert [c.kind for c in call.callbacks] == ["status", "status", "status", "amd", "status"]
    assert call.status_callbacks[-1].params["AnsweredBy"] == "human"
    assert "AnsweredBy" not in call.status_callbacks[2].params  # answered before the verdict
    assert call.answered_by == "human"
    assert_status_callbacks_well_formed(receiver, call)


@pytest.mark.parametrize(
    ("detection", "verdicts", "expected"),
    [
        ("DetectMessageEnd", None, ["machine_end_beep"]),
        ("Enable", None, ["machine_start"]),
        ("DetectMessageEnd", ("machine_start", "machine_end_beep"), ["machine_start", "machine_end_beep"]),
    ],
)
async def test_voicemail_records_what_the_agent_said_after_the_beep(
    detection: str, verdicts: tuple[str, ...] | None, expected: list[str]
) -> None:
    agent = Agent(say_ms=600, say_on="beep" if expected[-1] == "machine_end_beep" else "start", then="hang_up")
    async with receiving(agent) as (receiver, twilio):
        twilio.script("+15550100014", Machine(greeting=800, verdicts=verdicts, ring_s=0.1, start_after_s=0.2))
        sid = await place(twilio, "+15550100014", amd=detection)
        call = await twilio.ended(sid)
    amd = receiver.of("/amd", sid)
    assert [params["AnsweredBy"] for params in amd] == expected
    durations = [int(params["MachineDetectionDuration"]) for params in amd]
    assert durations == sorted(durations)
    if expected[-1] == "machine_end_beep":
        assert durations[-1] >= 800  # not before the greeting ended
    assert call.answered_by == expected[-1] and call.status_callbacks[-1].params["AnsweredBy"] == expected[-1]
    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]
    assert_status_callbacks_well_formed(receiver, call)
    voicemail = call.voicemail
    assert voicemail is not None and voicemail.greeting_ms == 800
    assert call.ended_by == "rest" and voicemail.recording.ended_by == "twilio"
    heard = len(voicemail.recording.heard_audio) // BYTES_PER_MS
    assert heard == 600  # the agent's words, each played before the mark after them came back
    # The hang-up came once what the agent said had played (in the voicemail's own time: 20 ms a frame).
    if agent.say_on == "beep":
        assert (voicemail.message_ms, voicemail.heard_during_greeting_ms) == (600, 0)
        assert voicemail.message_audio == tone(600, 300)
        assert voicemail.hung_up_after_greeting_s >= 0.6
    else:  # spoken over the greeting (hung up on machine_start): lost to the message
        assert voicemail.heard_during_greeting_ms > 0
        assert voicemail.message_ms == 600 - voicemail.heard_during_greeting_ms
        assert voicemail.hung_up_at_s >= 0.6


async def test_voicemail_hangs_up_after_its_longest_message() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100015", Machine(greeting=400, ring_s=0.1, max_message_s=0.5))
        sid = await place(twilio, "+15550100015")  # no AMD asked for: no AMD callback, no verdict
        call = await twilio.ended(sid)
    assert call.voicemail is not None and call.voicemail.message_ms == 0
    assert call.ended_by == "callee" and call.voicemail.recording.ended_by == "caller"
    assert call.voicemail.hung_up_after_greeting_s >= 0.5
    assert (call.amd_callbacks, call.answered_by, receiver.of("/amd", sid)) == ([], None, [])
    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]


@pytest.mark.parametrize(
    ("how", "ended_by", "line_ended_by"),
    [
        ("hang_up", "rest", "twilio"),
        ("close", "stream", "server"),
        ("say", "redirect", "twilio"),
        ("dial", "rest", "twilio"),
    ],
)
async def test_the_service_ends_the_call(how: str, ended_by: str, line_ended_by: str) -> None:
    script = CallScript([Pause(60000)])  # stays on the line
    agent = Agent(say_ms=100, then="close" if how == "close" else "nothing")
    async with receiving(agent) as (receiver, twilio):
        twilio.script("+15550100016", Human(script, ring_s=0.1))
        sid = await place(twilio, "+15550100016")
        await asyncio.wait_for(receiver.event(receiver.started, sid).wait(), 10)
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        try:
            if how == "hang_up":
                await rest.hang_up(sid)
            elif how == "say":
                await rest.redirect(sid, "<Response><Say>Goodbye.</Say><Hangup/></Response>")
            elif how == "dial":
                await rest.redirect(sid, "<Response><Dial>+15550109999</Dial></Response>")
                # The stream ends, the call goes on with the person it was handed to, until it is hung up.
                await wait_until(lambda: twilio.calls[sid].recording is not None, what="the stream's end")
                assert twilio.calls[sid].status == "in-progress" and twilio.calls[sid].recording is not None
                await rest.hang_up(sid)
        finally:
            await rest.aclose()
        call = await twilio.ended(sid)
    assert call.recording is not None and call.recording.ended_by == line_ended_by
    assert (call.ended_by, call.status) == (ended_by, "completed")
    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]
    assert_status_callbacks_well_formed(receiver, call)
    if line_ended_by == "twilio":  # Twilio ended the stream: stop, as for any end of the line
        assert receiver.streams[sid][-1]["event"] == "stop"


async def test_hang_up_while_ringing_cancels() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100017", Human(CallScript([HangUp()]), ring_s=30))
        sid = await place(twilio, "+15550100017")
        await wait_until(lambda: twilio.calls[sid].status == "ringing", what="ringing")
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        await rest.hang_up(sid)
        await rest.aclose()
        call = await twilio.ended(sid)
    assert call_statuses(call) == ["initiated", "ringing", "canceled"]
    assert call.recording is None and receiver.streams == {}


async def test_creates_beyond_the_rate_answer_429_and_create_nothing() -> None:
    async with receiving(creates_per_second=2) as (_, twilio):
        results = await asyncio.gather(*(place(twilio, f"+1555010002{n}") for n in range(5)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, TwilioRestException)]
        created = [r for r in results if isinstance(r, str)]
        # Later, once a second has passed since the creates accepted, there is room again.
        await asyncio.sleep(max(0.0, twilio.create_times[-1] + 1.0 - time.monotonic()) + 0.05)
        later = await place(twilio, "+15550100029")
    assert all(isinstance(r, str | TwilioRestException) for r in results)
    assert refused and all((r.status, r.code) == (429, 20429) and r.msg.endswith("Too Many Requests") for r in refused)
    assert sorted(twilio.calls) == sorted([*created, later])
    times = twilio.create_times
    assert all(sum(0 <= t - start < 1.0 for t in times) <= 2 for start in times)  # never more than 2 in a second
    answers = [r.status for r in twilio.requests]
    assert answers.count(429) == len(refused) and answers.count(201) == len(created) + 1


async def test_peak_of_calls_live_at_once() -> None:
    stay = CallScript([Pause(60000)])
    async with receiving() as (_, twilio):
        for n in range(3):
            twilio.script(f"+1555010003{n}", Human(stay, ring_s=0.1))
        twilio.script("+15550100039", Human(CallScript([Pause(100), HangUp()]), ring_s=0.1))
        sids = [await place(twilio, f"+1555010003{n}") for n in range(3)]
        await wait_until(lambda: all(twilio.calls[sid].status == "in-progress" for sid in sids), what="3 answered")
        assert twilio.live == 3
        rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
        for sid in sids:
            await rest.hang_up(sid)
        await rest.aclose()
        for sid in sids:
            await twilio.ended(sid)
        assert twilio.live == 0
        await twilio.ended(await place(twilio, "+15550100039"))  # alone: the peak stays
    assert twilio.peak_live == 3
    assert [twilio.calls[sid].ended_by for sid in sids] == ["rest"] * 3


async def test_status_callbacks_by_get() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100040", NoAnswer(ring_s=0.1))
        sid = await place(twilio, "+15550100040", status_callback_method="GET")
        call = await twilio.ended(sid)
    assert [c.method for c in call.callbacks] == ["GET"] * 3
    assert call_statuses(call) == ["initiated", "ringing", "no-answer"]
    assert_status_callbacks_well_formed(receiver, call)


async def test_synchronous_amd_starts_the_twiml_after_the_verdict() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100041", Machine(greeting=600, ring_s=0.1, max_message_s=0.3))
        sid = await place(twilio, "+15550100041", machine_detection="DetectMessageEnd")  # no AsyncAmd
        call = await twilio.ended(sid)
    assert receiver.of("/amd", sid) == [] and call.amd_callbacks == []
    assert (
        call.answered_by == "machine_end_beep" and call.status_callbacks[-1].params["AnsweredBy"] == "machine_end_beep"
    )
    assert call.voicemail is not None and call.voicemail.greeting_ms == 0  # over before the stream connected
    assert call.ended_by == "callee"


async def test_time_limit_ends_the_call() -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100042", Human(CallScript([Pause(60000)]), ring_s=0.1))
        sid = await place(twilio, "+15550100042", time_limit=1)
        call = await twilio.ended(sid)
    assert call.recording is not None and call.recording.ended_by == "timeout"
    assert (call.ended_by, call.status) == ("time_limit", "completed")
    assert receiver.streams[sid][-1]["event"] == "stop"


@pytest.mark.parametrize(
    ("twiml", "stream_error"),
    [
        ("<Response><Say>Your appointment is tomorrow.</Say><Hangup/></Response>", False),
        ('<Response><Connect><Stream url="wss://callbridge.example.com/nowhere"/></Connect></Response>', True),
    ],
)
async def test_twiml_without_a_stream_that_opens_runs_out(twiml: str, stream_error: bool) -> None:
    async with receiving() as (receiver, twilio):
        twilio.script("+15550100044", Human(CallScript([Pause(60000)]), ring_s=0.1))
        sid = await place(twilio, "+15550100044", twiml=twiml)
        call = await twilio.ended(sid)
    assert (call.recording, call.ended_by, call.status) == (None, "twiml", "completed")
    assert (call.stream_error is not None) == stream_error and receiver.streams == {}
    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]


@pytest.mark.slow
async def test_callbridge_serve_places_a_call_the_fake_plays_out(tmp_path: Path) -> None:
    behavior = FakeBehavior(transcripts=["Yes, I can make it."], reply=lambda _: "See you then.", ms_per_char=30)
    script = CallScript([Pause(2000), Say(tone(800, 330)), Pause(2500), HangUp()])
    async with service(tmp_path, behavior, f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}") as (running, twilio):
        twilio.script("+15550100043", Human(script, ring_s=0.2))
        async with api(running) as client:
            created = await client.post("/api/calls", json={"to": "+15550100043", "from": "+15550100001"})
            assert created.status_code == 201, created.text
            sid = created.json()["call_sid"]
            call = await twilio.ended(sid, 60)
            await running.wait_for_logs("call.summary", 1)
            record = (await client.get(f"/api/calls/{sid}")).json()
    # The service's own /twilio/status accepted every callback: the signatures were Twilio's.
    assert call_statuses(call) == ["initiated", "ringing", "in-progress", "completed"]
    assert [c.status_code for c in call.callbacks] == [204] * 4
    assert call.recording is not None and call.recording.ended_by == "caller"
    assert len(call.recording.heard_audio) > 0  # the agent's greeting reached the callee
    assert (record["status"], record["end_reason"]) == ("completed", "caller_hung_up")
