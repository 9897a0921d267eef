"""The offline demo and the ``simulate`` command: a scripted phone call through the real bridge.

Both place the same kind of call. A simulated Twilio caller places a signed call and speaks a script's lines with
a real text-to-speech voice, streamed as μ-law frames in real time: each line once the agent has finished its
turn, a line starting with ``>`` while the agent is still speaking (a barge-in). The transcript prints live, with
the tool calls the agent made, and a summary ends the call: turns, the caller's word error rate, turn latency,
how soon a barge-in stopped the agent, and what fell short.

``callbridge demo`` starts callbridge itself (the app ``callbridge serve`` runs, under uvicorn) with no API key and
no Realtime URL, so it brings up the local engine; the recognizer only ever gets the μ-law audio the bridge relayed
and nothing leaves the machine. ``callbridge simulate`` calls a callbridge that is already running.

The transcript is the server's own (what the model heard, what the agent said, the tools it called), read from its
REST API while the call goes on. Without an API token the caller reports what it knows itself: its lines as
scripted and when the agent spoke.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import statistics
import uuid
import wave
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.markup import escape

from callbridge.api.app import create_app
from callbridge.config import Settings
from callbridge.core.transcript import TranscriptLine, TranscriptSink
from callbridge.realtime.server import ServerSession
from callbridge.service.tools import ToolRegistry
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import (
    CallRecording,
    CallRefused,
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
SIMULATE_SCRIPT = """\
# What `callbridge simulate` says without --script: a short call, in the format of the demo's script.
Hi, I'd like to book an appointment please.
Tuesday afternoon at three please.
No thank you, goodbye.
"""
BARGE_IN_AFTER_MS = 1500
CALLER_VOICE_LENGTH_SCALE = 1.1  # the caller speaks a little slower than the agent's rendering of the voice
RECORDING_LEAD_IN_MS = 500  # a recording (--wav) starts this far into the call, as CallScript.from_wav has it
POLL_S = 0.5  # how often the server's transcript is read during the call
SETTLE_S = 10.0  # how long after the hang-up the server may take to keep the call (its last lines and events)
AGENT_TURN_GAP_S = 0.5  # heard audio this far apart is two agent turns (when the caller tells the turns itself)
BARGE_IN_SLACK_MS = 1000  # a clear this long after an agent line's heard end still cut that line

Source = Literal["server", "caller"]
"""Where a call's transcript came from: the server's REST API, or the caller's own account of the call."""


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


@dataclass(frozen=True)
class ToolUse:
    """A tool the agent called during the call, with what it returned."""

    at_ms: int  # when the result was kept, from the start of the call
    name: str
    arguments: Any
    result: Any
    ok: bool

    @classmethod
    def from_event(cls, data: dict[str, Any], at_ms: int) -> ToolUse:
        """From a ``tool_call`` event of the call's record (arguments and output are JSON text)."""
        return cls(
            at_ms, str(data.get("name")), _json(data.get("arguments")), _json(data.get("output")), bool(data.get("ok"))
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "at_ms": self.at_ms,
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "ok": self.ok,
        }

    def text(self) -> str:
        failed = "" if self.ok else " (failed)"
        return f"{self.name}({_compact(self.arguments)}) → {_compact(self.result)}{failed}"


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- what the call produced, printed as it comes ------------------------------------------------------------------


def barged_in(line: TranscriptLine, clears_ms: Iterable[int]) -> bool:
    """Whether the caller cut this line off: the server marks a line interrupted when the call ended before the
    caller heard all of it too, but only a barge-in clears Twilio's buffer while the line plays."""
    return line.interrupted and any(line.start_ms <= at_ms <= line.end_ms + BARGE_IN_SLACK_MS for at_ms in clears_ms)


def _line_suffix(line: TranscriptLine, clears_ms: Iterable[int]) -> str:
    if not line.interrupted:
        return ""
    return "interrupted" if barged_in(line, clears_ms) else "call ended"


def _line_text(line: TranscriptLine) -> str:
    """A line's words; a line without words (not understood, or told by the caller) by how long it lasted."""
    return line.text or f"({(line.end_ms - line.start_ms) / 1000:.1f} s of speech)"


