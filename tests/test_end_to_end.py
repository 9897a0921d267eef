"""End to end over real sockets: ``callbridge serve`` as a subprocess, the fake Realtime server, simulated callers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from callbridge.telephony import g711 as audio
from callbridge.telephony.params import PARAMETER_NAME
from callbridge.testing.caller import (
    CallRecording,
    CallScript,
    HangUp,
    Pause,
    Say,
    SayWhenHearing,
    SimulatedCaller,
    Step,
)
from callbridge.testing.conformance import validate_client_event
from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer, FakeSession

from conftest import secret

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AUTH_TOKEN = secret("e2e-twilio-token-" + secrets.token_hex(8))
SECRET = secret("e2e-callbridge-secret-" + secrets.token_hex(8))
OPENAI_KEY = secret("sk-e2e-" + secrets.token_hex(16))
CALLBRIDGE = Path(sys.executable).with_name("callbridge")
GREETING = "Hello, you have reached the test line."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """A running ``callbridge serve`` subprocess and its JSON log."""

    base_url: str
    log_path: Path
    fake: FakeRealtimeServer
    process: asyncio.subprocess.Process
    _logs: list[dict[str, Any]] = field(default_factory=list)

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if event is None or line.get("event") == event]

    async def wait_for_logs(self, event: str, count: int, seconds: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        """The log lines of ``event`` (with these ``fields``, if given) once there are ``count`` of them (calls
        finish asynchronously)."""

        def matching() -> list[dict[str, Any]]:
            return [line for line in self.logs(event) if all(line.get(k) == v for k, v in fields.items())]

        deadline = time.monotonic() + seconds
        while len(lines := matching()) < count and time.monotonic() < deadline:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.05)
        return lines

    def caller(self) -> SimulatedCaller:
        return SimulatedCaller(self.base_url, AUTH_TOKEN)


@asynccontextmanager
async def serve(tmp_path: Path, behavior: FakeBehavior, *, workers: str = "1", **env: str) -> AsyncIterator[Service]:
    async with FakeRealtimeServer(behavior) as fake:
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        environment = {
            **os.environ,
            "CALLBRIDGE_PUBLIC_URL": base_url,
            "CALLBRIDGE_REALTIME_URL": fake.url,
            "CALLBRIDGE_SECRET": SECRET,
            "OPENAI_API_KEY": OPENAI_KEY,  # sent to the fake; it must never show in a log
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "CALLBRIDGE_DRAIN_SECONDS": "5",
            "CALLBRIDGE_LOG_FORMAT": "json",
            "CALLBRIDGE_AGENT_GREETING": GREETING,
            **env,
        }
        log_path = tmp_path / f"serve-{port}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *(str(CALLBRIDGE), "serve", "--port", str(port), "--workers", workers),
                env=environment,
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
        service = Service(base_url, log_path, fake, process)
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(200):
                    if process.returncode is not None:
                        raise RuntimeError(f"callbridge serve exited: {log_path.read_text()}")
                    try:
                        if (await client.get(f"{base_url}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("callbridge serve did not start")
            yield service
        finally:
            if process.returncode is None:
                process.terminate()  # drains: a call still live gets the fallback first
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def no_live_call(running: Service) -> None:
    """Until the service carries no call (its record written): ``/readyz`` counts the live calls."""
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            if (await client.get(f"{running.base_url}/readyz")).json()["active_calls"] == 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("a call is still live")


async def until(condition: Callable[[], object], seconds: float = 10.0) -> None:
    """Poll ``condition`` (state another task or process changes, with nothing to await on)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def wait_closed(sessions: list[FakeSession], seconds: float = 3.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(session.closed.wait() for session in sessions)), seconds)


