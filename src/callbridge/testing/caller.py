"""A simulated Twilio caller: place a phone call against a callbridge server without Twilio.

It does what Twilio does for an inbound call on a ``<Connect><Stream>`` number: a signed POST to
``/twilio/voice``, then a signed WebSocket to the ``<Stream>`` URL of the returned TwiML, ``connected`` and
``start`` (with the ``<Parameter>`` values as ``customParameters``), and the caller's audio as 20 ms ``media``
frames in real time. It also plays the agent's audio the way a phone does: at 8 bytes per millisecond, echoing
each ``mark`` once the audio queued before it has played, and flushing (echoing) every pending mark on
``clear``. A bridge therefore learns exactly what the caller heard, as it does on a real call.

When the ``<Stream>`` has a ``statusCallback``, the caller also reports the stream's life there as Twilio does, in
signed requests: ``stream-started`` once ``start`` is out, ``stream-stopped`` when the stream is over, and
``stream-error`` (with Twilio's error code and message in ``StreamError``) when the WebSocket cannot be opened or its
handshake is refused. What each of those requests got back is in :attr:`CallRecording.stream_status_callbacks`.

Usage in a test, against a server listening locally::

    from pathlib import Path

    from callbridge.telephony.g711 import tone, write_wav
    from callbridge.testing.caller import CallScript, HangUp, Pause, Say, SayWhenHearing, SimulatedCaller

    caller = SimulatedCaller("http://127.0.0.1:8000", auth_token="your-twilio-auth-token")
    script = CallScript(
        [
            Pause(1000),
            Say(tone(800)),  # stand-in for speech; use CallScript.from_wav for a recording
            SayWhenHearing(tone(400), after_heard_ms=300),  # barge in 300 ms into the answer
            Pause(1500),
            HangUp(),
        ]
    )
    recording = await caller.place_call(script, max_duration_s=30)
    assert not recording.protocol_errors
    assert recording.marks_flushed  # the barge-in cleared the rest of the answer
    write_wav(Path("call.wav"), list(recording.stereo_channels()))  # caller left, agent right

``public_url`` is the address the server believes it has (its configured public base URL): signatures are
computed over it, as Twilio computes them over the URL it called, while the requests go to ``base_url``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import httpx
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from callbridge.telephony.g711 import BYTES_PER_MS, SILENCE_BYTE, read_wav_as_ulaw, silence

FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS
_SILENT_FRAME = bytes([SILENCE_BYTE]) * FRAME_BYTES
_DTMF_DIGITS = frozenset("0123456789*#")

EventHook = Callable[[str, dict[str, Any]], None]
"""``on_event(kind, data)``. Kinds: ``"sent"`` (every message sent except ``media``), ``"received"`` (every JSON
object the server sent), ``"protocol_error"`` (``{"error": ...}``), ``"step"`` (``{"step", "at_s"}``),
``"stream_status"`` (``{"event", "status_code"}``: a status callback request and its answer, ``None`` if it failed)."""

STREAM_ERRORS = {
    "handshake": (31920, "Stream - WebSocket - Handshake Error"),
    "refused": (31902, "Stream - WebSocket - Connection Refused"),
    "timeout": (31901, "Stream - WebSocket - Connection Timeout"),
}
"""Twilio's error for each way a stream's WebSocket fails to open (https://www.twilio.com/docs/api/errors/31920 …):
a handshake answered with anything but 101, a refused TCP connection, no answer at all."""

EndedBy = Literal["caller", "server", "timeout", "twilio"]
"""``"twilio"``: the line was ended from outside the stream (``hang_up`` of :meth:`SimulatedCaller.place_call`)."""


# --- Script ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Say:
    """Stream this μ-law audio. A last partial frame is padded with silence."""

    audio: bytes


@dataclass(frozen=True, slots=True)
class Pause:
    """Stream silence (rounded up to whole 20 ms frames)."""

    ms: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    """Press a key: a ``dtmf`` message at this point of the timeline."""

    digit: str

    def __post_init__(self) -> None:
        if self.digit not in _DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {self.digit!r}")


@dataclass(frozen=True, slots=True)
class HangUp:
    """Send ``stop`` and close the WebSocket with 1000."""


@dataclass(frozen=True, slots=True)
class SayWhenHearing:
    """Stay silent until ``after_heard_ms`` of agent audio has played since this step began, then speak.

    This is how a test barges in on the agent mid-sentence, whatever the latency of the agent.
    """

    audio: bytes
    after_heard_ms: int


@dataclass(frozen=True, slots=True)
class SayWhenAgentDone:
    """Stay silent until the agent has spoken and then been quiet for ``quiet_ms`` (its turn is over), then speak.

    This is how a scripted caller takes turns whatever the agent's latency. After ``max_wait_ms`` without a
    finished agent turn the caller speaks anyway.
    """

    audio: bytes
    quiet_ms: int = 700
    max_wait_ms: int = 15000


Step = Say | Pause | Dtmf | HangUp | SayWhenHearing | SayWhenAgentDone


@dataclass(slots=True)
class CallScript:
    """What the caller does, in order. After the last step the caller stays on the line, silent."""

    steps: list[Step] = field(default_factory=list)

    @classmethod
    def from_wav(cls, path: str | Path, *, lead_in_ms: int = 500, tail_ms: int = 1000) -> CallScript:
        """Silence, the recording (8 kHz mono, 16-bit PCM or μ-law), silence."""
        steps: list[Step] = [Say(read_wav_as_ulaw(Path(path)))]
        if lead_in_ms:
            steps.insert(0, Pause(lead_in_ms))
        if tail_ms:
            steps.append(Pause(tail_ms))
        return cls(steps)


# --- Results --------------------------------------------------------------------------------------------


class CallRefused(Exception):
    """The server did not let the call reach a media stream (an HTTP error, or TwiML without a stream)."""

    def __init__(self, status_code: int, body: str, reason: str) -> None:
        super().__init__(f"{reason} (HTTP {status_code}): {body[:500]}")
        self.status_code = status_code
        self.body = body
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClearRecord:
    at_s: float
    """Call time (seconds since ``start``) when the ``clear`` arrived."""
    discarded_bytes: int
    """Agent audio received but not yet played, thrown away."""
    heard_bytes_at_clear: int


@dataclass(slots=True)
class CallRecording:
    """Everything that happened on the call. Times are seconds since the ``start`` message."""

    call_sid: str
    stream_sid: str
    twiml: str
    parameters: dict[str, str]
    sent_audio: bytearray = field(default_factory=bytearray)
    heard_audio: bytearray = field(default_factory=bytearray)
    """Agent audio played, 20 ms at a time; a step that began before a ``clear`` still counts as heard."""
    heard_timeline: list[tuple[float, int]] = field(default_factory=list)
    """``(time the 20 ms playback step began, bytes played in it)``, for steps that played something."""
    received_audio_bytes: int = 0
    marks_played: list[str] = field(default_factory=list)
    marks_flushed: list[str] = field(default_factory=list)
    clears: list[ClearRecord] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    step_times: list[tuple[str, float]] = field(default_factory=list)
    """When each script step began; a ``SayWhenHearing`` adds ``"SayWhenHearing:triggered"`` when it speaks."""
    stream_status_callbacks: list[tuple[str, int | None]] = field(default_factory=list)
    """``(StreamEvent, HTTP status)`` of each ``<Stream statusCallback>`` request, in order (``None``: it failed)."""
    ended_by: EndedBy | None = None
    close_code: int | None = None
    close_reason: str = ""
    duration_s: float = 0.0

    def stereo_channels(self) -> tuple[bytes, bytes]:
        """Caller and agent μ-law audio on the same timeline (silence where the agent played nothing)."""
        agent = bytearray(_SILENT_FRAME) * (len(self.sent_audio) // FRAME_BYTES)
        position = 0
        for at_s, count in self.heard_timeline:
            offset = round(at_s * 1000) * BYTES_PER_MS
            if len(agent) < offset + count:
                agent.extend(bytes([SILENCE_BYTE]) * (offset + count - len(agent)))
            agent[offset : offset + count] = self.heard_audio[position : position + count]
            position += count
        return bytes(self.sent_audio), bytes(agent)


# --- Caller ---------------------------------------------------------------------------------------------


class SimulatedCaller:
    """Places calls, one per :meth:`place_call`, against the server at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        auth_token: str,
        *,
        public_url: str | None = None,
        from_: str = "+15550100001",
        to: str = "+15550100002",
        account_sid: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.from_ = from_
        self.to = to
        self.account_sid = account_sid or "AC" + uuid.uuid4().hex
        self._validator = RequestValidator(auth_token)

    async def place_call(
        self,
        script: CallScript,
        *,
        hang_up_after_s: float | None = None,
        max_duration_s: float = 120.0,
        on_event: EventHook | None = None,
        twiml: str | None = None,
        call_sid: str | None = None,
        hang_up: asyncio.Event | None = None,
    ) -> CallRecording:
        """Call, run the script, and return the recording once the call is over.

        The call ends at a ``HangUp`` step; ``hang_up_after_s`` seconds after the script ran out (if given);
        when the server closes the WebSocket; or ``max_duration_s`` after dialling, whichever comes first. A
        refused call (HTTP error, no ``<Connect><Stream>``, rejected WebSocket handshake) raises
        :class:`CallRefused`; a server closing the accepted WebSocket just ends the call.

        ``twiml`` (with ``call_sid``) connects with TwiML the application gave Twilio directly, as for an outbound
        call created with inline TwiML or a live call redirected to the agent, instead of asking the voice webhook.

        Setting ``hang_up`` ends the call from outside, as Twilio ends a stream when the call is hung up or
        redirected through REST: ``stop``, a close with 1000, and ``ended_by == "twilio"``.
        """
        deadline = asyncio.get_running_loop().time() + max_duration_s
        call_sid = call_sid or "CA" + uuid.uuid4().hex
        document_url = f"{self.public_url}/twilio/voice"
        if twiml is None:  # an incoming call: Twilio asks the voice webhook what to do
            twiml = await self._request_twiml(call_sid, limit_s=max_duration_s)
        stream = _parse_twiml(twiml)
        recording = CallRecording(call_sid, "MZ" + uuid.uuid4().hex, twiml, stream.parameters)
        status = None
        if stream.status_callback:  # a relative URL is relative to the TwiML's own, as Twilio resolves it
            status = _StreamStatus(self, urljoin(document_url, stream.status_callback), stream, recording, on_event)
        call = _Call(self.account_sid, script, recording, hang_up_after_s, on_event, status, hang_up)
        signature = self._validator.compute_signature(stream.url, {})
        try:
            async with connect(
                self._socket_url(stream.url),
                additional_headers={"X-Twilio-Signature": signature},
                open_timeout=max(deadline - asyncio.get_running_loop().time(), 0.001),
                close_timeout=1.0,
                compression=None,
            ) as ws:
                await call.run(ws, deadline)
        except BaseException as exc:
            call.cancel_started_callback()
            failure = None if call.started else _open_failure(exc)  # the WebSocket never opened
            if status is not None and failure is not None:
                await status.report("stream-error", STREAM_ERRORS[failure])
            if isinstance(exc, InvalidStatus):
                response = exc.response
                raise CallRefused(
                    response.status_code,
                    response.body.decode(errors="replace") if response.body else "",
                    "the WebSocket handshake was rejected",
                ) from exc
            raise
        await call.finish_started_callback()
        if status is not None:
            await status.report("stream-stopped")
        return recording

    async def _request_twiml(self, call_sid: str, *, limit_s: float) -> str:
        params = {
            "CallSid": call_sid,
            "AccountSid": self.account_sid,
            "From": self.from_,
            "To": self.to,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        signature = self._validator.compute_signature(f"{self.public_url}/twilio/voice", params)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        async with httpx.AsyncClient(timeout=limit_s) as client:
            response = await client.post(f"{self.base_url}/twilio/voice", data=params, headers=headers)
        if response.status_code != 200:
            raise CallRefused(response.status_code, response.text, "the voice webhook failed")
        return response.text

    def _socket_url(self, stream_url: str) -> str:
        """The Stream URL names the public host; connect to ``base_url`` instead, keeping the path.

        The query string is dropped, as Twilio drops it.
        """
        base = urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(base.scheme, base.scheme)
        return urlunsplit((scheme, base.netloc, urlsplit(stream_url).path or "/", "", ""))

    def _http_url(self, public_url: str) -> str:
        """A webhook URL names the public host; send to ``base_url`` instead, keeping the path and query."""
        base, url = urlsplit(self.base_url), urlsplit(public_url)
        return urlunsplit((base.scheme, base.netloc, url.path or "/", url.query, ""))


@dataclass(frozen=True, slots=True)
class _Stream:
    """The ``<Connect><Stream>`` of the TwiML."""

    url: str
    parameters: dict[str, str]
    name: str | None
    status_callback: str | None
    status_callback_method: str


def _parse_twiml(twiml: str) -> _Stream:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        raise CallRefused(200, twiml, f"the answer is not XML ({exc})") from exc
    stream = root.find("./Connect/Stream") if root.tag == "Response" else None
    url = stream.get("url") if stream is not None else None
    if stream is None or not url:
        raise CallRefused(200, twiml, "the TwiML has no <Response><Connect><Stream url=...>")
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    method = (stream.get("statusCallbackMethod") or "POST").upper()
    return _Stream(url, parameters, stream.get("name"), stream.get("statusCallback") or None, method)


class _StreamStatus:
    """Twilio's requests to a ``<Stream statusCallback>``: form-encoded (a query string for ``GET``), signed over the
    callback URL like every Twilio webhook. A failed request changes nothing on the call, as on Twilio."""

    def __init__(
        self,
        caller: SimulatedCaller,
        url: str,
        stream: _Stream,
        recording: CallRecording,
        on_event: EventHook | None,
    ) -> None:
        self.caller = caller
        self.url = url
        self.method = stream.status_callback_method
        self.name = stream.name
        self.rec = recording
        self.on_event = on_event

    async def report(self, event: str, error: tuple[int, str] | None = None) -> None:
        rec = self.rec
        params = {
            "AccountSid": self.caller.account_sid,
            "CallSid": rec.call_sid,
            "StreamSid": rec.stream_sid,
            "StreamName": self.name or rec.stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if error is not None:
            params["StreamError"] = f"{error[0]} {error[1]}"
        status_code: int | None = None
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                if self.method == "GET":
                    separator = "&" if urlsplit(self.url).query else "?"
                    url = f"{self.url}{separator}{urlencode(params)}"
                    signature = self.caller._validator.compute_signature(url, {})
                    response = await client.get(self.caller._http_url(url), headers=_webhook_headers(signature))
                else:
                    signature = self.caller._validator.compute_signature(self.url, params)
                    response = await client.post(
                        self.caller._http_url(self.url), data=params, headers=_webhook_headers(signature)
                    )
            status_code = response.status_code
        except httpx.HTTPError:
            pass
        rec.stream_status_callbacks.append((event, status_code))
        if self.on_event is not None:
            self.on_event("stream_status", {"event": event, "status_code": status_code})


def _open_failure(exc: BaseException) -> str | None:
    """Which of :data:`STREAM_ERRORS` a failure to open the WebSocket is (``None``: not one of them)."""
    if isinstance(exc, InvalidHandshake):
        return "handshake"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return None


def _webhook_headers(signature: str) -> dict[str, str]:
    return {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}


def _message_problem(message: dict[str, Any], stream_sid: str) -> str | None:
    """Why Twilio would reject this server message, if it would: only three exact shapes are allowed."""
    event = message.get("event")
    if event not in ("media", "mark", "clear"):
        return f"unsupported event {event!r}"
    expected = {"event", "streamSid"} if event == "clear" else {"event", "streamSid", event}
    if set(message) != expected:
        return f"{event} has keys {sorted(message)}, expected {sorted(expected)}"
    if message["streamSid"] != stream_sid:
        return f"{event} for streamSid {message['streamSid']!r}, not this stream's"
    if event == "clear":
        return None
    body, key = message[event], "payload" if event == "media" else "name"
    if not isinstance(body, dict) or set(body) != {key} or not isinstance(body[key], str) or not body[key]:
        return f"{event}.{event} must be exactly {{{key!r}: <non-empty string>}}, got {body!r}"
    return None


class _Call:
    """One media stream: a single task alternates 20 ms ticks (send a frame, play 20 ms) with receiving.

    The playback queue holds agent audio (``bytes``) and mark names (``str``) in arrival order.
    """

    def __init__(
        self,
        account_sid: str,
        script: CallScript,
        recording: CallRecording,
        hang_up_after_s: float | None,
        on_event: EventHook | None,
        status: _StreamStatus | None = None,
        hang_up: asyncio.Event | None = None,
    ) -> None:
        self.account_sid = account_sid
        self.hang_up = hang_up
        self.status = status
        self.started = False  # ``start`` went out: the stream is open, a status callback says so
        self._started_callback: asyncio.Task[None] | None = None
        self.steps = deque(script.steps)
        self.rec = recording
        self.hang_up_after_s = hang_up_after_s
        self.on_event = on_event
        self.sequence = 0
        self.tick = 0
        self.t0 = 0.0
        self.queue: deque[bytes | str] = deque()
        self.marks_passed: list[str] = []  # played through in the last step; echoed at the next tick
        self.speaking = bytearray()  # rest of the current Say/Pause
        self.waiting: tuple[SayWhenHearing, int] | None = None  # with heard bytes when it began
        self.turn_waiting: tuple[SayWhenAgentDone, int, int] | None = None  # with heard bytes and tick at begin
        self.last_played_tick = -1
        self.script_ended_tick: int | None = None
        self.ws: ClientConnection

    async def run(self, ws: ClientConnection, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self.ws = ws
        rec = self.rec
        self.t0 = loop.time()  # reset once ``start`` is out; set here too should the server close before
        try:
            await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await self._send(self._start_message())
            self.t0 = loop.time()
            self.started = True
            if self.status is not None:  # alongside the audio, which keeps its 20 ms schedule meanwhile
                self._started_callback = asyncio.create_task(self.status.report("stream-started"))
            rec.ended_by = await self._stream(deadline)
        except ConnectionClosed:
            rec.ended_by = "server"
        if rec.ended_by != "server":
            try:
                stop = {"accountSid": self.account_sid, "callSid": rec.call_sid}
                await self._send({"event": "stop", **self._header(), "stop": stop})
            except ConnectionClosed:
                pass
            await ws.close(1000)
        else:
            await ws.wait_closed()
        rec.close_code, rec.close_reason = ws.close_code, ws.close_reason or ""
        rec.duration_s = loop.time() - self.t0

    async def finish_started_callback(self) -> None:
        """Let the ``stream-started`` request finish (before ``stream-stopped`` goes out)."""
        if self._started_callback is not None:
            await self._started_callback

    def cancel_started_callback(self) -> None:
        if self._started_callback is not None:
            self._started_callback.cancel()

    def _start_message(self) -> dict[str, Any]:
        rec = self.rec
        start = {
            "accountSid": self.account_sid,
            "streamSid": rec.stream_sid,
            "callSid": rec.call_sid,
            "tracks": ["inbound"],
            "customParameters": rec.parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        return {"event": "start", "sequenceNumber": self._next_sequence(), "start": start, "streamSid": rec.stream_sid}

    async def _stream(self, deadline: float) -> EndedBy:
        """Tick k is due at t0 + k * 20 ms (an absolute schedule, so late ticks catch up instead of drifting)."""
        loop = asyncio.get_running_loop()
        receiving = asyncio.create_task(self.ws.recv())
        try:
            while True:
                now = loop.time()
                if self.hang_up is not None and self.hang_up.is_set():  # seen within a tick (20 ms)
                    return "twilio"
                if now >= deadline:
                    return "timeout"
                due = self.t0 + self.tick * FRAME_MS / 1000
                if now >= due:
                    if not await self._tick():
                        return "caller"
                    continue
                done, _ = await asyncio.wait({receiving}, timeout=min(due, deadline) - now)
                if done:
                    data = receiving.result()  # raises ConnectionClosed once the server closed
                    receiving = asyncio.create_task(self.ws.recv())
                    await self._receive(data)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)

    async def _tick(self) -> bool:
        """Echo marks passed, send the caller's next frame, play 20 ms. False when the caller hangs up."""
        at_ms = self.tick * FRAME_MS
        self._pass_marks_at_head()
        passed, self.marks_passed = self.marks_passed, []
        for name in passed:
            await self._echo_mark(name, flushed=False)
        frame = await self._next_frame(at_ms)
        if frame is None:
            return False
        payload = base64.b64encode(frame).decode("ascii")
        media = {"track": "inbound", "chunk": str(self.tick + 1), "timestamp": str(at_ms), "payload": payload}
        sequence = self._next_sequence()
        await self._send(
            {"event": "media", "sequenceNumber": sequence, "media": media, "streamSid": self.rec.stream_sid}
        )
        self.rec.sent_audio += frame
        self._play(at_ms)
        self.tick += 1
        return True

    async def _next_frame(self, at_ms: int) -> bytes | None:
        """The caller's audio for this tick, running zero-length steps (DTMF, hang-up) on the way."""
        while True:
            if self.speaking:
                frame = bytes(self.speaking[:FRAME_BYTES])
                del self.speaking[:FRAME_BYTES]
                return frame.ljust(FRAME_BYTES, bytes([SILENCE_BYTE]))
            if self._still_waiting(at_ms):
                return _SILENT_FRAME
            if self.speaking:  # a wait just ended: its line begins
                continue
            if not self.steps:
                if self.script_ended_tick is None:
                    self.script_ended_tick = self.tick
                silent_ms = (self.tick - self.script_ended_tick) * FRAME_MS
                if self.hang_up_after_s is not None and silent_ms >= self.hang_up_after_s * 1000:
                    return None
                return _SILENT_FRAME
            if not await self._begin(self.steps.popleft(), at_ms):
                return None

    def _still_waiting(self, at_ms: int) -> bool:
        """Whether a ``SayWhenHearing`` or ``SayWhenAgentDone`` still waits; one whose moment came starts speaking."""
        rec = self.rec
        if self.waiting is not None:
            reply, heard_at_begin = self.waiting
            if len(rec.heard_audio) - heard_at_begin < reply.after_heard_ms * BYTES_PER_MS:
                return True
            self.waiting = None
            self._log_step("SayWhenHearing:triggered", at_ms)
            self.speaking = bytearray(reply.audio)
        elif self.turn_waiting is not None:
            turn, heard_at_begin, begun_tick = self.turn_waiting
            quiet_ms = (self.tick - self.last_played_tick) * FRAME_MS
            heard = len(rec.heard_audio) > heard_at_begin
            waited_ms = (self.tick - begun_tick) * FRAME_MS
            if not (heard and quiet_ms >= turn.quiet_ms) and waited_ms < turn.max_wait_ms:
                return True
            self.turn_waiting = None
            self._log_step("SayWhenAgentDone:triggered", at_ms)
            self.speaking = bytearray(turn.audio)
        return False

    async def _begin(self, step: Step, at_ms: int) -> bool:
        """Begin a script step; ``False`` for the hang-up."""
        self._log_step(type(step).__name__, at_ms)
        match step:
            case Say(audio=audio):
                self.speaking = bytearray(audio)
            case Pause(ms=ms):
                self.speaking = bytearray(silence(ms))
            case Dtmf(digit=digit):
                dtmf = {"track": "inbound_track", "digit": digit}
                await self._send({"event": "dtmf", **self._header(), "dtmf": dtmf})
            case HangUp():
                return False
            case SayWhenHearing():
                self.waiting = (step, len(self.rec.heard_audio))
            case SayWhenAgentDone():
                self.turn_waiting = (step, len(self.rec.heard_audio), self.tick)
        return True

    def _play(self, at_ms: int) -> None:
        """Play the next 20 ms of queued agent audio; a step once begun plays out (even across a clear)."""
        played = bytearray()
        while self.queue and len(played) < FRAME_BYTES:
            item = self.queue.popleft()
            if isinstance(item, str):
                self.marks_passed.append(item)
                continue
            take = FRAME_BYTES - len(played)
            played += item[:take]
            if len(item) > take:
                self.queue.appendleft(item[take:])
        self._pass_marks_at_head()
        if played:
            self.last_played_tick = self.tick
            self.rec.heard_audio += played
            self.rec.heard_timeline.append((at_ms / 1000, len(played)))

    def _pass_marks_at_head(self) -> None:
        while self.queue and isinstance(head := self.queue[0], str):
            self.queue.popleft()
            self.marks_passed.append(head)

    async def _receive(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self._protocol_error(f"31950 binary frame of {len(data)} bytes")
            return
        try:
            message = json.loads(data)
        except ValueError:
            self._protocol_error(f"31951 not JSON: {data[:200]!r}")
            return
        if not isinstance(message, dict):
            self._protocol_error(f"31951 not a JSON object: {data[:200]!r}")
            return
        self._emit("received", message)
        problem = _message_problem(message, self.rec.stream_sid)
        if problem is not None:
            self._protocol_error(f"31951 {problem}: {data[:200]}")
        elif message["event"] == "media":
            try:
                audio = base64.b64decode(message["media"]["payload"], validate=True)
            except binascii.Error:
                self._protocol_error(f"31951 media payload is not base64: {data[:200]}")
                return
            self.rec.received_audio_bytes += len(audio)
            if audio:
                self.queue.append(audio)
        elif message["event"] == "mark":
            self.queue.append(message["mark"]["name"])
        else:
            await self._clear()

    async def _clear(self) -> None:
        """Like Twilio: drop the queued audio and echo every pending mark at once."""
        rec = self.rec
        discarded = sum(len(item) for item in self.queue if isinstance(item, bytes))
        flushed = [item for item in self.queue if isinstance(item, str)]
        self.queue.clear()
        at_s = asyncio.get_running_loop().time() - self.t0
        rec.clears.append(ClearRecord(at_s, discarded, len(rec.heard_audio)))
        passed, self.marks_passed = self.marks_passed, []
        for name in passed:
            await self._echo_mark(name, flushed=False)
        for name in flushed:
            await self._echo_mark(name, flushed=True)

    async def _echo_mark(self, name: str, *, flushed: bool) -> None:
        await self._send({"event": "mark", **self._header(), "mark": {"name": name}})
        (self.rec.marks_flushed if flushed else self.rec.marks_played).append(name)

    def _header(self) -> dict[str, str]:
        return {"sequenceNumber": self._next_sequence(), "streamSid": self.rec.stream_sid}

    def _next_sequence(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))
        if message["event"] != "media":
            self._emit("sent", message)

    def _log_step(self, name: str, at_ms: int) -> None:
        self.rec.step_times.append((name, at_ms / 1000))
        self._emit("step", {"step": name, "at_s": at_ms / 1000})

    def _protocol_error(self, error: str) -> None:
        self.rec.protocol_errors.append(error)
        self._emit("protocol_error", {"error": error})

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)