def _entry(at_ms: int, who: str, colour: str, text: str) -> str:
    return f"[dim]{at_ms / 1000:6.2f}s[/dim] [{colour}]{who:>6}[/{colour}] {text}"


def line_markup(line: TranscriptLine, suffix: str = "") -> str:
    """One transcript line as the live transcript prints it (rich markup), with why it was cut short, if it was."""
    cut = f" [dim]({suffix})[/dim]" if suffix else ""
    colour = "cyan" if line.speaker == "caller" else "green"
    return _entry(line.start_ms, line.speaker, colour, escape(_line_text(line)) + cut)


def tool_markup(use: ToolUse) -> str:
    return _entry(use.at_ms, "tool", "yellow", escape(use.text()))


@dataclass
class LiveTranscript:
    """The call's transcript lines and tool calls, each printed (to ``console``, when given) once it is known.

    As the caller's event hook it also notes when Twilio's buffer was cleared, which tells a barge-in from a hang-up.
    """

    console: Console | None
    lines: list[TranscriptLine] = field(default_factory=list)
    tool_calls: list[ToolUse] = field(default_factory=list)
    clears_ms: list[int] = field(default_factory=list)
    _seen: set[tuple[str, str, int]] = field(default_factory=set, init=False)
    _t0: float | None = field(default=None, init=False)

    def add(self, lines: Iterable[TranscriptLine], uses: Iterable[ToolUse] = ()) -> None:
        """Keep and print the lines not seen yet and the tool calls (each given once), in the order they happened."""
        new: list[tuple[int, TranscriptLine | ToolUse]] = [(use.at_ms, use) for use in uses]
        for line in lines:
            key = (line.speaker, line.item_id, line.start_ms)
            if key not in self._seen:
                self._seen.add(key)
                new.append((line.start_ms, line))
        for _, entry in sorted(new, key=lambda pair: pair[0]):
            if isinstance(entry, ToolUse):
                self.tool_calls.append(entry)
                markup = tool_markup(entry)
            else:
                self.lines.append(entry)
                markup = line_markup(entry, _line_suffix(entry, self.clears_ms))
            if self.console is not None:
                self.console.print(markup)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """The caller's event hook: the stream's start, and each ``clear`` on the caller's clock."""
        now = asyncio.get_running_loop().time()
        if kind == "sent" and data.get("event") == "start":
            self._t0 = now
        elif kind == "received" and data.get("event") == "clear" and self._t0 is not None:
            self.clears_ms.append(round((now - self._t0) * 1000))


@dataclass
class LiveTranscriptSink:
    """A transcript sink for a bridge run in this process: keeps each line and prints it (to ``console``, when
    given) as it completes."""

    console: Console | None
    lines: list[TranscriptLine] = field(default_factory=list)

    async def write(self, line: TranscriptLine) -> None:
        self.lines.append(line)
        if self.console is not None:
            self.console.print(line_markup(line, "interrupted" if line.interrupted else ""))


