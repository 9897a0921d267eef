"""Security and resilience end to end, against ``callbridge serve`` over real sockets: replayed stream parameters,
the model's outages, a drain on SIGTERM and a ``kill -9``."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from callbridge.config import Settings
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.service.agents import load_agents
from callbridge.service.calls import CallServices
from callbridge.service.tools import ToolRegistry
from callbridge.store.repository import Store
from callbridge.telephony import g711 as audio
from callbridge.telephony.params import StreamParameterSigner
from callbridge.testing.caller import CallRecording, CallRefused, CallScript, HangUp, Pause, Say, Step
from callbridge.testing.fake_realtime import FakeBehavior
from callbridge.testing.fake_twilio import FakeTwilio
from support import (
    AUTH_TOKEN,
    FALLBACK_SAY,
    GREETING,
    Service,
    api,
    free_port,
    no_live_call,
    redirects,
    serve,
    service,
    twilio_call,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def waiting_calls(
    running: Service, twilio: FakeTwilio, count: int
) -> tuple[list[str], list[asyncio.Task[CallRecording]]]:
    """``count`` callers who stay on the line (up to a minute), once each one's audio reaches the model."""
    sids = [await twilio_call(twilio) for _ in range(count)]
    caller = running.caller()
    calls = [
        asyncio.create_task(caller.place_call(CallScript([Pause(60000)]), call_sid=sid, max_duration_s=70))
        for sid in sids
    ]
    await wait_until(
        lambda: len(running.fake.sessions) == count and all(s.audio for s in running.fake.sessions),
        20,
        what=f"the audio of {count} callers reaching the model",
    )
    return sids, calls


async def test_replayed_and_expired_stream_parameters_refuse_the_call(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=20)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    env = {"CALLBRIDGE_STREAM_PARAMETERS_TTL_SECONDS": "4"}
    async with service(tmp_path, behavior, db, **env) as (running, twilio):
        twimls: dict[str, str] = {}
        async with api(running) as client:
            for to in ("+15550100011", "+15550100012"):
                created = await client.post("/api/calls", json={"to": to, "from": "+15550100001"})
                assert created.status_code == 201, created.text
                (request,) = [r for r in twilio.requests if r.path.endswith("/Calls.json") and r.form["To"] == [to]]
                twimls[created.json()["call_sid"]] = request.form["Twiml"][0]
        minted_at = time.monotonic()
        (a, twiml_a), (b, twiml_b) = twimls.items()
        caller = running.caller()
        wait = CallScript([Pause(3000)])

        # Outbound parameters are signed before Twilio names the call: the call record binds them to it.
        onto_b = await caller.place_call(wait, twiml=twiml_a, call_sid=b, max_duration_s=10)
        # The rightful call goes ahead; a second stream for it while it is live is refused.
        live = asyncio.create_task(
            caller.place_call(CallScript([Pause(2500), HangUp()]), twiml=twiml_a, call_sid=a, max_duration_s=20)
        )
        await wait_until(lambda: running.fake.sessions, what="the rightful call reaching the model")
        twice = await caller.place_call(wait, twiml=twiml_a, call_sid=a, max_duration_s=10)
        assert (await live).ended_by == "caller"
        await no_live_call(running)
        # Once the call is over, its parameters open nothing.
        after = await caller.place_call(wait, twiml=twiml_a, call_sid=a, max_duration_s=10)
        # And past their lifetime, the parameters of a call that never connected open nothing either.
        await asyncio.sleep(max(0.0, minted_at + 5.5 - time.monotonic()))
        expired = await caller.place_call(wait, twiml=twiml_b, call_sid=b, max_duration_s=10)

        assert [r.close_code for r in (onto_b, twice, after, expired)] == [1008] * 4
        assert [line["reason"] for line in running.logs("security.stream_refused")] == [
            "stream parameters belong to another call",
            "a stream is already live for this call",
            "the call is already over",
            "stream parameters expired",
        ]
        assert len(running.fake.sessions) == 1  # the refused streams never reached the model
        async with api(running) as client:
            record_a = (await client.get(f"/api/calls/{a}")).json()
            record_b = (await client.get(f"/api/calls/{b}")).json()
        assert record_a["end_reason"] == "caller_hung_up"  # the refusals recorded nothing against the calls
        assert (record_b["end_reason"], record_b["started_at"]) == (None, None)

        # Webhooks: a signature replayed with other parameters, or none at all, is refused.
        voice_url, status_url = f"{running.base_url}/twilio/voice", f"{running.base_url}/twilio/status"
        form = {"CallSid": "CA" + "e" * 32, "From": "+15550100001", "To": "+15550100002"}
        signature = RequestValidator(AUTH_TOKEN).compute_signature(voice_url, form)
        async with httpx.AsyncClient() as client:
            replayed = {**form, "From": "+15550100666"}
            assert (await client.post(voice_url, data=replayed, headers={"X-Twilio-Signature": signature})).is_error
            assert (await client.post(status_url, data=form, headers={"X-Twilio-Signature": signature})).is_error
            assert (await client.post(status_url, data={**form, "CallStatus": "completed"})).status_code == 403


