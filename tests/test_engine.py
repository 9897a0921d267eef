"""The local engine and the demo: a whole call with real speech through the real bridge over real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import os
import secrets
import sys
import wave
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from callbridge.engine.demo import DEFAULT_SCRIPT, DemoCall, place_demo_call, summarize, summarize_call
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, SayWhenAgentDone, SimulatedCaller
from callbridge.testing.conformance import validate_client_event, validate_server_event
from support import free_port

pytestmark = [pytest.mark.slow]

CALLBRIDGE = Path(sys.executable).with_name("callbridge")

# What each agent turn must say to have answered the caller's intent, in order.
EXPECTED_AGENT_TURNS = [
    "thanks for calling",  # greeting
    "what day and time",  # "I'd like to book an appointment"
    "tuesday at 3 pm is free",  # "Tuesday afternoon at three" → check_availability
    "we are open",  # "what are your opening hours" (interrupted, cut to what was heard)
    "booked for tuesday at 3 pm",  # "Yes please" → book_appointment
    "goodbye",  # "No thank you, goodbye"
]


@pytest.fixture(scope="module")
def demo_console() -> Console:
    """Where the demo prints its live transcript."""
    return Console(record=True, width=200, file=io.StringIO())


@pytest.fixture(scope="module")
def demo_call(demo_console: Console, tmp_path_factory: pytest.TempPathFactory) -> DemoCall:
    return asyncio.run(place_demo_call(DEFAULT_SCRIPT, demo_console, tmp_path_factory.mktemp("demo")))


def test_every_agent_turn_answers_the_caller(demo_call: DemoCall) -> None:
    agent = [line for line in sorted(demo_call.lines, key=lambda line: line.start_ms) if line.speaker == "agent"]
    assert len(agent) == len(EXPECTED_AGENT_TURNS), [line.text for line in agent]
    for line, expected in zip(agent, EXPECTED_AGENT_TURNS, strict=True):
        assert expected in line.text.lower(), (expected, line.text)
    assert [line.interrupted for line in agent] == [False, False, False, True, False, False]


def test_transcript_holds_both_sides_in_order(demo_call: DemoCall) -> None:
    ordered = sorted(demo_call.lines, key=lambda line: line.start_ms)
    assert [line.speaker for line in ordered] == ["agent"] + ["caller", "agent"] * 5
    assert all(a.start_ms <= b.start_ms for a, b in itertools.pairwise(ordered))


def test_summary_figures(demo_call: DemoCall, tmp_path: Path) -> None:
    summary = summarize(demo_call.recording, demo_call.utterances, demo_call.lines, tmp_path)
    assert summary["ok"]
    assert summary["caller_wer"] <= 0.20, summary["transcript"]
    # The caller's barge-in cleared Twilio's buffer, after it began (the summary measures from then to the clear).
    assert summary["barge_in_stop_ms"] is not None and summary["barge_in_stop_ms"] >= 0
    assert len(summary["turn_latency_ms"]["turns"]) == 5
    assert {"turns", "caller_wer", "turn_latency_ms", "barge_in_stop_ms", "files"} <= set(summary)


def test_tool_calls_show_in_the_live_transcript_and_the_summary(
    demo_call: DemoCall, demo_console: Console, tmp_path: Path
) -> None:
    assert [use.name for use in demo_call.tool_calls] == ["check_availability", "book_appointment"]
    assert all(use.arguments == {"day": "tuesday", "time": "3 pm"} and use.ok for use in demo_call.tool_calls)
    available, booked = (use.result for use in demo_call.tool_calls)
    assert available["available"] is True and booked["booked"] is True
    printed = demo_console.export_text()
    assert 'tool check_availability({"day": "tuesday", "time": "3 pm"}) → {' in printed
    assert f'"reference": "{booked["reference"]}"' in printed
    summary = summarize_call(demo_call, tmp_path)
    assert [use["name"] for use in summary["tool_calls"]] == ["check_availability", "book_appointment"]
    assert summary["tool_calls"][1]["result"] == booked


def test_barge_in_cuts_the_answer_while_the_caller_is_still_speaking(demo_call: DemoCall) -> None:
    """The answer the caller barged in on was taken back (truncated at the engine) after the first and before the
    last of the audio of the caller's line. Positions in the caller's audio, which reaches the engine on the same
    socket as the truncation and in order, rather than a time a busy machine could stretch."""
    barge = next(i for i, utterance in enumerate(demo_call.utterances) if utterance.line.barge_in)
    starts = [at for name, at in demo_call.recording.step_times if name.endswith(":triggered")]
    line_start = round(starts[barge] * 1000) * audio.BYTES_PER_MS  # one 20 ms frame per 20 ms tick from the start
    line_end = line_start + demo_call.utterances[barge].speech_ms * audio.BYTES_PER_MS
    (session,) = demo_call.engine_sessions
    relayed, cut_at = 0, []
    for event in session.client_events:
        if event.get("type") == "input_audio_buffer.append":
            relayed += len(base64.b64decode(event["audio"]))
        elif event.get("type") == "conversation.item.truncate":
            cut_at.append(relayed)
    assert relayed == len(demo_call.recording.sent_audio)  # μ-law as sent: a byte count is a place in the call
    assert len(cut_at) == 1 and line_start < cut_at[0] <= line_end, (cut_at, line_start, line_end)


def test_wav_has_both_channels_with_speech_where_expected(demo_call: DemoCall, tmp_path: Path) -> None:
    summary = summarize(demo_call.recording, demo_call.utterances, demo_call.lines, tmp_path)
    with wave.open(summary["files"]["wav"], "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        frames = wav.readframes(wav.getnframes())
    samples = memoryview(frames).cast("h")
    caller, agent = samples[0::2], samples[1::2]

    def level(channel: memoryview, start_s: float, end_s: float) -> float:
        window = channel[int(start_s * 8000) : int(end_s * 8000)]
        return float((sum(s * s for s in window) / max(1, len(window))) ** 0.5)

    starts = [at for name, at in demo_call.recording.step_times if name.endswith(":triggered")]
    first_caller_line = (starts[0], starts[0] + demo_call.utterances[0].speech_ms / 1000)
    assert level(caller, *first_caller_line) > 500  # the caller speaks on the left
    assert level(caller, 0.2, starts[0] - 0.2) < 50  # and is silent while the greeting plays
    greeting_heard = demo_call.recording.heard_timeline[0][0]
    assert level(agent, greeting_heard, greeting_heard + 1.0) > 500  # the agent speaks on the right


def test_engine_events_conform_to_the_realtime_protocol(demo_call: DemoCall) -> None:
    (session,) = demo_call.engine_sessions
    assert session.errors == []
    for event in session.client_events:
        validate_client_event(event, session.dialect)
    for event in session.server_events:
        validate_server_event(event, session.dialect)
    # The caller's μ-law reached the engine byte for byte: the recognizer heard only what the bridge relayed.
    assert bytes(session.audio) == bytes(demo_call.recording.sent_audio)


async def test_serve_without_key_or_url_uses_the_local_engine(tmp_path: Path) -> None:
    port = free_port()
    token = secrets.token_hex(8)
    environment = {
        key: value for key, value in os.environ.items() if key not in ("OPENAI_API_KEY", "CALLBRIDGE_REALTIME_URL")
    }
    environment |= {
        "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TWILIO_AUTH_TOKEN": token,
        "CALLBRIDGE_SECRET": "s" * 32,
        "CALLBRIDGE_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(CALLBRIDGE), "serve", "--port", str(port), env=environment, stdout=log, stderr=log, cwd=tmp_path
        )
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(400):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"callbridge serve did not become ready: {log_path.read_text()}")
        assert '"event": "engine.local"' in log_path.read_text()
        script = CallScript([SayWhenAgentDone(b"", quiet_ms=600), HangUp()])
        recording = await SimulatedCaller(f"http://127.0.0.1:{port}", token).place_call(script, max_duration_s=30)
        assert len(recording.heard_audio) > 8000  # more than a second of greeting, in a real voice
        assert audio.rms(bytes(recording.heard_audio[:16000])) > 300
    finally:
        process.terminate()
        await process.wait()