class ServerTranscript:
    """One call as the server keeps it, read from its REST API: the transcript lines and the tool calls."""

    def __init__(self, client: httpx.AsyncClient, call_sid: str, live: LiveTranscript) -> None:
        self.client = client
        self.call_sid = call_sid
        self.live = live
        self.record: dict[str, Any] | None = None
        self._last_event = 0  # the id of the last event read: a call's events are numbered in order
        self._lines_read = 0

    async def follow(self) -> None:
        """Read what is new every :data:`POLL_S` seconds, until cancelled (a failed read is tried again)."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await self.read()
            await asyncio.sleep(POLL_S)

    async def settle(self, seconds: float = SETTLE_S) -> None:
        """After the hang-up: wait until the server has kept the call (its lines and events are all written by
        then), and read them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            self.record = await self._get("")
            if self.record is not None and self.record.get("ended_at"):
                break
            await asyncio.sleep(0.1)
        await self.read(final=True)

    async def read(self, *, final: bool = False) -> None:
        """The transcript; the tool calls when it has new lines (a tool's result comes before the agent's line that
        tells it) and at the end."""
        if self.record is None or not self.record.get("started_at"):
            self.record = await self._get("")
            if self.record is None:
                return  # not on record yet
        transcript = await self._get("/transcript") or {}
        lines = [_transcript_line(line) for line in transcript.get("lines", [])]
        uses = await self._tool_uses(self.record) if final or len(lines) > self._lines_read else []
        self._lines_read = len(lines)
        self.live.add(lines, uses)

    async def _tool_uses(self, record: dict[str, Any]) -> list[ToolUse]:
        """The tool calls not read yet, timed from the start of the call."""
        events = [event for event in await self._get("/events") or [] if event["id"] > self._last_event]
        self._last_event = max([self._last_event, *(event["id"] for event in events)])
        started = _timestamp(record.get("started_at"))
        return [
            ToolUse.from_event(event["data"], _ms_since(started, _timestamp(event.get("created_at"))))
            for event in events
            if event.get("kind") == "tool_call"
        ]

    async def _get(self, path: str) -> Any:
        response = await self.client.get(f"/api/calls/{self.call_sid}{path}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()


def _transcript_line(data: dict[str, Any]) -> TranscriptLine:
    return TranscriptLine(
        call_sid=data["call_sid"],
        speaker=data["speaker"],
        text=data["text"],
        start_ms=data["start_ms"],
        end_ms=data["end_ms"],
        item_id=data["item_id"],
        interrupted=data.get("interrupted", False),
        failed=data.get("failed", False),
    )


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _ms_since(start: datetime | None, at: datetime | None) -> int:
    return round((at - start).total_seconds() * 1000) if start is not None and at is not None else 0


# --- the caller ---------------------------------------------------------------------------------------------------


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


def recorded_utterance(speech: bytes) -> Utterance:
    """A recording the caller plays as it is (its words unknown)."""
    return Utterance(ScriptLine("", barge_in=False), speech, _speech_end_ms(speech))


def caller_part(script: Path | None, wav: Path | None, default: str) -> list[ScriptLine] | bytes:
    """What the caller says: a WAV recording, or a script's lines (``default``'s without a script). A file that
    cannot be used is a ``ValueError`` that names it."""
    where = wav or script
    try:
        if wav is not None:
            return audio.read_wav_as_ulaw(wav)
        return parse_script(script.read_text() if script is not None else default)
    except (ValueError, EOFError, wave.Error) as exc:
        raise ValueError(str(exc) if str(where) in str(exc) else f"{where}: {exc}") from None


def _speech_end_ms(ulaw: bytes, frame: int = 160, threshold: float = 300.0) -> int:
    frames = [ulaw[i : i + frame] for i in range(0, len(ulaw), frame)]
    loud = [i for i, chunk in enumerate(frames) if audio.rms(chunk) >= threshold]
    return ((loud[-1] + 1) * 20) if loud else len(ulaw) // audio.BYTES_PER_MS


def _call_script(utterances: list[Utterance], lead_in_ms: int | None = None) -> CallScript:
    """Each line once the agent's turn is over (or, with ``lead_in_ms``, the first one that far into the call), a
    barge-in line into the agent's answer; after the agent's last turn, the hang-up."""
    steps: list[Step] = []
    for utterance in utterances:
        if lead_in_ms is not None and not steps:
            steps += [Pause(lead_in_ms), Say(utterance.audio)]
        elif utterance.line.barge_in:
            steps.append(SayWhenHearing(utterance.audio, after_heard_ms=BARGE_IN_AFTER_MS))
        else:
            steps.append(SayWhenAgentDone(utterance.audio, quiet_ms=800))
    steps += [SayWhenAgentDone(b"", quiet_ms=800), Pause(300), HangUp()]
    return CallScript(steps)


@dataclass
class DemoCall:
    """Everything a scripted call (the demo's, or one ``simulate`` placed) produced, for the summary and for tests."""

    recording: CallRecording
    utterances: list[Utterance]
    lines: list[TranscriptLine]
    engine_sessions: list[ServerSession] = field(default_factory=list)
    tool_calls: list[ToolUse] = field(default_factory=list)
    source: Source = "server"
    record: dict[str, Any] | None = None  # the server's record of the call, when its API was read


async def place_scripted_call(
    caller: SimulatedCaller,
    utterances: list[Utterance],
    live: LiveTranscript,
    *,
    api: httpx.AsyncClient | None,
    seconds: float,
    lead_in_ms: int | None = None,
) -> DemoCall:
    """Place the call, at most ``seconds`` long, printing its transcript as it comes: the server's, read from
    ``api`` during the call; without ``api``, the caller's own account of it, once it is over."""
    call_sid = "CA" + uuid.uuid4().hex
    server = ServerTranscript(api, call_sid, live) if api is not None else None
    following = asyncio.create_task(server.follow()) if server is not None else None
    try:
        recording = await caller.place_call(
            _call_script(utterances, lead_in_ms), max_duration_s=seconds, on_event=live.on_event, call_sid=call_sid
        )
    finally:
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
    if server is None:
        live.add(caller_side_lines(recording, utterances))
        return DemoCall(recording, utterances, live.lines, source="caller")
    await server.settle()
    return DemoCall(recording, utterances, live.lines, tool_calls=live.tool_calls, record=server.record)


def caller_side_lines(recording: CallRecording, utterances: list[Utterance]) -> list[TranscriptLine]:
    """The call as the caller knows it: its lines as scripted, when it spoke them, and the agent's turns (without
    their words) when it heard them."""
    sid = recording.call_sid
    lines = [
        TranscriptLine(sid, "caller", u.line.text, round(start * 1000), round(start * 1000) + u.speech_ms, f"line-{i}")
        for i, (start, u) in enumerate(zip(_spoken_starts(recording), utterances, strict=False))
    ]
    for i, (start, end) in enumerate(_heard_turns(recording)):
        start_ms, end_ms = round(start * 1000), round(end * 1000)
        cut = any(start <= clear.at_s <= end + AGENT_TURN_GAP_S for clear in recording.clears)
        lines.append(TranscriptLine(sid, "agent", "", start_ms, end_ms, f"turn-{i}", interrupted=cut))
    return sorted(lines, key=lambda line: line.start_ms)


def _spoken_starts(recording: CallRecording) -> list[float]:
    """When each caller line began, on the caller's clock: a waiting step when it spoke, a plain one when it began."""
    return [at for name, at in recording.step_times if name.endswith(":triggered") or name == "Say"]


def _heard_turns(recording: CallRecording) -> list[tuple[float, float]]:
    turns: list[tuple[float, float]] = []
    for at, count in recording.heard_timeline:
        end = at + count / audio.BYTES_PER_MS / 1000
        if turns and at - turns[-1][1] <= AGENT_TURN_GAP_S:
            turns[-1] = (turns[-1][0], end)
        else:
            turns.append((at, end))
    return turns


# --- the demo: callbridge and its local engine in this process ----------------------------------------------------


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def running_bridge(
    settings: Settings, sock: socket.socket, sink: TranscriptSink | None = None
) -> AsyncIterator[FastAPI]:
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


async def place_demo_call(
    script: str = DEFAULT_SCRIPT, console: Console | None = None, output: Path = Path("callbridge-demo")
) -> DemoCall:
    """Start the bridge (and with it the local engine) on loopback and place the scripted call."""
    utterances = await asyncio.to_thread(synthesize_caller, parse_script(script))
    token, api_token, sock = secrets.token_hex(16), secrets.token_hex(16), _bound_socket()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    base_url = f"http://{address}"
    await asyncio.to_thread(output.mkdir, parents=True, exist_ok=True)
    folder = await asyncio.to_thread(output.resolve)
    settings = Settings(
        openai_api_key=None,
        realtime_url=None,  # → the local engine
        public_url=base_url,
        twilio_auth_token=token,
        api_token=api_token,  # the live transcript is read from the REST API, as simulate reads it
        secret=secrets.token_hex(16),
        agent_greeting="Hello, thanks for calling Bright Dental. How can I help you today?",
        database_url=f"sqlite+aiosqlite:///{folder / 'callbridge.db'}",  # the default store, locally
        recordings_dir=str(folder / "recordings"),
        _env_file=None,
    )
    if console:
        console.print(f"[bold]callbridge demo[/bold]: a simulated call to {address}, local engine, no network")
    live = LiveTranscript(console)
    async with (
        running_bridge(settings, sock) as app,
        httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_token}"}) as api,
    ):
        call = await place_scripted_call(SimulatedCaller(base_url, token), utterances, live, api=api, seconds=120)
        call.engine_sessions = list(app.state.engine.sessions)
    return call