async def test_model_unreachable_hands_the_caller_to_the_fallback(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    env = {
        "CALLBRIDGE_REALTIME_URL": f"ws://127.0.0.1:{free_port()}/v1/realtime",
        "CALLBRIDGE_REALTIME_RECONNECT_DEADLINE_SECONDS": "2",
        "CALLBRIDGE_FALLBACK_TRANSFER_TO": "+15550109999",
    }
    async with service(tmp_path, FakeBehavior(), db, **env) as (running, twilio):
        call_sid = await twilio_call(twilio)
        recording = await running.caller().place_call(CallScript([Pause(20000)]), call_sid=call_sid)
        await running.wait_for_logs("call.summary", 1)
        async with api(running) as client:
            record = (await client.get(f"/api/calls/{call_sid}")).json()
            events = (await client.get(f"/api/calls/{call_sid}/events")).json()
    assert recording.ended_by == "server" and recording.duration_s < 5  # retried for 2 s, not for ever
    (fallback,) = redirects(twilio, call_sid)
    assert [(verb.tag, verb.text) for verb in fallback] == [("Say", FALLBACK_SAY), ("Dial", "+15550109999")]
    assert record["end_reason"] == "realtime_unavailable"
    assert "fallback" in [event["kind"] for event in events]


def weekday_hours(ms_per_char: int) -> FakeBehavior:
    """A greeting, one question about the opening hours, one short answer."""
    return FakeBehavior(
        transcripts=["I would like to know your opening hours."],
        reply=lambda _: "We open at eight every weekday.",
        greeting=GREETING,
        ms_per_char=ms_per_char,
    )


async def test_a_long_call_moves_to_a_fresh_model_session_with_its_conversation(tmp_path: Path) -> None:
    behavior = weekday_hours(ms_per_char=40)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    async with service(tmp_path, behavior, db, CALLBRIDGE_REALTIME_ROLLOVER_SECONDS="4.5") as (running, _):
        # The first model session is due at 4.5 s and moves at the first quiet moment, once its answer has been
        # heard (about 5 s in); the caller speaks again, and the second session answers.
        steps: list[Step] = [Pause(2500), Say(audio.tone(800, 330)), Pause(3200), Say(audio.tone(800, 440))]
        recording = await running.caller().place_call(CallScript([*steps, Pause(3000), HangUp()]))
        await running.wait_for_logs("call.summary", 1)
        first, second, *later = running.fake.sessions
        async with api(running) as client:
            lines = (await client.get(f"/api/calls/{recording.call_sid}/transcript")).json()["lines"]
    assert len(running.logs("realtime.rollover")) == 1 + len(later)  # every session moved on, none was lost
    replayed = [
        (event["item"]["role"], event["item"]["content"][0]["text"])
        for event in second.client_events
        if event["type"] == "conversation.item.create" and event["item"]["role"] != "system"
    ]
    assert replayed == [
        ("assistant", GREETING),
        ("user", "I would like to know your opening hours."),
        ("assistant", "We open at eight every weekday."),
    ]
    assert not [event for event in second.client_events if event["type"] == "response.create"]  # no new greeting
    # The call went on in the new session: the caller's next words reached it, and its answer reached the caller.
    assert [line["speaker"] for line in lines] == ["agent", "caller", "agent", "caller", "agent"]
    answered = [e for e in second.server_events if e["type"] == "response.output_audio.delta"]
    assert len(second.audio) > 0 and answered
    assert first.closed.is_set()


async def test_sigterm_drains_live_calls_before_the_process_stops(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    drain_s = 4.0
    behavior = FakeBehavior(greeting=GREETING, ms_per_char=20)
    async with service(tmp_path, behavior, db, CALLBRIDGE_DRAIN_SECONDS=str(drain_s)) as (running, twilio):
        sids, calls = await waiting_calls(running, twilio, 10)
        caller = running.caller()
        running.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        await running.wait_for_logs("drain.started", 1)
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{running.base_url}/readyz")
        assert (ready.status_code, ready.json()["reason"]) == (503, "draining")
        with pytest.raises(CallRefused) as refused:  # the webhook answers the fallback: no stream
            await caller.place_call(CallScript([Pause(500)]), max_duration_s=5)
        assert FALLBACK_SAY in refused.value.body and "<Connect>" not in refused.value.body
        recordings = await asyncio.gather(*calls)
        ended_after = time.monotonic() - signalled_at
        exit_code = await asyncio.wait_for(running.process.wait(), 20)
    assert exit_code == 0
    # None was cut off before the deadline; all heard the fallback when it came.
    assert all(r.ended_by == "server" for r in recordings)
    assert all(r.duration_s >= drain_s - 0.5 for r in recordings) and ended_after >= drain_s - 0.5
    assert all(
        [verb.tag for verb in redirect] == ["Say", "Hangup"] for sid in sids for redirect in redirects(twilio, sid)
    )
    assert all(len(redirects(twilio, sid)) == 1 for sid in sids)
    store = await Store.open(db)
    try:
        records = {sid: await store.get_call(sid) for sid in sids}
        refused_calls = [call for call in (await store.list_calls()).calls if call.call_sid not in sids]
    finally:
        await store.close()
    assert {sid: record.end_reason if record else None for sid, record in records.items()} == dict.fromkeys(
        sids, "shutdown"
    )
    assert [call.end_reason for call in refused_calls] == ["draining"]


async def test_kill_9_loses_no_completed_line_and_the_call_is_closed_as_interrupted(tmp_path: Path) -> None:
    behavior = weekday_hours(ms_per_char=20)
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    script = CallScript([Pause(2500), Say(audio.tone(800, 330)), Pause(60000)])
    async with service(tmp_path, behavior, db) as (running, _):
        call = asyncio.create_task(running.caller().place_call(script, max_duration_s=70))
        logged = await running.wait_for_logs("transcript.line", 3, seconds=20)
        running.process.kill()  # SIGKILL: no drain, no shutdown, nothing flushed on the way out
        await running.process.wait()
        recording = await call
    store = await Store.open(db)
    try:
        kept = await store.transcript(recording.call_sid)
        record = await store.get_call(recording.call_sid)
    finally:
        await store.close()
    assert [(line.speaker, line.text) for line in kept] == [(line["speaker"], line["text"]) for line in logged]
    assert record is not None and (record.status, record.ended_at) == ("in-progress", None)

    async with service(tmp_path, behavior, db) as (running, _):  # the next process start
        assert running.logs("calls.orphans_closed")[0]["count"] == 1
        async with api(running) as client:
            closed = (await client.get(f"/api/calls/{recording.call_sid}")).json()
    assert (closed["status"], closed["end_reason"]) == ("failed", "interrupted") and closed["ended_at"]


async def test_oversized_request_bodies_are_refused(tmp_path: Path) -> None:
    async with serve(tmp_path, FakeBehavior(), CALLBRIDGE_MAX_REQUEST_BYTES="4096") as running:

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"From=" + b"9" * 995

        form = {"content-type": "application/x-www-form-urlencoded"}
        async with httpx.AsyncClient(base_url=running.base_url) as client:
            declared = await client.post("/twilio/voice", content=b"From=" + b"9" * 5000, headers=form)
            streamed = await client.post("/twilio/voice", content=chunked(), headers=form)
            fits = await client.post("/twilio/voice", content=b"From=" + b"9" * 3000, headers=form)
            alive = await client.get("/healthz")
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert fits.status_code == 403  # read, then refused for its missing signature
    assert alive.status_code == 200


async def test_the_development_switch_turns_signature_checks_off_loudly(tmp_path: Path) -> None:
    async with serve(tmp_path, FakeBehavior(), CALLBRIDGE_DEV_DISABLE_SIGNATURES="true") as running:
        form = {"CallSid": "CA" + "f" * 32, "From": "+15550100001", "To": "+15550100002"}
        async with httpx.AsyncClient() as client:
            unsigned = await client.post(f"{running.base_url}/twilio/voice", data=form)
    (warning,) = running.logs("security.signatures_disabled")
    assert warning["level"] == "error" and "ANYONE" in warning["detail"]
    assert unsigned.status_code == 200 and "<Connect>" in unsigned.text


async def test_workers_share_the_port_and_drain_together(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    behavior = FakeBehavior(greeting=GREETING, ms_per_char=20)
    async with service(tmp_path, behavior, db, workers="2", CALLBRIDGE_DRAIN_SECONDS="3") as (running, twilio):
        sids, calls = await waiting_calls(running, twilio, 16)
        running.process.send_signal(signal.SIGTERM)  # to the parent: it passes the signal on to every worker
        recordings = await asyncio.gather(*calls)
        exit_code = await asyncio.wait_for(running.process.wait(), 20)
    assert exit_code == 0
    assert all(r.ended_by == "server" and r.duration_s >= 2.5 for r in recordings)
    store = await Store.open(db)
    try:
        records = [await store.get_call(sid) for sid in sids]
    finally:
        await store.close()
    assert [record.end_reason if record else None for record in records] == ["shutdown"] * 16
    # The kernel spread the calls over both workers (16 calls on one of two: a 1 in 30,000 chance).
    owners = {record.owner.split(":")[1] for record in records if record and record.owner}
    assert len(owners) == 2


async def test_a_database_outage_refuses_only_the_parameters_that_need_the_record(tmp_path: Path) -> None:
    settings = Settings(secret="s" * 32, database_url=f"sqlite:///{tmp_path / 'calls.db'}")
    store = await Store.open(settings.database_url)
    services = CallServices(
        settings, store, StreamParameterSigner("s" * 32, 600), load_agents(settings, ToolRegistry(), None), None
    )
    session = CallSession(
        SessionConfig(agent=AgentConfig(), verify_parameters=lambda parameters, call_sid: CallContext())
    )
    session.call_sid = "CA" + "1" * 32
    try:
        async with store.engine.begin() as connection:  # the database breaks under the running service
            await connection.exec_driver_sql("DROP TABLE transcript_lines")
            await connection.exec_driver_sql("DROP TABLE call_events")
            await connection.exec_driver_sql("DROP TABLE calls")
        session.context = CallContext(call_sid=session.call_sid)  # bound to the SID by its signature
        assert await services.authorize(session) is None
        session.context = CallContext(binding="one-time")  # bound only through the call record
        with pytest.raises(Exception, match="no such table"):
            await services.authorize(session)  # the bridge refuses the call when the check cannot run
    finally:
        await services.aclose()
        await store.close()
