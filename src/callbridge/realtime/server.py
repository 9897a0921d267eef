"""A Realtime-compatible WebSocket server: the protocol, with the mind and voice behind it pluggable.

The server speaks the documented OpenAI Realtime protocol: the GA shape by default, the older beta shape when the
client sends ``OpenAI-Beta: realtime=v1`` (unless :attr:`ServerOptions.accepts_beta` is off, as it is on
api.openai.com today). It keeps the service's event order and answers mistakes with the service's error codes;
every incoming event goes through :func:`~callbridge.realtime.conformance.validate_client_event`, so a misspelt
field fails here as it would in production, and a ``session.update`` carrying a value the service refuses (an
unknown voice, an unknown or retired transcription model, a function whose parameters are not an object schema, a
speed or token limit out of range) is answered with the service's ``error`` and changes nothing. What it hears,
understands and says comes from a :class:`ConversationAgent`, one per connection: the scripted one of
:mod:`callbridge.testing.fake_realtime`, or the speech models of :mod:`callbridge.engine`.

Agents hear and speak G.711 μ-law at 8 kHz. On the wire, audio is in the session's formats: μ-law or A-law at
8 kHz, or 16-bit PCM at 24 kHz (the service's default), converted here in both directions. Each connection is
recorded as a :class:`ServerSession` for assertions and metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import functools
import json
import math
import re
import secrets
import sys
import typing
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from callbridge.realtime.conformance import ConformanceError, validate_client_event
from callbridge.realtime.dialect import BETA_TO_GA_AUDIO_FORMAT, BETA_TO_GA_EVENT_NAMES, Dialect
from callbridge.telephony.g711 import BYTES_PER_MS, DECODE_TABLE, pcm16_to_ulaw

__all__ = [
    "BUILTIN_VOICES",
    "ConversationAgent",
    "RealtimeServer",
    "ServerOptions",
    "ServerSession",
    "ToolCall",
    "TurnContext",
    "realtime_models",
    "transcription_models",
]

Event = dict[str, Any]

_FRAME = 20 * BYTES_PER_MS  # VAD frame: 20 ms of μ-law
_SPEECH_START_MS = 60  # loud audio needed before speech_started
_MIN_COMMIT_MS = 100  # the service refuses to commit less
_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that! You can retry your request, "
    "or contact us through our help center at help.openai.com if the error persists."
)
_QUOTA_ERROR = (
    "You exceeded your current quota, please check your plan and billing details. For more information on this "
    "error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_BETA_DISABLED = "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
_SESSION_EXPIRED = "Your session hit the maximum duration of 60 minutes."
_BETA_NAMES = {ga: beta for beta, ga in BETA_TO_GA_EVENT_NAMES.items()}
BUILTIN_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
"""The service's built-in voices; any other voice must be a custom ``{"id": ...}`` voice."""
_SPEED_RANGE = (0.25, 1.5)
_MAX_OUTPUT_TOKENS_RANGE = (1, 4096)

# Wire formats: bytes per millisecond of audio in each (by its GA name).
_BYTES_PER_MS = {"audio/pcmu": BYTES_PER_MS, "audio/pcma": BYTES_PER_MS, "audio/pcm": 48}
_PCM_FRAME = 6  # one 8 kHz μ-law sample is three 16-bit samples at 24 kHz


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _literal_values(annotation: Any) -> tuple[str, ...]:
    """The strings of the first ``Literal`` inside ``annotation`` (``Union[str, Literal[...]]`` in the SDK)."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    for argument in typing.get_args(annotation):
        values = _literal_values(argument)
        if values:
            return values
    return ()


@functools.cache
def realtime_models() -> frozenset[str]:
    """The Realtime models the ``openai`` package lists for a session (``RealtimeSessionCreateRequestParam.model``)."""
    from openai.types.realtime.realtime_session_create_request_param import RealtimeSessionCreateRequestParam

    return frozenset(_literal_values(typing.get_type_hints(RealtimeSessionCreateRequestParam)["model"]))


@functools.cache
def transcription_models() -> tuple[str, ...]:
    """The transcription models the ``openai`` package lists (``AudioTranscriptionParam.model``), in its order."""
    from openai.types.realtime.audio_transcription_param import AudioTranscriptionParam

    return _literal_values(typing.get_type_hints(AudioTranscriptionParam)["model"])


def _supported(values: tuple[str, ...]) -> str:
    """``'a', 'b', and 'c'``, as the service lists the values it accepts."""
    quoted = [f"'{value}'" for value in values]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _mask_key(key: str) -> str:
    """An API key as the service echoes it in errors: its first and last characters around asterisks."""
    if len(key) < 16:
        return "*" * len(key)
    return f"{key[:8]}{'*' * (len(key) - 12)}{key[-4:]}"


def _deprecated(model: str) -> str:
    """The service's words for a model past its shutdown date (its code is ``model_not_found``)."""
    return f"The model `{model}` has been deprecated, learn more here: https://platform.openai.com/docs/deprecations"