async def run_demo(output: Path, *, script: str = DEFAULT_SCRIPT, json_output: bool = False) -> dict[str, Any]:
    """Place the demo call; returns the summary (``ok`` tells whether the call succeeded)."""
    console = None if json_output else Console(highlight=False)
    call = await place_demo_call(script, console, output)
    summary = summarize_call(call, output)
    if console:
        print_summary(console, summary)
    return summary


# --- simulate: a call to a callbridge already running -------------------------------------------------------------


async def run_simulation(
    url: str,
    auth_token: str,
    caller_part: list[ScriptLine] | bytes,
    public_urls: list[str],
    api_token: str | None,
    seconds: float,
    *,
    save: Path | None = None,
    json_output: bool = False,
) -> dict[str, Any]:
    """``callbridge simulate``: one call against a running server, with the demo's voice, live transcript and
    summary. ``caller_part`` is the script's lines, or a recording (μ-law) the caller plays half a second in.
    Requests are signed for the first of ``public_urls`` the server accepts (the URL it believes it has).
    The summary's ``ok``: the agent answered, and the server spoke Twilio's protocol."""
    console = None if json_output else Console(highlight=False)
    if isinstance(caller_part, bytes):
        utterances, lead_in_ms = [recorded_utterance(caller_part)], RECORDING_LEAD_IN_MS
    else:
        utterances, lead_in_ms = await asyncio.to_thread(synthesize_caller, caller_part), None
    if console:
        console.print(f"[bold]callbridge simulate[/bold]: a simulated call to {url}, {seconds:g} s at most")
        if api_token is None:
            console.print(
                "[dim]no API token (CALLBRIDGE_API_TOKEN or --token): the caller's lines as scripted and when the "
                "agent spoke, without its words or tool calls[/dim]"
            )
    live = LiveTranscript(console)
    async with contextlib.AsyncExitStack() as stack:
        api = None
        if api_token is not None:
            headers = {"Authorization": f"Bearer {api_token}"}
            api = await stack.enter_async_context(httpx.AsyncClient(base_url=url, headers=headers, timeout=10))
        for attempt, public_url in enumerate(public_urls, start=1):
            caller = SimulatedCaller(url, auth_token, public_url=public_url)
            try:
                call = await place_scripted_call(
                    caller, utterances, live, api=api, seconds=seconds, lead_in_ms=lead_in_ms
                )
                break
            except CallRefused as exc:  # 403: signed for another URL than the server's (or with another token)
                if exc.status_code != 403 or attempt == len(public_urls):
                    raise
    summary = summarize_call(call, None, strict=False)
    if save is not None:
        await asyncio.to_thread(audio.write_wav, save, list(call.recording.stereo_channels()))
        summary["files"] = {"wav": str(save)}
    if console:
        print_summary(console, summary)
    return summary


