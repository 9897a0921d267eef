"""The offline demo and the ``simulate`` command: a whole phone call through the real bridge, on this machine.

``callbridge demo`` starts callbridge itself (the app ``callbridge serve`` runs, under uvicorn) with no API key and
no Realtime URL, so it brings up the local engine; then a simulated Twilio caller places a signed call and speaks
its lines with a real text-to-speech voice, streamed as μ-law frames in real time. The recognizer only ever gets
the μ-law audio the bridge relayed. The caller barges in once on a long answer. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console

from callbridge.api.app import create_app
from callbridge.config import Settings
from callbridge.core.transcript import TranscriptLine
from callbridge.realtime.server import ServerSession
from callbridge.service.tools import ToolRegistry
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import (
    CallRecording,
    CallScript,
    HangUp,
    Pause,
    Say,
    SayWhenAgentDone,
    SayWhenHearing,
    SimulatedCaller,
    Step,
)
from callbridge.transport.server import uvicorn_config

tools = ToolRegistry()


@tools.tool
async def check_availability(day: str, time: str) -> dict[str, Any]:
    """Check whether an appointment slot is free.

    Args:
        day: the day the caller asked for, e.g. "Tuesday"
        time: the time of day, e.g. "3 pm"
    """
    return {"day": day, "time": time, "available": day.lower() != "sunday"}


@tools.tool
async def book_appointment(day: str, time: str) -> dict[str, Any]:
    """Book an appointment slot the caller has accepted.

    Args:
        day: the day, e.g. "Tuesday"
        time: the time of day, e.g. "3 pm"
    """
    return {"day": day, "time": time, "booked": True, "reference": f"BD-{secrets.token_hex(3).upper()}"}


DEFAULT_SCRIPT = """\
# One caller line per line. A line starting with ">" barges in while the agent is still speaking.
Hi, I'd like to book an appointment please.
Tuesday afternoon at three please.
Actually, what are your opening hours?
> Yes please, that works.
No thank you, goodbye.
"""
BARGE_IN_AFTER_MS = 1500
CALLER_VOICE_LENGTH_SCALE = 1.1  # the caller speaks a little slower than the agent's rendering of the voice


@dataclass(frozen=True)
class ScriptLine:
    text: str
    barge_in: bool


def parse_script(text: str) -> list[ScriptLine]:
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        barge_in = line.startswith(">")
        lines.append(ScriptLine(line.lstrip("> ").strip(), barge_in))
    if not lines:
        raise ValueError("the script has no caller lines")
    return lines


@dataclass
class LiveTranscriptSink:
    """Prints each transcript line as it completes, and keeps them."""

    console: Console | None
    lines: list[TranscriptLine] = field(default_factory=list)

    async def write(self, line: TranscriptLine) -> None:
        self.lines.append(line)
        if self.console is not None:
            colour = "cyan" if line.speaker == "caller" else "green"
            cut = " [dim](interrupted)[/dim]" if line.interrupted else ""
            when = f"[dim]{line.start_ms / 1000:6.2f}s[/dim]"
            self.console.print(f"{when} [{colour}]{line.speaker:>6}[/{colour}] {line.text}{cut}")


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, sock: socket.socket, sink: LiveTranscriptSink) -> AsyncIterator[FastAPI]:
    """callbridge's app under uvicorn, in this event loop, on an already bound socket."""
    app = create_app(settings, tools=tools, sink=sink)
    server = uvicorn.Server(uvicorn_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the bridge did not start")
        await asyncio.sleep(0.01)
    try:
        yield app
    finally:
        server.should_exit = True
        await task


@dataclass(frozen=True)
class Utterance:
    line: ScriptLine
    audio: bytes
    speech_ms: int  # where speech ends within the audio (synthesized audio ends with a little silence)


def synthesize_caller(lines: list[ScriptLine]) -> list[Utterance]:
    """The caller's lines in a real voice, as 8 kHz μ-law."""
    from callbridge.engine.speech import Synthesizer

    voice = Synthesizer(length_scale=CALLER_VOICE_LENGTH_SCALE)
    utterances = []
    for line in lines:
        speech = b"".join(voice.synthesize(line.text))
        utterances.append(Utterance(line, speech, _speech_end_ms(speech)))
    return utterances


def _speech_end_ms(ulaw: bytes, frame: int = 160, threshold: float = 300.0) -> int:
    frames = [ulaw[i : i + frame] for i in range(0, len(ulaw), frame)]
    loud = [i for i, chunk in enumerate(frames) if audio.rms(chunk) >= threshold]
    return ((loud[-1] + 1) * 20) if loud else len(ulaw) // audio.BYTES_PER_MS


def _call_script(utterances: list[Utterance]) -> CallScript:
    steps: list[Step] = []
    for utterance in utterances:
        if utterance.line.barge_in:
            steps.append(SayWhenHearing(utterance.audio, after_heard_ms=BARGE_IN_AFTER_MS))
        else:
            steps.append(SayWhenAgentDone(utterance.audio, quiet_ms=800))
    steps += [SayWhenAgentDone(b"", quiet_ms=800), Pause(300), HangUp()]
    return CallScript(steps)


@dataclass
class DemoCall:
    """Everything a demo call produced, for the summary and for tests."""

    recording: CallRecording
    utterances: list[Utterance]
    lines: list[TranscriptLine]
    engine_sessions: list[ServerSession]


async def place_demo_call(
    script: str = DEFAULT_SCRIPT, console: Console | None = None, output: Path = Path("callbridge-demo")
) -> DemoCall:
    """Start the bridge (and with it the local engine) on loopback and place the scripted call."""
    lines = parse_script(script)
    utterances = await asyncio.to_thread(synthesize_caller, lines)
    token, sock = secrets.token_hex(16), _bound_socket()
    port = sock.getsockname()[1]
    sink = LiveTranscriptSink(console)
    await asyncio.to_thread(output.mkdir, parents=True, exist_ok=True)
    folder = await asyncio.to_thread(output.resolve)
    settings = Settings(
        openai_api_key=None,
        realtime_url=None,  # → the local engine
        public_url=f"http://127.0.0.1:{port}",
        twilio_auth_token=token,
        secret=secrets.token_hex(16),
        agent_greeting="Hello, thanks for calling Bright Dental. How can I help you today?",
        database_url=f"sqlite+aiosqlite:///{folder / 'callbridge.db'}",  # the default store, locally
        _env_file=None,
    )
    if console:
        console.print(f"[bold]callbridge demo[/bold]: a simulated call to 127.0.0.1:{port}, local engine, no network")
    async with running_bridge(settings, sock, sink) as app:
        caller = SimulatedCaller(f"http://127.0.0.1:{port}", token)
        recording = await caller.place_call(_call_script(utterances), max_duration_s=120)
        await asyncio.sleep(0.5)  # the last transcript lines land after the hang-up
        sessions = list(app.state.engine.sessions)
    return DemoCall(recording, utterances, sink.lines, sessions)


async def run_demo(output: Path, *, script: str = DEFAULT_SCRIPT, json_output: bool = False) -> dict[str, Any]:
    """Place the demo call; returns the summary (``ok`` tells whether the call succeeded)."""
    console = None if json_output else Console(highlight=False)
    call = await place_demo_call(script, console, output)
    summary = summarize(call.recording, call.utterances, call.lines, output)
    if console:
        latency = summary["turn_latency_ms"]
        console.print(
            f"[bold]{'OK' if summary['ok'] else 'FAILED'}[/bold]: {summary['turns']} turns, caller WER "
            f"{summary['caller_wer']:.0%}, turn latency p50 {latency['p50']} ms / p95 {latency['p95']} ms, "
            f"barge-in stop {summary['barge_in_stop_ms']} ms"
        )
        console.print(f"files: {summary['files']['wav']}, {summary['files']['transcript']}")
    return summary


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def summarize(
    recording: CallRecording, utterances: list[Utterance], lines: list[TranscriptLine], output: Path
) -> dict[str, Any]:
    import jiwer

    ordered = sorted(lines, key=lambda line: line.start_ms)
    caller = [line for line in ordered if line.speaker == "caller"]
    agent = [line for line in ordered if line.speaker == "agent"]
    reference = _normalize(" ".join(u.line.text for u in utterances))
    hypothesis = _normalize(" ".join(line.text for line in caller))
    wer = float(jiwer.wer(reference, hypothesis)) if hypothesis else 1.0

    # When each line was spoken, on the caller's clock (seconds since the stream started).
    starts = [at for name, at in recording.step_times if name.endswith(":triggered")]
    spoken = [(start, start + u.speech_ms / 1000) for start, u in zip(starts, utterances, strict=False)]
    heard_at = [at for at, _ in recording.heard_timeline]
    latencies = []
    for _, end in spoken:
        first = next((at for at in heard_at if at > end), None)
        if first is not None:
            latencies.append(round((first - end) * 1000))
    barge = next((i for i, u in enumerate(utterances) if u.line.barge_in), None)
    barge_in_stop_ms = None
    if barge is not None and barge < len(spoken) and recording.clears:
        barge_in_stop_ms = round((recording.clears[0].at_s - spoken[barge][0]) * 1000)

    output.mkdir(parents=True, exist_ok=True)
    wav, transcript = output / "call.wav", output / "transcript.txt"
    audio.write_wav(wav, list(recording.stereo_channels()))
    transcript.write_text(
        "".join(
            f"{line.start_ms / 1000:7.2f}  {line.speaker:>6}  {line.text}{' [interrupted]' * line.interrupted}\n"
            for line in ordered
        )
    )
    ok = (
        not recording.protocol_errors
        and len(spoken) == len(utterances)
        and len(latencies) == len(utterances)
        and len(caller) == len(utterances)
        and (barge is None or barge_in_stop_ms is not None)
    )
    return {
        "ok": ok,
        "turns": len(ordered),
        "caller_wer": round(wer, 3),
        "turn_latency_ms": {
            "p50": round(statistics.median(latencies)) if latencies else None,
            "p95": round(_percentile(latencies, 95)) if latencies else None,
            "turns": latencies,
        },
        "barge_in_stop_ms": barge_in_stop_ms,
        "transcript": [
            {"speaker": line.speaker, "text": line.text, "start_ms": line.start_ms, "interrupted": line.interrupted}
            for line in ordered
        ],
        "agent_turns": len(agent),
        "files": {"wav": str(wav), "transcript": str(transcript)},
    }


def _percentile(values: list[int], percent: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def run_simulation(
    url: str, auth_token: str, *, public_url: str | None, wav: Path | None, seconds: float, save: Path | None
) -> bool:
    """``callbridge simulate``: one call against a running server, printing what happened."""
    console = Console(highlight=False)
    speech = audio.read_wav_as_ulaw(wav) if wav else audio.tone(1500, 350)
    script = CallScript([Pause(3000), Say(speech)])
    caller = SimulatedCaller(url, auth_token, public_url=public_url)
    recording = await caller.place_call(script, hang_up_after_s=seconds, max_duration_s=seconds + 30)
    console.print(
        f"call {recording.call_sid}: sent {len(recording.sent_audio) // 8} ms, "
        f"heard {len(recording.heard_audio) // 8} ms of agent audio, {len(recording.clears)} clear(s), "
        f"close code {recording.close_code}"
    )
    for error in recording.protocol_errors:
        console.print(f"[red]protocol error[/red] {error}")
    if save:
        audio.write_wav(save, list(recording.stereo_channels()))
        console.print(f"saved {save}")
    return not recording.protocol_errors and recording.close_code in (1000, None)