def _invalid_api_key_body(key: str) -> Event:
    message = (
        f"Incorrect API key provided: {_mask_key(key)}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    return {"type": "invalid_request_error", "code": "invalid_api_key", "message": message, "param": None}


# G.711 A-law (the ITU-T reference algorithm), and the conversions between the agent's μ-law and the wire.

_ALAW_SEGMENT_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _alaw_encode(sample: int) -> int:
    value = sample >> 3  # 13-bit magnitude domain
    mask = 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    segment = next((i for i, end in enumerate(_ALAW_SEGMENT_ENDS) if value <= end), 8)
    if segment >= 8:
        return 0x7F ^ mask
    mantissa = (value >> 1) & 0x0F if segment < 2 else (value >> segment) & 0x0F
    return ((segment << 4) | mantissa) ^ mask


def _alaw_decode(byte: int) -> int:
    byte ^= 0x55
    magnitude = (byte & 0x0F) << 4
    segment = (byte & 0x70) >> 4
    if segment == 0:
        magnitude += 8
    else:
        magnitude = (magnitude + 0x108) << (segment - 1)
    return magnitude if byte & 0x80 else -magnitude


_ULAW_TO_ALAW = bytes(_alaw_encode(DECODE_TABLE[byte]) for byte in range(256))
_ALAW_TO_ULAW = pcm16_to_ulaw([_alaw_decode(byte) for byte in range(256)])


def _ulaw_to_pcm24k(ulaw: bytes) -> bytes:
    """μ-law 8 kHz → 16-bit little-endian PCM at 24 kHz, linearly interpolated (48 bytes per ms)."""
    table = DECODE_TABLE
    samples = [table[byte] for byte in ulaw]
    if not samples:
        return b""
    following = samples[1:] + samples[-1:]
    out = array("h", bytes(len(samples) * _PCM_FRAME))
    out[0::3] = array("h", samples)
    out[1::3] = array("h", [a + (b - a) // 3 for a, b in zip(samples, following, strict=True)])
    out[2::3] = array("h", [a + 2 * (b - a) // 3 for a, b in zip(samples, following, strict=True)])
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def _pcm24k_to_ulaw(pcm: bytes) -> bytes:
    """16-bit little-endian PCM at 24 kHz (whole 3-sample frames) → μ-law 8 kHz, each frame averaged."""
    samples = array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    return pcm16_to_ulaw(
        [(a + b + c) // 3 for a, b, c in zip(samples[0::3], samples[1::3], samples[2::3], strict=True)]
    )


def _to_wire(ulaw: bytes, wire_format: str) -> bytes:
    if wire_format == "audio/pcm":
        return _ulaw_to_pcm24k(ulaw)
    if wire_format == "audio/pcma":
        return ulaw.translate(_ULAW_TO_ALAW)
    return ulaw


def _sentences(text: str) -> list[str]:
    """A reply's sentences, each spoken as its own item when replies are split."""
    return [sentence for sentence in re.split(r"(?<=[.!?])\s+", text.strip()) if sentence] or [text]


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What an agent knows when it plans a response."""

    caller_transcripts: list[str]
    """Every caller turn so far, oldest first."""
    tool_output: str | None
    """The ``function_call_output`` this response follows, if it follows one."""
    instructions: str
    tools: list[str]
    """Names of the functions the session declares."""


class ConversationAgent(Protocol):
    """The mind and voice behind one connection."""

    def hears_speech(self, frame: bytes) -> bool:
        """Voice activity in one 20 ms μ-law frame."""
        ...

    async def transcribe(self, audio: bytes, turn: int) -> str:
        """One committed caller turn (μ-law) as text."""
        ...

    def plan(self, context: TurnContext) -> str | ToolCall:
        """What the next response says, or which function it calls."""
        ...

    def speak(self, text: str) -> AsyncGenerator[tuple[str, bytes], None]:
        """``text`` as (piece of text, its μ-law audio) pairs, streamed as they are synthesized."""
        ...


@dataclass(frozen=True, slots=True)
class ServerOptions:
    delta_ms: int = 100
    """Audio per ``response.output_audio.delta``."""
    speed: float = 1.0
    """Delta pacing: 1.0 is real time, 2.0 twice as fast, 0 sends as soon as audio is ready."""
    error_on_turn: int | None = None
    """Send a ``server_error`` instead of transcribing and answering caller turn N (1-based)."""
    close_after_s: float | None = None
    """Close the connection with code 1011 this long after ``session.created``."""
    close_abruptly: bool = False
    """Instead, drop the TCP connection then without a close frame (a killed process)."""
    split_reply_items: bool = False
    """Speak a reply of several sentences as one assistant item per sentence, in one response."""
    fail_responses: frozenset[int] = frozenset()
    """Responses (1-based, every response of the connection counted) that fail with a ``server_error``."""
    incomplete_responses: frozenset[int] = frozenset()
    """Responses that stop after about half their audio, ``incomplete`` for ``max_output_tokens``."""
    quota_exceeded: bool = False
    """Every response fails with ``insufficient_quota``."""
    session_expires_after_s: float | None = None
    """Send ``session_expired`` and close (1001) this long after ``session.created``."""
    accepts_beta: bool = True
    """Serve the beta shape; off, a beta connection gets ``beta_api_shape_disabled`` and a close."""
    api_key: str | None = None
    """The one bearer token accepted; ``None`` accepts any."""
    reject_api_key_in_band: bool = True
    """Refuse a wrong key after the upgrade (``error`` then close 3000, as the live endpoint does); False: with
    HTTP 401 at the handshake."""
    check_model: bool = False
    """Refuse a ``?model=`` the ``openai`` package does not list for Realtime sessions, or a retired one."""
    retired_models: frozenset[str] = frozenset()
    """Models past their shutdown date: a connection's model among them gets ``model_not_found``; a transcription
    model among them is off the list of supported values, as an unknown one is."""
    idle_prompt: str = "Are you still there?"
    """What the response to ``server_vad``'s ``idle_timeout_ms`` says."""


@dataclass
class ServerSession:
    """What happened on one connection."""

    dialect: Dialect
    model: str | None
    """The ``model`` query parameter, if any."""
    headers: Headers
    client_events: list[Event] = field(default_factory=list)
    """Every event received, as parsed JSON, invalid ones included."""
    audio: bytearray = field(default_factory=bytearray)
    """All input audio appended, as the agent hears it: μ-law 8 kHz (byte-exact when the input format is μ-law,
    converted from A-law or 24 kHz PCM otherwise)."""
    server_events: list[Event] = field(default_factory=list)
    errors: list[Event] = field(default_factory=list)
    truncations: list[Event] = field(default_factory=list)
    """Accepted truncations: ``{item_id, audio_end_ms, audio_ms_sent_for_item}``."""
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def server_events_of(self, event_type: str) -> list[Event]:
        return [event for event in self.server_events if event["type"] == event_type]

    def client_events_of(self, event_type: str) -> list[Event]:
        return [event for event in self.client_events if event.get("type") == event_type]


AgentFactory = Callable[[], ConversationAgent]


class RealtimeServer:
    """Serves ``ws://host:port/v1/realtime``; use as an async context manager or start()/stop()."""

    def __init__(
        self,
        agent_factory: AgentFactory,
        options: ServerOptions | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.agent_factory = agent_factory
        self.options = options or ServerOptions()
        self.host = host
        self.port = port
        self.sessions: list[ServerSession] = []
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, process_request=self._check_request)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (code 1001) and wait for their handlers to finish."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != "/v1/realtime":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not found\n")
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Missing bearer authentication in header\n")
        key = authorization.removeprefix("Bearer ")
        if self.options.api_key is not None and key != self.options.api_key and not self.options.reject_api_key_in_band:
            # OpenAI's REST error body. The live Realtime endpoint instead upgrades and refuses in band: see
            # ServerOptions.reject_api_key_in_band.
            error = _invalid_api_key_body(key)
            body = {"error": {name: error[name] for name in ("message", "type", "param", "code")}}
            response = connection.respond(HTTPStatus.UNAUTHORIZED, json.dumps(body, indent=2) + "\n")
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        beta = "realtime=v1" in ws.request.headers.get("OpenAI-Beta", "")
        record = ServerSession(
            dialect="beta" if beta else "ga",
            model=query.get("model", [None])[0],
            headers=ws.request.headers,
        )
        self.sessions.append(record)
        agent = self.agent_factory()
        connection = _Connection(ws, record, agent, self.options)
        try:
            await connection.run()
        finally:
            await connection.shutdown()


@dataclass
class _Response:
    id: str
    number: int
    """1-based, counting every response of the connection."""
    text: str
    tool: ToolCall | None
    failure: Event | None = None
    """The ``status_details.error`` of a response that fails before any output."""
    char_budget: int | None = None
    """Stop, ``incomplete``, once this many characters have been spoken."""
    cancel_reason: str | None = None
    ran_out: bool = False
    """Stopped at ``char_budget``."""
    output: list[Event] = field(default_factory=list)
    """The output items created, in order."""
    input_tokens: tuple[int, int] = (0, 0)
    """(text, audio) tokens of the conversation the response was created from."""
    cached_tokens: tuple[int, int] = (0, 0)
    started: float | None = None
    """Loop time of the first audio delta."""
    deltas: int = 0
    audio_ms: float = 0.0
    chars_spoken: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def stopped(self) -> bool:
        return bool(self.cancel_reason) or self.ran_out

    @property
    def status(self) -> str:
        if self.failure is not None:
            return "failed"
        if self.cancel_reason:
            return "cancelled"
        return "incomplete" if self.ran_out else "completed"

    async def next_piece(self, pieces: AsyncIterator[tuple[str, bytes]]) -> tuple[str, bytes] | None:
        """The next synthesized piece, or ``None`` at the end or as soon as the response is cancelled."""
        if self.stopped:
            return None
        getter = asyncio.ensure_future(anext(pieces, None))
        waker = asyncio.ensure_future(self.wake.wait())
        done, _ = await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getter
        return None

    async def pause_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (loop time), waking early if the response is cancelled."""
        delay = deadline - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(delay, 0)):
                await self.wake.wait()


def _vad_defaults(turn_detection: Event | None) -> Event | None:
    """The service echoes turn detection with every default filled in."""
    if turn_detection is None:
        return None
    if turn_detection.get("type") == "semantic_vad":
        defaults: Event = {"type": "semantic_vad", "eagerness": "auto"}
    else:
        defaults = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    defaults |= {"create_response": True, "interrupt_response": True}
    return defaults | {key: value for key, value in turn_detection.items() if value is not None}


def _merge(target: Event, update: Event) -> None:
    """Apply a partial session update: only fields present change; the ``audio`` sections merge, the rest replace."""
    for key, value in update.items():
        if key in ("audio", "input", "output"):
            _merge(target[key], value or {})  # a null section changes nothing
        else:
            target[key] = value


def _tokens(chars: int) -> int:
    """Text tokens for ``chars`` characters, at the usual four characters a token."""
    return math.ceil(chars / 4)


def _out_of_range(param: str, value: float, bounds: tuple[float, float]) -> tuple[str, str, str] | None:
    """The service's refusal of a number out of its range: (message, code, param), or ``None`` when it is in range.

    Its wording and codes say ``integer`` or ``decimal`` after the field's type.
    """
    low, high = bounds
    if low <= value <= high:
        return None
    above = value > high
    kind = "integer" if isinstance(value, int) else "decimal"
    bound = f"<= {high}" if above else f">= {low}"
    shown = value if isinstance(value, int) else float(value)
    message = f"Invalid '{param}': {kind} {'above maximum' if above else 'below minimum'} value. "
    message += f"Expected a value {bound}, but got {shown!r} instead."
    return message, f"{kind}_{'above_max' if above else 'below_min'}_value", param


class _Connection:
    """Protocol state for one WebSocket connection."""

    def __init__(
        self, ws: ServerConnection, record: ServerSession, agent: ConversationAgent, options: ServerOptions
    ) -> None:
        self.ws = ws
        self.record = record
        self.agent = agent
        self.options = options
        self.ga = record.dialect == "ga"
        self.conversation_id = _new_id("conv")
        self.config = self._default_session()
        self.items: dict[str, Event] = {}  # the conversation, in order
        self.audio_sent: dict[str, int] = {}  # assistant item id -> audio bytes sent, in the item's wire format
        self.audio_rate: dict[str, int] = {}  # assistant item id -> bytes per ms of its wire format
        self.user_audio_ms: dict[str, int] = {}  # user audio item id -> its length
        self.caller_transcripts: list[str] = []
        self.active: _Response | None = None
        self.responses = 0
        self.last_input_tokens = (0, 0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.buffer = bytearray()  # uncommitted input audio, μ-law
        self.pending = bytearray()  # input audio not yet a whole VAD frame
        self.undecoded = b""  # 24 kHz PCM input not yet a whole 3-sample frame
        self.speech_item: str | None = None  # set between speech_started and speech_stopped
        self.loud_ms = 0
        self.quiet_ms = 0
        self.idle: asyncio.Task[None] | None = None

    def _default_session(self) -> Event:
        vad = _vad_defaults({"type": "server_vad"})
        if not self.ga:
            return {
                "id": _new_id("sess"),
                "model": self.record.model or "gpt-4o-realtime-preview",
                "modalities": ["text", "audio"],
                "instructions": "",
                "voice": "alloy",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": None,
                "turn_detection": vad,
                "tools": [],
                "tool_choice": "auto",
                "temperature": 0.8,
                "max_response_output_tokens": "inf",
            }
        pcm = {"type": "audio/pcm", "rate": 24000}
        return {
            "type": "realtime",
            "model": self.record.model or "gpt-realtime",
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "audio": {
                "input": {"format": dict(pcm), "transcription": None, "noise_reduction": None, "turn_detection": vad},
                "output": {"format": dict(pcm), "voice": "alloy", "speed": 1.0},
            },
        }

    # Session configuration, read in the connection's dialect.

    @property
    def _input(self) -> Event:
        return self.config["audio"]["input"] if self.ga else self.config

    @property
    def _vad(self) -> Event | None:
        return self._input["turn_detection"]  # type: ignore[no-any-return]

    @property
    def _transcribes(self) -> bool:
        return bool(self._input["transcription" if self.ga else "input_audio_transcription"])

    @property
    def _input_format(self) -> str:
        if self.ga:
            return str(self.config["audio"]["input"]["format"]["type"])
        return BETA_TO_GA_AUDIO_FORMAT[self.config["input_audio_format"]]

    @property
    def _output_format(self) -> str:
        if self.ga:
            return str(self.config["audio"]["output"]["format"]["type"])
        return BETA_TO_GA_AUDIO_FORMAT[self.config["output_audio_format"]]

    @property
    def _max_output_tokens(self) -> int | str:
        value = self.config["max_output_tokens" if self.ga else "max_response_output_tokens"]
        return value if isinstance(value, int) else "inf"

    @property
    def _input_ms(self) -> int:
        """Input audio appended so far, in ms."""
        return len(self.record.audio) // BYTES_PER_MS

    # Plumbing.

    async def run(self) -> None:
        if not await self._admit():
            return
        await self._send("session.created", session=self.config)
        if not self.ga:
            await self._send(
                "conversation.created", conversation={"id": self.conversation_id, "object": "realtime.conversation"}
            )
        if self.options.close_after_s is not None:
            self._spawn(self._close_later(self.options.close_after_s))
        if self.options.session_expires_after_s is not None:
            self._spawn(self._expire_later(self.options.session_expires_after_s))
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                await self._receive(message)

    async def _admit(self) -> bool:
        """Refuse the connection as the service does after the upgrade: an ``error``, then a close.

        What the live service does (a capture of wss://api.openai.com/v1/realtime, 2026-09-18, and others
        reporting the same): a wrong key gets ``invalid_api_key`` and close 3000; the ``OpenAI-Beta: realtime=v1``
        header gets ``beta_api_shape_disabled`` and close 4000; ``?model=gpt-nope`` gets ``invalid_model``
        ('Model "gpt-nope" is not supported in realtime mode. ...') and close 4000. Each close's reason is the
        error's ``type.code``. A model the account cannot use (here: a retired one) gets ``model_not_found``; it was
        reported closing with 4004.
        """
        options = self.options
        key = self.ws.request.headers.get("Authorization", "").removeprefix("Bearer ") if self.ws.request else ""
        if options.api_key is not None and options.reject_api_key_in_band and key != options.api_key:
            error = _invalid_api_key_body(key)
            await self._refuse(error["message"], error["code"], 3000)
            return False
        if not self.ga and not options.accepts_beta:
            await self._refuse(_BETA_DISABLED, "beta_api_shape_disabled", 4000)
            return False
        model = self.record.model
        if options.check_model and model is not None:
            if model in options.retired_models:
                message = _deprecated(model)
                await self._refuse(message, "model_not_found", 4004)
                return False
            if model not in realtime_models():
                message = (
                    f'Model "{model}" is not supported in realtime mode. '
                    "See https://platform.openai.com/docs/models for a list of supported models."
                )
                await self._refuse(message, "invalid_model", 4000)
                return False
        return True

    async def _refuse(self, message: str, code: str, close_code: int) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._error(message, code)
            await self.ws.close(close_code, f"invalid_request_error.{code}")

    async def shutdown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.record.closed.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _close_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.options.close_abruptly:
            self.ws.transport.abort()
        else:
            await self.ws.close(1011, "Internal server error")

    async def _expire_later(self, delay: float) -> None:
        """The service's session limit (60 minutes): ``session_expired``, then the socket closes."""
        await asyncio.sleep(delay)
        with contextlib.suppress(ConnectionClosed):
            await self._error(_SESSION_EXPIRED, "session_expired")
            await self.ws.close(1001, "invalid_request_error.session_expired")

    async def _send(self, event_type: str, **fields: Any) -> None:
        name = event_type if self.ga else _BETA_NAMES.get(event_type, event_type)
        text = json.dumps({"event_id": _new_id("event"), "type": name, **fields})
        recorded = json.loads(text)  # a snapshot: items change as responses progress
        self.record.server_events.append(recorded)
        if name == "error":
            self.record.errors.append(recorded)
        await self.ws.send(text)

    async def _error(
        self, message: str, code: str | None, param: str | None = None, *, cause: Event | None = None
    ) -> None:
        event_id = cause.get("event_id") if cause else None
        error = {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id,
        }
        await self._send("error", error=error)

    async def _item_event(self, stage: str, item: Event, previous_item_id: str | None) -> None:
        """GA announces an item with ``conversation.item.added`` and ``.done``; beta only with ``.created``."""
        if self.ga:
            await self._send(f"conversation.item.{stage}", previous_item_id=previous_item_id, item=item)
        elif stage == "added":
            await self._send("conversation.item.created", previous_item_id=previous_item_id, item=item)

    async def _add_item(self, item: Event) -> None:
        previous = next(reversed(self.items), None)
        self.items[item["id"]] = item
        await self._item_event("added", item, previous)
        await self._item_event("done", item, previous)

    async def _receive(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._error("Binary frames are not supported; send events as JSON text frames.", "invalid_json")
            return
        try:
            event = json.loads(message)
        except ValueError as exc:
            await self._error(f"Invalid JSON: {exc}.", "invalid_json")
            return
        if not isinstance(event, dict):
            await self._error("Expected a JSON object.", "invalid_json")
            return
        self.record.client_events.append(event)
        try:
            validate_client_event(event, self.record.dialect)
        except ConformanceError as exc:
            await self._error(exc.message, exc.code, exc.param, cause=event)
            return
        handler = self._handlers().get(event["type"])
        if handler is not None:
            await handler(event)

    def _handlers(self) -> dict[str, Callable[[Event], Coroutine[Any, Any, None]]]:
        return {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_request,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }

    # Client events.

    async def _session_update(self, event: Event) -> None:
        update = copy.deepcopy(event["session"])
        if self.ga and update["type"] != "realtime":
            message = f"Session type cannot be changed from 'realtime' to '{update['type']}'."
            await self._error(message, "invalid_value", "session.type", cause=event)
            return
        refused = self._refusal(update)
        if refused is not None:  # the service applies none of a refused update
            message, code, param = refused
            await self._error(message, code, param, cause=event)
            return
        update.pop("client_secret", None)  # beta session.update accepts it; the session object has no such field
        formats = (self._input_format, self._output_format)
        _merge(self.config, update)
        self._input["turn_detection"] = _vad_defaults(self._vad)
        if self.ga and self._input["transcription"]:
            self._input["transcription"] = {"language": None, "prompt": None} | self._input["transcription"]
        if self._vad is None:
            self._reset_vad()
            self._cancel_idle()
        if formats[0] != self._input_format:
            self.undecoded = b""
        await self._send("session.updated", session=self.config)

    def _refusal(self, update: Event) -> tuple[str, str, str] | None:
        """Why the service would refuse this (conformant) session update: (message, code, param), or ``None``."""
        audio = update.get("audio") or {}
        output = (audio.get("output") or {}) if self.ga else update
        source = (audio.get("input") or {}) if self.ga else update
        where = "session.audio.output" if self.ga else "session"
        voice = output.get("voice")
        if voice is not None and not isinstance(voice, dict) and voice not in BUILTIN_VOICES:
            message = f"Invalid value: '{voice}'. Supported values are: {_supported(BUILTIN_VOICES)}."
            return message, "invalid_value", f"{where}.voice"
        speed = output.get("speed")
        if isinstance(speed, int | float) and (refusal := _out_of_range(f"{where}.speed", float(speed), _SPEED_RANGE)):
            return refusal
        transcription_key = "transcription" if self.ga else "input_audio_transcription"
        transcription = source.get(transcription_key)
        model = transcription.get("model") if isinstance(transcription, dict) else None
        if model is not None:
            param = (
                f"session.audio.input.{transcription_key}.model" if self.ga else f"session.{transcription_key}.model"
            )
            # The session schema validates the model against a list, as the SDK's Literal does; a model past its
            # shutdown date is off that list, so it is refused like a misspelt one.
            served = tuple(name for name in transcription_models() if name not in self.options.retired_models)
            if model not in served:
                message = f"Invalid value: '{model}'. Supported values are: {_supported(served)}."
                return message, "invalid_value", param
        for index, tool in enumerate(update.get("tools") or []):
            if tool.get("type", "function") != "function" or "parameters" not in tool:
                continue
            parameters = tool["parameters"]
            schema_type = parameters.get("type") if isinstance(parameters, dict) else None
            if schema_type != "object":
                message = (
                    f"Invalid schema for function '{tool.get('name', '')}': schema must be a JSON Schema of "
                    f"'type: \"object\"', got 'type: \"{schema_type}\"'."
                )
                return message, "invalid_function_parameters", f"session.tools[{index}].parameters"
        limit_key = "max_output_tokens" if self.ga else "max_response_output_tokens"
        limit = update.get(limit_key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            return _out_of_range(f"session.{limit_key}", limit, _MAX_OUTPUT_TOKENS_RANGE)
        return None

    def _decode_input(self, data: bytes) -> bytes:
        """Appended audio in the session's input format → the μ-law 8 kHz the agent hears."""
        wire_format = self._input_format
        if wire_format == "audio/pcma":
            return data.translate(_ALAW_TO_ULAW)
        if wire_format != "audio/pcm":
            return data
        data = self.undecoded + data
        whole = len(data) - len(data) % _PCM_FRAME
        self.undecoded = data[whole:]
        return _pcm24k_to_ulaw(data[:whole])

    async def _append(self, event: Event) -> None:
        try:
            raw = base64.b64decode(event["audio"], validate=True)
        except binascii.Error:
            await self._error(
                "Invalid 'audio'. Expected base64-encoded audio bytes.", "invalid_value", "audio", cause=event
            )
            return
        audio = self._decode_input(raw)
        self.record.audio += audio
        self.buffer += audio
        if self._vad is None:
            return
        start = len(self.record.audio) - len(audio) - len(self.pending)  # byte offset of self.pending
        data = bytes(self.pending + audio)
        whole = len(data) - len(data) % _FRAME
        self.pending = bytearray(data[whole:])
        for offset in range(0, whole, _FRAME):
            await self._vad_frame(data[offset : offset + _FRAME], (start + offset + _FRAME) // BYTES_PER_MS)

    async def _vad_frame(self, frame: bytes, end_ms: int) -> None:
        vad = self._vad
        if vad is None:  # turned off by a session.update processed mid-append
            return
        loud = self.agent.hears_speech(frame)
        if self.speech_item is None:
            self.loud_ms = self.loud_ms + 20 if loud else 0
            if self.loud_ms < _SPEECH_START_MS:
                return
            self.speech_item, self.quiet_ms = _new_id("item"), 0
            self._cancel_idle()
            start_ms = max(0, end_ms - self.loud_ms - vad.get("prefix_padding_ms", 300))
            await self._send("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=self.speech_item)
            if vad["interrupt_response"] and self.active is not None:
                await self._cancel("turn_detected")
            return
        self.quiet_ms = 0 if loud else self.quiet_ms + 20
        if self.quiet_ms >= vad.get("silence_duration_ms", 500):
            item_id = self.speech_item
            self._reset_vad()
            await self._send("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)
            await self._commit(item_id, respond=vad["create_response"])

    def _reset_vad(self) -> None:
        self.speech_item, self.loud_ms, self.quiet_ms = None, 0, 0
        self.pending.clear()

    async def _commit_request(self, event: Event) -> None:
        buffered_ms = len(self.buffer) / BYTES_PER_MS
        if buffered_ms < _MIN_COMMIT_MS:
            message = (
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{_MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio."
            )
            await self._error(message, "input_audio_buffer_commit_empty", cause=event)
            return
        item_id = self.speech_item or _new_id("item")
        self._reset_vad()
        await self._commit(item_id, respond=False)

    async def _commit_buffer(self, item_id: str) -> bytes:
        """Commit the input buffer as a user audio item; returns its audio."""
        turn_audio = bytes(self.buffer)
        self.buffer.clear()
        await self._send(
            "input_audio_buffer.committed", item_id=item_id, previous_item_id=next(reversed(self.items), None)
        )
        self.user_audio_ms[item_id] = len(turn_audio) // BYTES_PER_MS
        content = [{"type": "input_audio", "transcript": None}]
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user"}
        await self._add_item(item | {"content": content})
        return turn_audio

    async def _commit(self, item_id: str, *, respond: bool) -> None:
        """A caller turn: commit the buffer as a user audio item, transcribe it, maybe answer it."""
        turn = len(self.caller_transcripts) + 1
        turn_audio = await self._commit_buffer(item_id)
        if turn == self.options.error_on_turn:
            self.caller_transcripts.append("")
            error = {"type": "server_error", "code": None, "message": _SERVER_ERROR, "param": None, "event_id": None}
            await self._send("error", error=error)
            return
        transcript = await self.agent.transcribe(turn_audio, turn)
        self.caller_transcripts.append(transcript)
        if self._transcribes:
            words = len(transcript.split())
            usage = {"type": "tokens", "input_tokens": 20, "output_tokens": words, "total_tokens": 20 + words}
            await self._send(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=transcript,
                usage=usage,
            )
        if respond and self.active is None:
            self._start_response(None)

    async def _clear(self, event: Event) -> None:
        self.buffer.clear()
        self._reset_vad()
        await self._send("input_audio_buffer.cleared")

    async def _item_create(self, event: Event) -> None:
        item = {"object": "realtime.item", "status": "completed"} | event["item"]
        item["id"] = item.get("id") or _new_id("item")
        await self._add_item(item)

    async def _find_item(self, event: Event) -> Event | None:
        item = self.items.get(event["item_id"])
        if item is None:
            await self._error(
                f"Item with item_id not found: {event['item_id']}", "invalid_value", "item_id", cause=event
            )
        return item

    async def _item_delete(self, event: Event) -> None:
        """Delete an item; one the active response is still producing leaves the conversation at once.

        What the live service does with an item still being produced is not documented. Here the item leaves the
        conversation (a later truncate or retrieve of it fails), and the response goes on: its events still name
        the item, without ``conversation.item.done``, and ``response.done`` still lists it among its output.
        """
        if await self._find_item(event) is not None:
            del self.items[event["item_id"]]
            await self._send("conversation.item.deleted", item_id=event["item_id"])

    async def _item_retrieve(self, event: Event) -> None:
        item = await self._find_item(event)
        if item is not None:
            await self._send("conversation.item.retrieved", item=item)

    async def _truncate(self, event: Event) -> None:
        item = await self._find_item(event)
        if item is None:
            return
        item_id, audio_end_ms = event["item_id"], event["audio_end_ms"]
        if item.get("role") != "assistant" or item_id not in self.audio_sent:
            message = "Only model output audio messages can be truncated"
            await self._error(message, "unsupported_content_type", "item_id", cause=event)
            return
        if event["content_index"] != 0:
            message = f"Invalid 'content_index': {event['content_index']}. The item has one content part."
            await self._error(message, "invalid_value", "content_index", cause=event)
            return
        sent_ms = self.audio_sent[item_id] // self.audio_rate[item_id]
        if audio_end_ms > sent_ms:
            message = f"Audio content of {sent_ms}ms is already shorter than {audio_end_ms}ms"
            await self._error(message, "invalid_value", "audio_end_ms", cause=event)
            return
        self.record.truncations.append(
            {"item_id": item_id, "audio_end_ms": audio_end_ms, "audio_ms_sent_for_item": sent_ms}
        )
        await self._send("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)

    async def _response_create(self, event: Event) -> None:
        if self.active is not None:
            message = (
                f"Conversation already has an active response in progress: {self.active.id}. "
                "Wait until the response is finished before creating a new one."
            )
            await self._error(message, "conversation_already_has_active_response", cause=event)
            return
        self._start_response((event.get("response") or {}).get("instructions"))

    async def _response_cancel(self, event: Event) -> None:
        wanted = event.get("response_id")
        if self.active is None or (wanted and wanted != self.active.id):
            await self._error(
                "Cancellation failed: no active response found", "response_cancel_not_active", cause=event
            )
            return
        await self._cancel("client_cancelled")

    # Idle timeout.

    def _arm_idle(self, response: _Response) -> None:
        """Start ``idle_timeout_ms`` once the response's audio has finished playing at the caller.

        The service counts the timeout from the end of playback: ``response.done`` plus the audio's duration. The
        audio is taken to play in real time from its first delta, so playback ends then plus its length, or at
        ``response.done`` if that is later.
        """
        vad = self._vad
        timeout_ms = vad.get("idle_timeout_ms") if vad is not None and vad["type"] == "server_vad" else None
        if timeout_ms is None or self.speech_item is not None or self.active is not None:
            return
        loop = asyncio.get_running_loop()
        played = (response.started or loop.time()) + response.audio_ms / 1000
        self._cancel_idle()
        self.idle = self._spawn(self._idle_wait(max(played, loop.time()), timeout_ms / 1000))

    def _cancel_idle(self) -> None:
        if self.idle is not None and self.idle is not asyncio.current_task():
            self.idle.cancel()
        self.idle = None

    async def _idle_wait(self, played: float, idle_s: float) -> None:
        """Wait out playback and the idle timeout, then prompt: ``timeout_triggered``, an empty commit, a response."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(played - loop.time())
        start_ms = self._input_ms  # the input audio after playback ended
        await asyncio.sleep(idle_s)
        self.idle = None
        item_id = _new_id("item")
        with contextlib.suppress(ConnectionClosed):
            await self._send(
                "input_audio_buffer.timeout_triggered",
                audio_start_ms=start_ms,
                audio_end_ms=max(self._input_ms, start_ms),
                item_id=item_id,
            )
            self._reset_vad()
            await self._commit_buffer(item_id)
            if self.active is None:
                self._start_response(None, say=self.options.idle_prompt)

    # Responses.

    def _start_response(self, instructions: str | None, *, say: str | None = None) -> None:
        self._cancel_idle()
        self.responses += 1
        number, options = self.responses, self.options
        failure: Event | None = None
        if options.quota_exceeded:
            failure = {"type": "insufficient_quota", "code": "insufficient_quota", "message": _QUOTA_ERROR}
        elif number in options.fail_responses:
            failure = {"type": "server_error", "code": "server_error", "message": _SERVER_ERROR}
        plan: str | ToolCall = "" if failure is not None else say if say is not None else self._plan(instructions)
        text, tool = ("", plan) if isinstance(plan, ToolCall) else (plan, None)
        response = _Response(_new_id("resp"), number, text, tool, failure)
        if number in options.incomplete_responses and tool is None:
            response.char_budget = max(1, len(text) // 2)
        response.input_tokens = self._conversation_tokens(instructions)
        last_text, last_audio = self.last_input_tokens
        text_tokens, audio_tokens = response.input_tokens
        response.cached_tokens = (min(last_text, text_tokens) // 64 * 64, min(last_audio, audio_tokens) // 64 * 64)
        self.last_input_tokens = response.input_tokens
        self.active = response
        response.task = self._spawn(self._run_response(response))

    def _plan(self, instructions: str | None) -> str | ToolCall:
        """Decide what the next response says, or which function it calls.

        ``Start the call now by saying exactly: X`` style instructions are followed to the letter, as a real
        model would; everything else is the agent's decision.
        """
        exact = re.search(r"saying exactly:\s*(.+)", instructions or "", re.IGNORECASE | re.DOTALL)
        if exact:
            return exact.group(1).strip().strip("'\"“”")
        last = self.items[next(reversed(self.items))] if self.items else None
        tool_output = last["output"] if last is not None and last["type"] == "function_call_output" else None
        tools = [tool.get("name", "") for tool in self.config.get("tools") or []]
        context = TurnContext(
            list(self.caller_transcripts), tool_output, instructions or self.config.get("instructions") or "", tools
        )
        return self.agent.plan(context)

    def _conversation_tokens(self, instructions: str | None) -> tuple[int, int]:
        """The (text, audio) input tokens of a response: instructions, tools and the conversation so far.

        Deterministic stand-ins for the model's counts: text at four characters a token, caller audio at ten
        tokens a second and the model's own audio at twenty, as the service bills them.
        """
        text = 20 + _tokens(len(instructions or self.config.get("instructions") or ""))
        text += _tokens(len(json.dumps(self.config.get("tools") or [])))
        audio = 0
        for item_id, item in self.items.items():
            if item_id in self.user_audio_ms:
                audio += math.ceil(self.user_audio_ms[item_id] / 100)
            elif item_id in self.audio_sent:
                audio += math.ceil(self.audio_sent[item_id] / self.audio_rate[item_id] / 50)
            else:
                text += 4 + _tokens(len(json.dumps(item.get("content") or item.get("output") or item.get("arguments"))))
        return text, audio

    def _usage(self, response: _Response) -> Event:
        """``response.usage`` in the service's shape; a failed response used nothing."""
        text_in, audio_in = (0, 0) if response.failure else response.input_tokens
        cached_text, cached_audio = (0, 0) if response.failure else response.cached_tokens
        text_out = audio_out = 0
        for item in response.output:
            if item["type"] == "function_call":
                text_out += 5 + _tokens(len(item["name"]) + len(item["arguments"]))
            else:
                text_out += _tokens(len("".join(part.get("transcript") or "" for part in item["content"])))
                audio_out += math.ceil(self.audio_sent.get(item["id"], 0) / self.audio_rate.get(item["id"], 1) / 50)
        cached: Event = {"cached_tokens": cached_text + cached_audio}
        if self.ga:  # the beta usage object has no breakdown of cached tokens
            cached["cached_tokens_details"] = {"text_tokens": cached_text, "audio_tokens": cached_audio}
        return {
            "total_tokens": text_in + audio_in + text_out + audio_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": text_out + audio_out,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in} | cached,
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    async def _cancel(self, reason: str) -> None:
        """Stop the active response; its task sends the closing events, and this waits for them."""
        response = self.active
        assert response is not None and response.task is not None
        response.cancel_reason = reason
        response.wake.set()
        await response.task

    async def _run_response(self, response: _Response) -> None:
        try:
            await self._send("response.created", response=self._response_object(response, "in_progress"))
            if response.failure is not None:
                pass  # the service fails such a response before any output
            elif response.tool is not None:
                await self._stream_function_call(response, response.tool.name, response.tool.arguments)
            else:
                await self._stream_audio(response)
            if self.active is response:
                self.active = None  # before response.done, so a client reacting to it may create the next one
            await self._send("response.done", response=self._response_object(response, response.status, done=True))
            self._arm_idle(response)
        except ConnectionClosed:
            pass
        finally:
            if self.active is response:
                self.active = None

    def _response_object(self, response: _Response, status: str, *, done: bool = False) -> Event:
        details: Event | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": response.cancel_reason}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif status == "failed":
            details = {"type": "failed", "error": response.failure}
        body: Event = {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": response.output if done else [],
            "conversation_id": self.conversation_id,
            "max_output_tokens": self._max_output_tokens,
            "usage": self._usage(response) if done else None,
            "metadata": None,
        }
        if self.ga:
            output_config = self.config["audio"]["output"]
            voice = output_config["voice"]  # a response names a custom voice by its id
            audio = {
                "output": {
                    "format": output_config["format"],
                    "voice": voice.get("id") if isinstance(voice, dict) else voice,
                }
            }
            return body | {"output_modalities": ["audio"], "audio": audio}
        return body | {
            "modalities": ["text", "audio"],
            "voice": self.config["voice"],
            "output_audio_format": self.config["output_audio_format"],
            "temperature": self.config.get("temperature", 0.8),
        }

    async def _open_item(self, response: _Response, item: Event) -> tuple[int, str | None]:
        """Add an output item to the response and the conversation; returns its output index and the id before it."""
        previous = next(reversed(self.items), None)
        item |= {"id": _new_id("item"), "object": "realtime.item", "status": "in_progress"}
        output_index = len(response.output)
        response.output.append(item)
        self.items[item["id"]] = item
        await self._send("response.output_item.added", response_id=response.id, output_index=output_index, item=item)
        await self._item_event("added", item, previous)
        return output_index, previous

    async def _close_item(self, response: _Response, item: Event, output_index: int, previous: str | None) -> None:
        await self._send("response.output_item.done", response_id=response.id, output_index=output_index, item=item)
        if item["id"] in self.items:  # not if the client deleted it meanwhile
            await self._item_event("done", item, previous)

    async def _stream_function_call(self, response: _Response, name: str, arguments: str) -> None:
        item: Event = {"type": "function_call", "name": name, "call_id": _new_id("call"), "arguments": ""}
        output_index, previous = await self._open_item(response, item)
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": output_index}
        ids["call_id"] = item["call_id"]
        await self._send("response.function_call_arguments.delta", **ids, delta=arguments)
        named = {"name": name} if self.ga else {}  # the beta event has no name
        await self._send("response.function_call_arguments.done", **ids, **named, arguments=arguments)
        item |= {"status": "completed", "arguments": arguments}
        await self._close_item(response, item, output_index, previous)

    async def _stream_audio(self, response: _Response) -> None:
        """The reply as one assistant audio item, or one per sentence with ``split_reply_items``.

        A response that is cancelled or runs out of tokens leaves its current item ``incomplete`` and creates no
        later one.
        """
        wire_format = self._output_format  # fixed for the response, as the service fixes it
        texts = _sentences(response.text) if self.options.split_reply_items else [response.text]
        for text in texts:
            if response.stopped:
                break
            await self._stream_audio_item(response, text, wire_format)

    async def _stream_audio_item(self, response: _Response, text: str, wire_format: str) -> None:
        item: Event = {"type": "message", "role": "assistant", "content": []}
        output_index, previous = await self._open_item(response, item)
        item_id, rate = item["id"], _BYTES_PER_MS[wire_format]
        self.audio_sent[item_id], self.audio_rate[item_id] = 0, rate
        ids = {"response_id": response.id, "item_id": item_id, "output_index": output_index, "content_index": 0}
        await self._send("response.content_part.added", **ids, part={"type": "audio", "transcript": ""})

        delta_ms, speed = self.options.delta_ms, self.options.speed
        chunk = delta_ms * rate
        loop = asyncio.get_running_loop()
        transcript = ""
        async with contextlib.aclosing(self.agent.speak(text)) as pieces:
            while (piece := await response.next_piece(pieces)) is not None:
                piece_text, ulaw = piece
                audio = _to_wire(ulaw, wire_format)
                count = max(1, math.ceil(len(audio) / chunk))
                chars = 0
                for index in range(count):
                    if response.started is None:
                        response.started = loop.time()
                    if speed > 0:
                        await response.pause_until(response.started + response.deltas * delta_ms / 1000 / speed)
                    else:
                        await asyncio.sleep(0)  # let the receive loop run: caller audio may interrupt
                    if response.cancel_reason:
                        break
                    part = audio[index * chunk : (index + 1) * chunk]
                    # Count the audio before sending it, so a truncate sent on receipt always sees it.
                    self.audio_sent[item_id] += len(part)
                    response.audio_ms += len(part) / rate
                    await self._send("response.output_audio.delta", **ids, delta=base64.b64encode(part).decode())
                    response.deltas += 1
                    upto = round(len(piece_text) * (index + 1) / count)
                    if upto > chars:
                        await self._send("response.output_audio_transcript.delta", **ids, delta=piece_text[chars:upto])
                        transcript += piece_text[chars:upto]
                        response.chars_spoken += upto - chars
                        chars = upto
                    if response.char_budget is not None and response.chars_spoken >= response.char_budget:
                        response.ran_out = True
                        break
                if response.stopped:
                    break

        item["status"] = "incomplete" if response.stopped else "completed"
        item["content"] = [{"type": "output_audio" if self.ga else "audio", "transcript": transcript}]
        await self._send("response.output_audio.done", **ids)
        await self._send("response.output_audio_transcript.done", **ids, transcript=transcript)
        await self._send("response.content_part.done", **ids, part={"type": "audio", "transcript": transcript})
        await self._close_item(response, item, output_index, previous)