# --- the summary --------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def summarize_call(call: DemoCall, output: Path | None, *, strict: bool = True) -> dict[str, Any]:
    end_reason = call.record.get("end_reason") if call.record else None
    return summarize(
        call.recording,
        call.utterances,
        call.lines,
        output,
        tool_calls=call.tool_calls,
        strict=strict,
        source=call.source,
        end_reason=end_reason,
    )


def summarize(
    recording: CallRecording,
    utterances: list[Utterance],
    lines: list[TranscriptLine],
    output: Path | None,
    *,
    tool_calls: Iterable[ToolUse] = (),
    strict: bool = True,
    source: Source = "server",
    end_reason: str | None = None,
) -> dict[str, Any]:
    """The call's figures, and what fell short (``problems``). ``ok``: with ``strict``, nothing fell short (the
    demo's bar); otherwise the agent answered and the server spoke Twilio's protocol. With ``output``, the call's
    stereo WAV and transcript are written there."""
    ordered = sorted(lines, key=lambda line: line.start_ms)
    uses = sorted(tool_calls, key=lambda use: use.at_ms)
    clears_ms = [round(clear.at_s * 1000) for clear in recording.clears]
    timing = _Timing.of(recording, utterances)
    latencies, barge_in_stop_ms = timing.latencies, timing.barge_in_stop_ms
    problems = _problems(recording, utterances, ordered, timing, source, end_reason)
    answered = any(line.speaker == "agent" for line in ordered)
    summary: dict[str, Any] = {
        "ok": not problems if strict else answered and not recording.protocol_errors,
        "turns": len(ordered),
        "caller_wer": _caller_wer(utterances[: len(timing.spoken)], ordered) if source == "server" else None,
        "turn_latency_ms": {
            "p50": round(statistics.median(latencies)) if latencies else None,
            "p95": round(_percentile(latencies, 95)) if latencies else None,
            "turns": latencies,
        },
        "barge_in_stop_ms": barge_in_stop_ms,
        "transcript": [_line_dict(line, clears_ms) for line in ordered],
        "tool_calls": [use.as_dict() for use in uses],
        "agent_turns": sum(line.speaker == "agent" for line in ordered),
        "transcript_source": source,
        "call": _call_figures(recording, end_reason),
        "problems": problems,
    }
    if output is not None:
        summary["files"] = _save(recording, ordered, uses, clears_ms, output)
    return summary


