"""``callbridge simulate`` as a process, against ``callbridge serve`` as a process whose model is the offline engine
(or is unreachable): the demo's script format, voice, live transcript and summary, and its exit status."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from callbridge.core.transcript import TranscriptLine
from callbridge.engine.agent import LocalEngine
from callbridge.engine.demo import (
    LiveTranscript,
    ScriptLine,
    ToolUse,
    Utterance,
    barged_in,
    summarize,
    summary_text,
)
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallRecording, ClearRecord
from callbridge.testing.fake_realtime import FakeBehavior
from support import API_TOKEN, AUTH_TOKEN, CALLBRIDGE, free_port, serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = """\
# two lines, each once the agent's turn is over
Hi, I'd like to book an appointment please.
Tuesday afternoon at three please.
"""
TOOLS = "callbridge.engine.demo:tools"
FRAME_BYTES = 160  # 20 ms of μ-law


@pytest.fixture
async def engine() -> AsyncIterator[LocalEngine]:
    """The offline engine, for ``callbridge serve`` to take as its model (CALLBRIDGE_REALTIME_URL)."""
    async with LocalEngine() as running:
        yield running


async def simulate(cwd: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """``callbridge simulate`` with the server's Twilio token, and none of this machine's settings: exit status,
    stdout, stderr."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CALLBRIDGE_", "TWILIO_", "OPENAI_"))  # nothing the server under test did not set
    }
    process = await asyncio.create_subprocess_exec(
        *(str(CALLBRIDGE), "simulate", *args),
        env={**environment, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_script_with_json_prints_both_sides_and_the_tool_call(tmp_path: Path, engine: LocalEngine) -> None:
    (tmp_path / "script.txt").write_text(SCRIPT)
    env = {"CALLBRIDGE_REALTIME_URL": engine.url, "CALLBRIDGE_API_TOKEN": API_TOKEN, "CALLBRIDGE_TOOLS": TOOLS}
    async with serve(tmp_path, FakeBehavior(), **env) as service:
        status, out, err = await simulate(
            tmp_path, "--url", service.base_url, "--script", "script.txt", "--json", CALLBRIDGE_API_TOKEN=API_TOKEN
        )
    assert status == 0, (out, err)
    summary = json.loads(out)  # one JSON object, and nothing else on stdout
    lines = summary["transcript"]
    assert [line["speaker"] for line in lines] == ["agent", "caller", "agent", "caller", "agent"], lines
    assert "what day and time" in lines[2]["text"].lower()
    assert "tuesday at 3 pm is free" in lines[4]["text"].lower()
    assert summary["caller_wer"] <= 0.2, lines
    (tool,) = summary["tool_calls"]
    assert tool["name"] == "check_availability"
    assert tool["arguments"] == {"day": "tuesday", "time": "3 pm"}
    assert tool["result"]["available"] is True
    assert summary["ok"] and summary["problems"] == [] and summary["transcript_source"] == "server"
    assert summary["call"]["ended_by"] == "caller"  # the script ended the call: it hung up after the last answer
    assert len(summary["turn_latency_ms"]["turns"]) == 2


async def test_seconds_bounds_the_call_and_without_api_token_the_caller_tells_it(
    tmp_path: Path, engine: LocalEngine
) -> None:
    """The default script (three lines) takes longer than 8 s: the call is cut there. The audio that reached the
    model is counted at the model, in 20 ms frames: the call's real length, whatever the machine's load."""
    seconds = 8
    async with serve(tmp_path, FakeBehavior(), CALLBRIDGE_REALTIME_URL=engine.url) as service:
        status, out, err = await simulate(tmp_path, "--url", service.base_url, "--seconds", str(seconds))
        await service.wait_for_logs("call.summary", 1)
    assert status == 0, (out, err)
    (session,) = engine.sessions
    assert len(session.audio) // FRAME_BYTES <= seconds * 50 + 2, len(session.audio)
    assert "no API token" in out  # and so the caller's own account, with a hint
    assert "caller Hi, I'd like to book an appointment please." in out  # the default script, never a bare tone
    assert "s of speech)" in out  # the agent's turns, by how long they were
    assert "OK: " in out and "the time limit ended the call" in out
    assert "interrupted" not in out  # the time limit cut the agent off, the caller did not


async def test_a_server_whose_model_is_unreachable_fails(tmp_path: Path) -> None:
    unreachable = f"ws://127.0.0.1:{free_port()}/v1/realtime"
    env = {"CALLBRIDGE_REALTIME_URL": unreachable, "CALLBRIDGE_API_TOKEN": API_TOKEN}
    async with serve(tmp_path, FakeBehavior(), **env) as service:
        status, out, err = await simulate(tmp_path, "--url", service.base_url, "--json", CALLBRIDGE_API_TOKEN=API_TOKEN)
    assert status == 1, (out, err)
    summary = json.loads(out)
    assert not summary["ok"] and summary["agent_turns"] == 0
    assert summary["problems"][0].startswith("the agent never answered"), summary["problems"]
    assert summary["call"]["ended_by"] == "server"


def assert_one_line(status: int, err: str, expected_status: int, named: str) -> None:
    lines = err.strip().splitlines()
    assert status == expected_status, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err


async def test_mistakes_are_one_line_naming_what_to_fix(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "empty.txt").write_text("# nothing to say\n")
    (tmp_path / "script.txt").write_text(SCRIPT)
    status, _, err = await simulate(tmp_path, "--url", closed, TWILIO_AUTH_TOKEN="")
    assert_one_line(status, err, 2, "TWILIO_AUTH_TOKEN")
    status, _, err = await simulate(tmp_path, "--url", closed, "--script", "script.txt", "--wav", "call.wav")
    assert_one_line(status, err, 2, "--wav")
    status, _, err = await simulate(tmp_path, "--url", closed, "--script", "empty.txt")
    assert_one_line(status, err, 2, "empty.txt")
    status, _, err = await simulate(tmp_path, "--url", closed, "--token", "t")
    assert_one_line(status, err, 3, closed)
    async with serve(tmp_path, FakeBehavior(), CALLBRIDGE_API_TOKEN=API_TOKEN) as service:
        status, _, err = await simulate(tmp_path, "--url", service.base_url, "--token", "wrong")
        assert_one_line(status, err, 4, "CALLBRIDGE_API_TOKEN")
        status, _, err = await simulate(tmp_path, "--url", service.base_url, TWILIO_AUTH_TOKEN="wrong")
        assert_one_line(status, err, 4, "TWILIO_AUTH_TOKEN")


# --- the transcript and the summary, on a call made up here ------------------------------------------------------


def agent_line(start_ms: int, end_ms: int, *, interrupted: bool) -> TranscriptLine:
    return TranscriptLine("CA1", "agent", "We are open", start_ms, end_ms, f"item-{start_ms}", interrupted=interrupted)


def test_only_a_barge_in_interrupts_a_line() -> None:
    """The server marks a line cut short by the end of the call interrupted too; only a clear while it played
    (Twilio's buffer emptied for a barge-in) makes it one the caller interrupted."""
    assert barged_in(agent_line(1000, 3000, interrupted=True), [2990])
    assert not barged_in(agent_line(1000, 3000, interrupted=True), [])  # the call ended
    assert not barged_in(agent_line(5000, 7000, interrupted=True), [2990])  # an earlier line's barge-in
    assert not barged_in(agent_line(1000, 3000, interrupted=False), [2990])


def made_up_call(*, barge_in: bool, clear_at_s: float | None) -> tuple[CallRecording, list[Utterance]]:
    """The caller says one line at 1 s (0.5 s of speech); the agent answers from 2 s to 4 s."""
    recording = CallRecording("CA1", "MZ1", "<Response/>", {})
    recording.sent_audio += audio.silence(5000)
    recording.step_times = [("SayWhenHearing:triggered" if barge_in else "SayWhenAgentDone:triggered", 1.0)]
    for step in range(100):
        recording.heard_audio += audio.tone(20)
        recording.heard_timeline.append((2.0 + step * 0.02, FRAME_BYTES))
    if clear_at_s is not None:
        recording.clears.append(ClearRecord(clear_at_s, 0, len(recording.heard_audio)))
    recording.ended_by, recording.close_code, recording.duration_s = "caller", 1000, 5.0
    return recording, [Utterance(ScriptLine("hello there", barge_in), audio.tone(500), 500)]


def test_summary_without_a_barge_in_omits_barge_in_stop_and_a_line_cut_by_the_hang_up(tmp_path: Path) -> None:
    recording, utterances = made_up_call(barge_in=False, clear_at_s=None)
    lines = [
        TranscriptLine("CA1", "caller", "hello there", 1000, 1500, "c1"),
        agent_line(2000, 4000, interrupted=True),  # the caller hung up before it had all played
    ]
    uses = [ToolUse.from_event({"name": "lookup", "arguments": '{"q": 1}', "output": '{"a": 2}', "ok": True}, 1900)]
    summary = summarize(recording, utterances, lines, tmp_path, tool_calls=uses, strict=False)
    assert summary["ok"] and summary["barge_in_stop_ms"] is None
    assert summary["transcript"][1]["interrupted"] is False
    assert summary["tool_calls"] == [
        {"at_ms": 1900, "name": "lookup", "arguments": {"q": 1}, "result": {"a": 2}, "ok": True}
    ]
    assert summary["turn_latency_ms"]["turns"] == [500]  # from the end of the caller's speech to the answer
    text = "\n".join(summary_text(summary))
    assert "barge-in stop" not in text and "None" not in text and "1 tool call" in text
    saved = Path(summary["files"]["transcript"]).read_text()
    assert '   tool  lookup({"q": 1}) → {"a": 2}' in saved
    assert "[call ended]" in saved and "[interrupted]" not in saved


def test_live_transcript_prints_each_line_and_tool_call_once_in_order() -> None:
    console = Console(record=True, width=200)
    live = LiveTranscript(console)
    caller = TranscriptLine("CA1", "caller", "is tuesday free", 1000, 2000, "c1")
    live.add([agent_line(2500, 4000, interrupted=False)])
    live.add(
        [caller, agent_line(2500, 4000, interrupted=False)],  # the caller's line lands late; the agent's again
        [ToolUse(2400, "check_availability", {"day": "tuesday"}, {"available": True}, True)],
    )
    printed = console.export_text().splitlines()
    assert [line.split()[1] for line in printed] == ["agent", "caller", "tool"]
    assert printed[2].endswith('check_availability({"day": "tuesday"}) → {"available": true}')
    assert [line.item_id for line in live.lines] == ["item-2500", "c1"] and len(live.tool_calls) == 1
