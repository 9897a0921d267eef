"""End to end over real sockets: ``callbridge serve`` as a subprocess, the fake Realtime server, simulated callers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from callbridge.telephony import g711 as audio
from callbridge.telephony.params import PARAMETER_NAME
from callbridge.testing.caller import CallRecording, CallScript, HangUp, Pause, Say, SayWhenHearing, Step
from callbridge.testing.fake_realtime import FakeBehavior
from support import (
    AUTH_TOKEN,
    CALLBRIDGE,
    GREETING,
    agent_items,
    assert_conformant,
    assert_greeting_heard_then_cut_at_what_was_heard,
    assert_opening_hours_transcript,
    free_port,
    opening_hours,
    serve,
    wait_closed,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def behavior() -> Iterator[FakeBehavior]:
    yield opening_hours()


async def test_a_call_end_to_end(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(tmp_path, behavior) as service:
        script = CallScript(
            [
                Pause(2500),  # the greeting plays
                Say(audio.tone(900, 330)),
                SayWhenHearing(audio.tone(700, 440), after_heard_ms=1200),  # barge in on the long answer
                Pause(3500),
                HangUp(),
            ]
        )
        recording = await service.caller().place_call(script, max_duration_s=30)
        (session,) = service.fake.sessions
        await wait_closed([session])  # after stop, no Realtime socket is left open
        await service.wait_for_logs("call.summary", 1)
        async with httpx.AsyncClient() as client:
            exposition = (await client.get(f"{service.base_url}/metrics")).text

    # The call as Prometheus sees it.
    metrics = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert metrics[("callbridge_calls_total", (("outcome", "caller_hung_up"),))] == 1
    assert metrics[("callbridge_active_calls", ())] == 0
    frames_in = metrics[("callbridge_frames_relayed_total", (("direction", "caller_to_model"),))]
    assert frames_in == len(recording.sent_audio) // 160
    assert metrics[("callbridge_frames_relayed_total", (("direction", "model_to_caller"),))] > 0
    assert metrics[("callbridge_barge_ins_total", ())] == metrics[("callbridge_truncations_total", ())] == 1
    assert metrics[("callbridge_turn_latency_seconds_count", ())] == 2  # two answers to two caller turns
    relay_samples = metrics[("callbridge_relay_latency_seconds_count", (("direction", "caller_to_model"),))]
    assert frames_in // 20 <= relay_samples <= frames_in // 16  # one audio frame in 16 is timed

    assert recording.protocol_errors == []  # every message to Twilio matched the Media Streams schema
    assert_conformant(session)
    # Caller audio reached the model byte for byte.
    assert bytes(session.audio) == bytes(recording.sent_audio)
    assert len(recording.sent_audio) > 0

    assert_greeting_heard_then_cut_at_what_was_heard(recording, session)

    # Transcripts of both sides completed, in spoken order, each log line bound to the call.
    lines = service.logs("transcript.line")  # logged before call.summary, which serve() waited for
    assert_opening_hours_transcript(lines)
    interrupted = next(line for line in lines if line["interrupted"])
    assert interrupted["text"] and "Saturdays" not in interrupted["text"]  # cut to what was heard
    call_lines = [
        line
        for line in service.logs()
        if line.get("call_sid") == recording.call_sid and line["event"] != "twilio.incoming_call"  # before the stream
    ]
    assert all(line["stream_sid"] == recording.stream_sid for line in call_lines)
    assert {"call.admitted", "realtime.connected", "barge_in", "call.ended"} <= {line["event"] for line in call_lines}
    # Audio frames are never logged.
    sample = base64.b64encode(bytes(recording.sent_audio[8000:8160])).decode()
    assert sample not in service.log_path.read_text()


async def test_twenty_concurrent_calls_without_cross_talk(tmp_path: Path) -> None:
    behavior = FakeBehavior(transcripts=["Hello?"], reply=lambda text: "Yes, hello.", greeting="Hi.", ms_per_char=60)
    async with serve(tmp_path, behavior) as service:
        voices = [os.urandom(6400) for _ in range(20)]  # 800 ms of loud noise, unique per caller
        scripts = [CallScript([Pause(1000), Say(voice), Pause(2500), HangUp()]) for voice in voices]
        recordings: list[CallRecording] = await asyncio.gather(
            *(service.caller().place_call(script, max_duration_s=30) for script in scripts)
        )
        sessions = service.fake.sessions
        await wait_closed(sessions)
        summaries = await service.wait_for_logs("call.summary", 20)

    assert len(sessions) == 20
    by_audio = {bytes(session.audio): session for session in sessions}
    for recording in recordings:
        assert recording.protocol_errors == []
        session = by_audio[bytes(recording.sent_audio)]  # exactly this caller's audio reached exactly one session
        assert_conformant(session)
        assert recording.received_audio_bytes == sum(size for _, size in agent_items(session))
    assert len({recording.call_sid for recording in recordings}) == 20
    assert sorted(summary["reason"] for summary in summaries) == ["caller_hung_up"] * 20


async def test_signatures_and_stream_parameters_guard_the_bridge(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(tmp_path, behavior) as service:
        voice_url = f"{service.base_url}/twilio/voice"
        form = {"CallSid": "CA" + "a" * 32, "From": "+15550100001", "To": "+15550100002"}
        validator = RequestValidator(AUTH_TOKEN)
        async with httpx.AsyncClient() as client:
            assert (await client.post(voice_url, data=form)).status_code == 403
            forged = {"X-Twilio-Signature": RequestValidator("wrong").compute_signature(voice_url, form)}
            assert (await client.post(voice_url, data=form, headers=forged)).status_code == 403
            signed = {"X-Twilio-Signature": validator.compute_signature(voice_url, form)}
            answer = await client.post(voice_url, data=form, headers=signed)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/xml")
        token = answer.text.split(f'name="{PARAMETER_NAME}" value="')[1].split('"')[0]

        stream_url = service.base_url.replace("http://", "ws://") + "/twilio/media-stream"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(stream_url, additional_headers={"X-Twilio-Signature": "bogus"})
        assert refused.value.response.status_code == 403
        with pytest.raises(websockets.InvalidStatus) as unsigned:
            await websockets.connect(stream_url)
        assert unsigned.value.response.status_code == 403

        # A valid upgrade signature is the same for every call and can be replayed: the signed parameters decide.
        upgrade = {"X-Twilio-Signature": validator.compute_signature(stream_url, {})}

        async def start_with(parameters: dict[str, str], call_sid: str) -> int | None:
            async with websockets.connect(stream_url, additional_headers=upgrade) as ws:
                start = {
                    "streamSid": "MZ" + "b" * 32,
                    "callSid": call_sid,
                    "accountSid": "AC" + "c" * 32,
                    "tracks": ["inbound"],
                    "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                }
                await ws.send(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
                await ws.send(orjson.dumps({"event": "start", "sequenceNumber": "1", "start": start}).decode())
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                return ws.close_code

        assert await start_with({}, form["CallSid"]) == 1008
        assert await start_with({PARAMETER_NAME: token[:-3] + "xyz"}, form["CallSid"]) == 1008
        assert await start_with({PARAMETER_NAME: token}, "CA" + "d" * 32) == 1008  # replayed on another call
        assert service.fake.sessions == []  # no Realtime connection was ever opened for them
        refusals = service.logs("security.stream_refused")
        assert [line["reason"] for line in refusals] == [
            "stream parameters absent",
            "stream parameters tampered with or signed with another secret",
            "stream parameters belong to another call",
        ]
        assert len(service.logs("security.webhook_signature_invalid")) == 2
        assert len(service.logs("security.stream_signature_invalid")) == 2


async def test_beta_dialect_end_to_end(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(tmp_path, behavior, CALLBRIDGE_REALTIME_DIALECT="beta") as service:
        script = CallScript([Pause(2500), Say(audio.tone(800, 330)), Pause(7000), HangUp()])
        recording = await service.caller().place_call(script, max_duration_s=30)
        (session,) = service.fake.sessions
        await wait_closed([session])
    assert session.dialect == "beta"
    assert_conformant(session)
    assert bytes(session.audio) == bytes(recording.sent_audio)
    assert recording.received_audio_bytes == sum(size for _, size in agent_items(session))
    assert len(agent_items(session)) == 2  # greeting and one answer


async def test_tool_call_end_to_end(tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["Is Tuesday at three free?"],
        tool_cues={"Tuesday": ("check_availability", '{"day": "Tuesday", "time": "3 pm"}')},
        greeting="Hi.",
        ms_per_char=30,
    )
    async with serve(tmp_path, behavior, CALLBRIDGE_TOOLS="callbridge.engine.demo:tools") as service:
        script = CallScript([Pause(1000), Say(audio.tone(800, 330)), Pause(5000), HangUp()])
        recording = await service.caller().place_call(script, max_duration_s=30)
        (session,) = service.fake.sessions
        await wait_closed([session])
    assert_conformant(session)
    update = next(event for event in session.client_events if event["type"] == "session.update")
    assert [tool["name"] for tool in update["session"]["tools"]] == ["check_availability", "book_appointment"]
    outputs = [
        event["item"]
        for event in session.client_events
        if event["type"] == "conversation.item.create" and event["item"]["type"] == "function_call_output"
    ]
    assert len(outputs) == 1 and json.loads(outputs[0]["output"])["available"] is True
    after_output = session.client_events[
        session.client_events.index(
            next(e for e in session.client_events if e.get("item", {}).get("type") == "function_call_output")
        )
        + 1 :
    ]
    assert [e["type"] for e in after_output if e["type"] != "input_audio_buffer.append"][:1] == ["response.create"]
    assert len(agent_items(session)) == 2  # the greeting, then the answer that uses the tool's result
    assert recording.received_audio_bytes == sum(size for _, size in agent_items(session))


@pytest.mark.parametrize("death", ["closed", "killed"])
async def test_model_connection_lost_mid_call_reconnects_with_the_conversation(
    death: str, tmp_path: Path, behavior: FakeBehavior
) -> None:
    behavior.close_after_s = 6.0  # the first session dies mid-call: closed with 1011, or its process killed
    behavior.close_abruptly = death == "killed"  # no close frame: the TCP connection just drops
    async with serve(tmp_path, behavior) as service:
        steps: list[Step] = [
            Pause(2500),
            Say(audio.tone(800, 330)),
            Pause(6000),
            Say(audio.tone(800, 440)),
            Pause(2500),
            HangUp(),
        ]
        call = asyncio.create_task(service.caller().place_call(CallScript(steps), max_duration_s=40))
        await wait_until(lambda: service.fake.sessions, what="the first connection to the model")
        behavior.close_after_s = None  # the next session stays up
        first = service.fake.sessions[0]
        recording = await call
        second = service.fake.sessions[1]
        await wait_closed([first, second])
        summaries = await service.wait_for_logs("call.summary", 1)
        retries = service.logs("realtime.retry")
    # The model came back at once: one reconnection, on the first attempt, with no backoff delay (what the service
    # decided, not a time measured across processes); the audio check below shows nothing was lost meanwhile.
    assert [(line["attempt"], line["delay_s"]) for line in retries] == [(1, 0.0)]
    assert_conformant(second)
    replayed = [
        (event["item"]["role"], event["item"]["content"][0]["text"])
        for event in second.client_events
        if event["type"] == "conversation.item.create" and event["item"]["role"] != "system"
    ]
    assert replayed[:2] == [("assistant", GREETING), ("user", "I would like to know your opening hours.")]
    assert [e for e in second.client_events if e["type"] == "response.create"] == []  # no second greeting
    # Caller audio after the loss was kept and forwarded: nothing but the frames in flight at the loss is missing.
    sent = bytes(recording.sent_audio)
    assert sent.endswith(bytes(second.audio)) and len(first.audio) + len(second.audio) >= len(sent) - 3 * 160
    assert [summary["reason"] for summary in summaries] == ["caller_hung_up"]


async def test_model_gone_for_good_ends_the_call(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(tmp_path, behavior) as service:
        call = asyncio.create_task(service.caller().place_call(CallScript([Pause(30000)]), max_duration_s=40))
        # The call is live: the caller's audio reaches the model.
        await wait_until(lambda: service.fake.sessions and service.fake.sessions[0].audio, what="caller audio relayed")
        await service.fake.stop()  # the model's server goes away and does not come back
        recording = await call
        summaries = await service.wait_for_logs("call.summary", 1)
        retries = service.logs("realtime.retry")
    assert recording.close_code == 1000  # the stream is closed so the TwiML after <Connect> runs
    assert recording.ended_by == "server"  # by the service, after its retries: not the 30 s script or the 40 s limit
    assert [summary["reason"] for summary in summaries] == ["realtime_unavailable"]
    assert [line["attempt"] for line in retries] == [1, 2, 3, 4]


async def test_model_unreachable_ends_the_call(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(
        tmp_path, behavior, CALLBRIDGE_REALTIME_URL=f"ws://127.0.0.1:{free_port()}/v1/realtime"
    ) as service:
        recording = await service.caller().place_call(CallScript([Pause(20000)]), max_duration_s=30)
        summaries = await service.wait_for_logs("call.summary", 1)
    assert recording.close_code == 1000
    assert [summary["reason"] for summary in summaries] == ["realtime_unavailable"]


async def test_simulate_command_places_a_call(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(tmp_path, behavior) as service:
        wav = tmp_path / "caller.wav"
        audio.write_wav(wav, [audio.tone(1000, 330)])
        process = await asyncio.create_subprocess_exec(
            str(CALLBRIDGE),
            "simulate",
            "--url",
            service.base_url,
            "--wav",
            str(wav),
            "--seconds",
            "3",
            "--save",
            str(tmp_path / "call.wav"),
            env={**os.environ, "TWILIO_AUTH_TOKEN": AUTH_TOKEN},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        (session,) = service.fake.sessions
        await wait_closed([session])
    assert process.returncode == 0, output.decode()
    assert b"clear" in output and (tmp_path / "call.wav").stat().st_size > 44
    assert audio.read_wav_as_ulaw(wav) in bytes(session.audio)  # the WAV's audio reached the model unchanged