@dataclass(frozen=True)
class _Timing:
    """The call's turns on the caller's clock (seconds since the stream started)."""

    spoken: list[tuple[float, float]]  # when each caller line was spoken: its start and the end of its speech
    latencies: list[int]  # from the end of each caller line to the first agent audio heard after it
    barge_in: bool  # a barge-in line was spoken
    barge_in_stop_ms: int | None  # from the start of the first barge-in line to the first clear after it

    @classmethod
    def of(cls, recording: CallRecording, utterances: list[Utterance]) -> _Timing:
        starts = zip(_spoken_starts(recording), utterances, strict=False)
        spoken = [(start, start + u.speech_ms / 1000) for start, u in starts]
        heard_at = [at for at, _ in recording.heard_timeline]
        latencies = []
        for _, end in spoken:
            first = next((at for at in heard_at if at > end), None)
            if first is not None:
                latencies.append(round((first - end) * 1000))
        barge = next((i for i, u in enumerate(utterances[: len(spoken)]) if u.line.barge_in), None)
        if barge is None:
            return cls(spoken, latencies, False, None)
        start = spoken[barge][0]
        clear = next((clear.at_s for clear in recording.clears if clear.at_s >= start), None)
        return cls(spoken, latencies, True, round((clear - start) * 1000) if clear is not None else None)


def _problems(
    recording: CallRecording,
    utterances: list[Utterance],
    lines: list[TranscriptLine],
    timing: _Timing,
    source: Source,
    end_reason: str | None,
) -> list[str]:
    """What fell short of a whole call, each in a few words."""
    spoken, latencies = timing.spoken, timing.latencies
    problems = []
    if not any(line.speaker == "agent" for line in lines):
        why = f" (the server ended the call: {end_reason})" if end_reason and recording.ended_by == "server" else ""
        problems.append(f"the agent never answered{why}")
    if recording.protocol_errors:
        more = f" (and {len(recording.protocol_errors) - 1} more)" if len(recording.protocol_errors) > 1 else ""
        problems.append(f"Twilio would reject what the server sent: {recording.protocol_errors[0]}{more}")
    said = f"{len(spoken)} of {len(utterances)} caller lines spoken"
    if recording.ended_by == "timeout":
        problems.append(f"the time limit ended the call ({said})")
    elif recording.ended_by == "server" and len(spoken) < len(utterances):
        problems.append(f"the server ended the call ({said}{f', {end_reason}' if end_reason else ''})")
    heard = sum(line.speaker == "caller" for line in lines)
    if source == "server" and heard < len(spoken):
        problems.append(f"{len(spoken) - heard} of {len(spoken)} caller lines missing from the transcript")
    if len(latencies) < len(spoken):
        problems.append(f"{len(spoken) - len(latencies)} of {len(spoken)} caller lines got no answer")
    if timing.barge_in and timing.barge_in_stop_ms is None:
        problems.append("the barge-in never stopped the agent (no clear)")
    return problems


