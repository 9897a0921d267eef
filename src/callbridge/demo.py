"""The offline demo and the ``simulate`` command: a whole phone call through the real bridge, on this machine.

The demo starts three things on loopback: callbridge itself (the same ASGI app ``callbridge serve`` runs, under
uvicorn), the fake Realtime server from :mod:`callbridge.testing`, and a simulated Twilio caller that places a
signed call, speaks, barges in once on a long answer, and hangs up. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from callbridge import audio
from callbridge.api.app import create_app
from callbridge.config import Settings
from callbridge.core.transcript import TranscriptLine
from callbridge.testing.caller import CallRecording, CallScript, HangUp, Pause, Say, SayWhenHearing, SimulatedCaller
from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer
from callbridge.tools import ToolRegistry

tools = ToolRegistry()


@tools.tool
async def check_availability(day: str, time: str) -> dict[str, Any]:
    """Check whether an appointment slot is free.

    Args:
        day: the day the caller asked for, e.g. "Tuesday"
        time: the time of day, e.g. "3 pm"
    """
    return {"day": day, "time": time, "available": day.lower() != "sunday"}


CALLER_LINES = [
    "Hi, I'd like to book an appointment for Tuesday at three.",
    "Actually, tell me everything you know about your opening hours.",
    "Sorry, wait. Tuesday at three is fine, thank you. Bye.",
]


def _long_answer(transcript: str) -> str:
    if "opening hours" in transcript:
        return (
            "Of course. We are open Monday to Friday from eight in the morning until six in the evening, "
            "on Saturdays from nine until one, and we are closed on Sundays and public holidays. During the "
            "summer months we also open late on Thursdays until eight."
        )
    if "book" in transcript:
        return "Tuesday at three is available. Shall I book it for you?"
    return "You're welcome. Your appointment is booked. Goodbye!"


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
            self.console.print(
                f"[dim]{line.start_ms / 1000:6.2f}s[/dim] [{colour}]{line.speaker:>6}[/{colour}] {line.text}{cut}"
            )


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, sock: socket.socket, sink: LiveTranscriptSink) -> AsyncIterator[None]:
    """callbridge's app under uvicorn, in this event loop, on an already bound socket."""
    app = create_app(settings, tools=tools, sink=sink)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, lifespan="off", ws_max_size=settings.max_message_bytes)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


def _demo_script() -> CallScript:
    """Wait for the greeting, ask, ask a question with a long answer, barge in on it, then confirm."""
    utterance = [audio.tone(1400, 300 + 40 * n) for n in range(len(CALLER_LINES))]
    return CallScript(
        [
            Pause(4500),
            Say(utterance[0]),
            Pause(5500),
            Say(utterance[1]),
            SayWhenHearing(utterance[2], after_heard_ms=3000),
            Pause(4500),
            HangUp(),
        ]
    )


async def run_demo(output: Path, *, json_output: bool = False) -> bool:
    console = None if json_output else Console(highlight=False)
    token, sock = secrets.token_hex(16), _free_socket()
    port = sock.getsockname()[1]
    sink = LiveTranscriptSink(console)
    behavior = FakeBehavior(
        transcripts=list(CALLER_LINES),
        reply=_long_answer,
        greeting="Hello, thanks for calling Bright Dental. How can I help you today?",
    )
    async with FakeRealtimeServer(behavior) as fake:
        settings = Settings(
            CALLBRIDGE_PUBLIC_URL=f"http://127.0.0.1:{port}",
            CALLBRIDGE_REALTIME_URL=fake.url,
            TWILIO_AUTH_TOKEN=token,
            CALLBRIDGE_SECRET=secrets.token_hex(16),
            CALLBRIDGE_AGENT_GREETING=behavior.greeting,
            _env_file=None,
        )
        if console:
            console.print(
                f"[bold]callbridge demo[/bold]: bridge on 127.0.0.1:{port}, local Realtime server at {fake.url}"
            )
        started = time.monotonic()
        async with running_bridge(settings, sock, sink):
            caller = SimulatedCaller(f"http://127.0.0.1:{port}", token)
            recording = await caller.place_call(_demo_script(), hang_up_after_s=None, max_duration_s=60)
            await asyncio.sleep(0.3)  # let the last transcript lines land
        truncations = [t for session in fake.sessions for t in session.truncations]
    summary = _summary(recording, sink.lines, truncations, output, time.monotonic() - started)
    if json_output:
        print(json.dumps(summary))
    elif console:
        console.print(
            f"[bold]{summary['turns']} turns[/bold], {summary['barge_ins']} barge-in, "
            f"call {summary['duration_s']:.1f} s; files: {', '.join(summary['files'].values())}"
        )
    return bool(summary["ok"])


def _summary(
    recording: CallRecording,
    lines: list[TranscriptLine],
    truncations: list[dict[str, Any]],
    output: Path,
    duration: float,
) -> dict[str, Any]:
    wav = output / "call.wav"
    audio.write_wav(wav, list(recording.stereo_channels()))
    transcript = output / "transcript.txt"
    ordered = sorted(lines, key=lambda line: line.start_ms)
    transcript.write_text(
        "".join(f"{line.start_ms / 1000:7.2f}  {line.speaker:>6}  {line.text}{_cut_mark(line)}\n" for line in ordered)
    )
    caller_lines = [line for line in ordered if line.speaker == "caller"]
    agent_lines = [line for line in ordered if line.speaker == "agent"]
    ok = bool(caller_lines) and bool(agent_lines) and len(recording.clears) >= 1 and not recording.protocol_errors
    return {
        "ok": ok,
        "turns": len(ordered),
        "caller_lines": len(caller_lines),
        "agent_lines": len(agent_lines),
        "barge_ins": len(recording.clears),
        "truncated_at_ms": [t["audio_end_ms"] for t in truncations],
        "heard_agent_ms": len(recording.heard_audio) // audio.BYTES_PER_MS,
        "duration_s": round(duration, 2),
        "files": {"wav": str(wav), "transcript": str(transcript)},
    }


def _cut_mark(line: TranscriptLine) -> str:
    return " [interrupted]" if line.interrupted else ""


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
        f"heard {len(recording.heard_audio) // 8} ms "
        f"of agent audio, {len(recording.clears)} clear(s), close code {recording.close_code}"
    )
    for error in recording.protocol_errors:
        console.print(f"[red]protocol error[/red] {error}")
    if save:
        audio.write_wav(save, list(recording.stereo_channels()))
        console.print(f"saved {save}")
    return not recording.protocol_errors and recording.close_code in (1000, None)