def agent_items(session: FakeSession) -> list[tuple[str, int]]:
    """(item_id, audio bytes) of each agent audio item the fake streamed, in order."""
    sizes: dict[str, int] = {}
    for event in session.server_events:
        if event["type"] in ("response.output_audio.delta", "response.audio.delta"):
            sizes[event["item_id"]] = sizes.get(event["item_id"], 0) + len(base64.b64decode(event["delta"]))
    return list(sizes.items())


def assert_greeting_heard_then_cut_at_what_was_heard(recording: CallRecording, session: FakeSession) -> None:
    """The opening-hours call: the greeting heard in full, then one barge-in that cleared Twilio's buffer and
    truncated the answer at what the caller actually heard."""
    _greeting_item, greeting_bytes = agent_items(session)[0]
    assert len(recording.heard_audio) >= greeting_bytes
    (clear,) = recording.clears
    (truncation,) = session.truncations
    interrupted_item, interrupted_bytes = agent_items(session)[1]
    assert truncation["item_id"] == interrupted_item
    heard_of_item_ms = (clear.heard_bytes_at_clear - greeting_bytes) / audio.BYTES_PER_MS
    assert abs(truncation["audio_end_ms"] - heard_of_item_ms) <= 60, (truncation, heard_of_item_ms)
    assert 0 < truncation["audio_end_ms"] < interrupted_bytes / audio.BYTES_PER_MS
    assert recording.marks_flushed  # Twilio echoes pending marks on clear; they were not counted as played


def assert_opening_hours_transcript(lines: list[dict[str, Any]]) -> None:
    """The opening-hours call's logged transcript lines: both sides, the agent's answer marked interrupted."""
    assert [(line["speaker"], line["interrupted"]) for line in lines if line["speaker"] == "agent"] == [
        ("agent", False),
        ("agent", True),
        ("agent", False),
    ]
    texts = {line["text"] for line in lines}
    assert GREETING in texts
    assert {"I would like to know your opening hours.", "Stop, just the weekend please."} <= texts


def assert_conformant(session: FakeSession) -> None:
    assert session.errors == [], session.errors
    for event in session.client_events:
        validate_client_event(event, session.dialect)


def opening_hours() -> FakeBehavior:
    """A caller asks for the opening hours, then barges in on the long answer to ask about the weekend."""
    return FakeBehavior(
        transcripts=["I would like to know your opening hours.", "Stop, just the weekend please."],
        reply=lambda text: (
            "We are open on Saturdays from nine until one."
            if "weekend" in text
            else "We are open Monday to Friday from eight in the morning until six in the evening, "
            "and on Saturdays from nine until one."
        ),
        greeting=GREETING,
        ms_per_char=40,
    )


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
        await until(lambda: service.fake.sessions)
        behavior.close_after_s = None  # the next session stays up
        first = service.fake.sessions[0]
        await first.closed.wait()
        lost_at = time.monotonic()
        await until(lambda: len(service.fake.sessions) > 1 and service.fake.sessions[1].audio)
        resumed_after = time.monotonic() - lost_at
        recording = await call
        second = service.fake.sessions[1]
        await wait_closed([second])
        summaries = await service.wait_for_logs("call.summary", 1)
    assert resumed_after < 2.0  # caller audio reaches the new session within 2 s
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
        await until(lambda: service.fake.sessions)
        await asyncio.sleep(1.0)
        await service.fake.stop()  # the model's server goes away and does not come back
        recording = await call
        summaries = await service.wait_for_logs("call.summary", 1)
        retries = service.logs("realtime.retry")
    assert recording.close_code == 1000  # the stream is closed so the TwiML after <Connect> runs
    assert recording.duration_s < 15
    assert [summary["reason"] for summary in summaries] == ["realtime_unavailable"]
    assert [line["attempt"] for line in retries] == [1, 2, 3, 4]


async def test_model_unreachable_ends_the_call(tmp_path: Path, behavior: FakeBehavior) -> None:
    async with serve(
        tmp_path, behavior, CALLBRIDGE_REALTIME_URL=f"ws://127.0.0.1:{_free_port()}/v1/realtime"
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