def _caller_wer(utterances: list[Utterance], lines: list[TranscriptLine]) -> float | None:
    """The word error rate of the caller's lines (those spoken) as the server transcribed them (none for a
    recording)."""
    import jiwer

    if not utterances or any(not u.line.text for u in utterances):
        return None
    reference = _normalize(" ".join(u.line.text for u in utterances))
    hypothesis = _normalize(" ".join(line.text for line in lines if line.speaker == "caller"))
    return round(float(jiwer.wer(reference, hypothesis)), 3) if hypothesis else 1.0


def _line_dict(line: TranscriptLine, clears_ms: list[int]) -> dict[str, Any]:
    return {
        "speaker": line.speaker,
        "text": line.text,
        "start_ms": line.start_ms,
        "end_ms": line.end_ms,
        "interrupted": barged_in(line, clears_ms),
    }


def _call_figures(recording: CallRecording, end_reason: str | None) -> dict[str, Any]:
    return {
        "call_sid": recording.call_sid,
        "seconds": round(recording.duration_s, 2),
        "sent_ms": len(recording.sent_audio) // audio.BYTES_PER_MS,
        "heard_ms": len(recording.heard_audio) // audio.BYTES_PER_MS,
        "clears": len(recording.clears),
        "ended_by": recording.ended_by,
        "end_reason": end_reason,
        "close_code": recording.close_code,
    }


def _save(
    recording: CallRecording, lines: list[TranscriptLine], uses: list[ToolUse], clears_ms: list[int], output: Path
) -> dict[str, str]:
    """The stereo WAV (caller left, agent right) and the transcript as text, tool calls included."""
    output.mkdir(parents=True, exist_ok=True)
    wav, transcript = output / "call.wav", output / "transcript.txt"
    audio.write_wav(wav, list(recording.stereo_channels()))
    entries: list[tuple[int, str, str, str]] = [
        (line.start_ms, line.speaker, _line_text(line), _line_suffix(line, clears_ms)) for line in lines
    ]
    entries += [(use.at_ms, "tool", use.text(), "") for use in uses]
    transcript.write_text(
        "".join(
            f"{at / 1000:7.2f}  {who:>6}  {text}{f' [{suffix}]' if suffix else ''}\n"
            for at, who, text, suffix in sorted(entries, key=lambda entry: entry[0])
        )
    )
    return {"wav": str(wav), "transcript": str(transcript)}


def _percentile(values: list[int], percent: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_text(summary: dict[str, Any]) -> list[str]:
    """The summary as the demo and ``simulate`` print it (rich markup): figures that were measured, the call, the
    files, and what fell short."""
    figures = [f"{summary['turns']} turns"]
    if summary["tool_calls"]:
        figures.append(f"{len(summary['tool_calls'])} tool call{'s' * (len(summary['tool_calls']) != 1)}")
    if summary["caller_wer"] is not None:
        figures.append(f"caller WER {summary['caller_wer']:.0%}")
    latency = summary["turn_latency_ms"]
    if latency["p50"] is not None:
        figures.append(f"turn latency p50 {latency['p50']} ms / p95 {latency['p95']} ms")
    if summary["barge_in_stop_ms"] is not None:
        figures.append(f"barge-in stop {summary['barge_in_stop_ms']} ms")
    call = summary["call"]
    ended = {"caller": "the caller hung up", "server": "the server closed it", "timeout": "the time limit"}
    text = [
        f"[bold]{'OK' if summary['ok'] else 'FAILED'}[/bold]: {', '.join(figures)}",
        f"call {call['call_sid']}: {call['seconds']:.1f} s ({ended.get(call['ended_by'], 'ended')}), sent "
        f"{call['sent_ms'] / 1000:.1f} s of audio, heard {call['heard_ms'] / 1000:.1f} s of the agent, "
        f"{call['clears']} clear{'s' * (call['clears'] != 1)}",
    ]
    if summary.get("files"):
        text.append(f"files: {', '.join(summary['files'].values())}")
    text += [f"[yellow]- {escape(problem)}[/yellow]" for problem in summary["problems"]]
    return text


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    for line in summary_text(summary):
        console.print(line)
