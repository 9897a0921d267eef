"""A Realtime-compatible WebSocket server: the protocol, with the mind and voice behind it pluggable.

The server speaks the documented OpenAI Realtime protocol: the GA shape by default, the older beta shape when the
client sends ``OpenAI-Beta: realtime=v1``. It keeps the service's event order and answers mistakes with the
service's error codes; every incoming event goes through
:func:`~callbridge.testing.conformance.validate_client_event`, so a misspelt field fails here as it would in
production. What it hears, understands and says comes from a :class:`ConversationAgent`, one per connection:
the scripted one of :mod:`callbridge.testing.fake_realtime`, or the speech models of :mod:`callbridge.engine`.

Audio is G.711 μ-law at 8 kHz in both directions, whatever format the session asks for. Each connection is
recorded as a :class:`ServerSession` for assertions and metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import math
import re
import secrets
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

from callbridge.audio import BYTES_PER_MS
from callbridge.testing.conformance import ConformanceError, Dialect, validate_client_event

__all__ = [
    "ConversationAgent",
    "RealtimeServer",
    "ServerOptions",
    "ServerSession",
    "ToolCall",
    "TurnContext",
]

Event = dict[str, Any]

_FRAME = 20 * BYTES_PER_MS  # VAD frame: 20 ms
_SPEECH_START_MS = 60  # loud audio needed before speech_started
_MIN_COMMIT_MS = 100  # the service refuses to commit less
_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that! You can retry your request, "
    "or contact us through our help center at help.openai.com if the error persists."
)
_BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


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
    """All μ-law audio appended, byte-exact."""
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
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Missing bearer authentication in header\n")
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
    text: str
    tool: ToolCall | None
    cancel_reason: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def next_piece(self, pieces: AsyncIterator[tuple[str, bytes]]) -> tuple[str, bytes] | None:
        """The next synthesized piece, or ``None`` at the end or as soon as the response is cancelled."""
        if self.cancel_reason:
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
        self.audio_sent: dict[str, int] = {}  # assistant item id -> μ-law bytes sent
        self.caller_transcripts: list[str] = []
        self.active: _Response | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.buffer = bytearray()  # uncommitted input audio
        self.pending = bytearray()  # input audio not yet a whole VAD frame
        self.speech_item: str | None = None  # set between speech_started and speech_stopped
        self.loud_ms = 0
        self.quiet_ms = 0

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

    # Plumbing.

    async def run(self) -> None:
        await self._send("session.created", session=self.config)
        if not self.ga:
            await self._send(
                "conversation.created", conversation={"id": self.conversation_id, "object": "realtime.conversation"}
            )
        if self.options.close_after_s is not None:
            self._spawn(self._close_later(self.options.close_after_s))
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                await self._receive(message)

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
        update.pop("client_secret", None)  # beta session.update accepts it; the session object has no such field
        _merge(self.config, update)
        self._input["turn_detection"] = _vad_defaults(self._vad)
        if self._vad is None:
            self._reset_vad()
        await self._send("session.updated", session=self.config)

    async def _append(self, event: Event) -> None:
        try:
            audio = base64.b64decode(event["audio"], validate=True)
        except binascii.Error:
            await self._error(
                "Invalid 'audio'. Expected base64-encoded audio bytes.", "invalid_value", "audio", cause=event
            )
            return
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

    async def _commit(self, item_id: str, *, respond: bool) -> None:
        """A caller turn: commit the buffer as a user audio item, transcribe it, maybe answer it."""
        turn_audio = bytes(self.buffer)
        self.buffer.clear()
        turn = len(self.caller_transcripts) + 1
        await self._send(
            "input_audio_buffer.committed", item_id=item_id, previous_item_id=next(reversed(self.items), None)
        )
        content = [{"type": "input_audio", "transcript": None}]
        await self._add_item(
            {
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "status": "completed",
                "role": "user",
                "content": content,
            }
        )
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
        sent_ms = self.audio_sent[item_id] // BYTES_PER_MS
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

    # Responses.

    def _start_response(self, instructions: str | None) -> None:
        plan = self._plan(instructions)
        text, tool = ("", plan) if isinstance(plan, ToolCall) else (plan, None)
        response = _Response(_new_id("resp"), text, tool)
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
            if response.tool is not None:
                await self._stream_function_call(response, response.tool.name, response.tool.arguments)
            else:
                await self._stream_audio(response)
        except ConnectionClosed:
            pass
        finally:
            if self.active is response:
                self.active = None

    def _response_object(
        self, response: _Response, status: str, output: list[Event] | None = None, usage: Event | None = None
    ) -> Event:
        details = {"type": "cancelled", "reason": response.cancel_reason} if status == "cancelled" else None
        body: Event = {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": output or [],
            "conversation_id": self.conversation_id,
            "max_output_tokens": "inf",
            "usage": usage,
            "metadata": None,
        }
        if self.ga:
            output_config = self.config["audio"]["output"]
            audio = {"output": {"format": output_config["format"], "voice": output_config["voice"]}}
            return body | {"output_modalities": ["audio"], "audio": audio}
        return body | {
            "modalities": ["text", "audio"],
            "voice": self.config["voice"],
            "output_audio_format": self.config["output_audio_format"],
            "temperature": self.config.get("temperature", 0.8),
        }

    async def _open_item(self, response: _Response, item: Event) -> str | None:
        """Add a response's output item to the conversation; returns the id of the item before it."""
        previous = next(reversed(self.items), None)
        item |= {"id": _new_id("item"), "object": "realtime.item", "status": "in_progress"}
        self.items[item["id"]] = item
        await self._send("response.output_item.added", response_id=response.id, output_index=0, item=item)
        await self._item_event("added", item, previous)
        return previous

    async def _finish(self, response: _Response, item: Event, previous: str | None, audio_ms: int) -> None:
        """Send the closing events shared by every response."""
        await self._send("response.output_item.done", response_id=response.id, output_index=0, item=item)
        await self._item_event("done", item, previous)
        if self.active is response:
            self.active = None  # before response.done, so a client reacting to it may create the next one
        output_tokens = len(json.dumps(item)) // 4 + audio_ms // 50
        usage = {"total_tokens": 100 + output_tokens, "input_tokens": 100, "output_tokens": output_tokens}
        status = "cancelled" if response.cancel_reason else "completed"
        await self._send("response.done", response=self._response_object(response, status, [item], usage))

    async def _stream_function_call(self, response: _Response, name: str, arguments: str) -> None:
        item: Event = {"type": "function_call", "name": name, "call_id": _new_id("call"), "arguments": ""}
        previous = await self._open_item(response, item)
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": 0, "call_id": item["call_id"]}
        await self._send("response.function_call_arguments.delta", **ids, delta=arguments)
        named = {"name": name} if self.ga else {}  # the beta event has no name
        await self._send("response.function_call_arguments.done", **ids, **named, arguments=arguments)
        item |= {"status": "completed", "arguments": arguments}
        await self._finish(response, item, previous, 0)

    async def _stream_audio(self, response: _Response) -> None:
        item: Event = {"type": "message", "role": "assistant", "content": []}
        previous = await self._open_item(response, item)
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": 0, "content_index": 0}
        await self._send("response.content_part.added", **ids, part={"type": "audio", "transcript": ""})

        delta_ms, speed = self.options.delta_ms, self.options.speed
        chunk = delta_ms * BYTES_PER_MS
        started = asyncio.get_running_loop().time()
        sent = 0  # deltas sent
        transcript = ""
        async with contextlib.aclosing(self.agent.speak(response.text)) as pieces:
            while (piece := await response.next_piece(pieces)) is not None:
                text, audio = piece
                count = max(1, math.ceil(len(audio) / chunk))
                chars = 0
                for index in range(count):
                    if speed > 0:
                        await response.pause_until(started + sent * delta_ms / 1000 / speed)
                    else:
                        await asyncio.sleep(0)  # let the receive loop run: caller audio may interrupt
                    if response.cancel_reason:
                        break
                    part = audio[index * chunk : (index + 1) * chunk]
                    # Count the audio before sending it, so a truncate sent on receipt always sees it.
                    self.audio_sent[item["id"]] = self.audio_sent.get(item["id"], 0) + len(part)
                    await self._send("response.output_audio.delta", **ids, delta=base64.b64encode(part).decode())
                    sent += 1
                    upto = round(len(text) * (index + 1) / count)
                    if upto > chars:
                        await self._send("response.output_audio_transcript.delta", **ids, delta=text[chars:upto])
                        transcript += text[chars:upto]
                        chars = upto
                if response.cancel_reason:
                    break

        item["status"] = "incomplete" if response.cancel_reason else "completed"
        item["content"] = [{"type": "output_audio" if self.ga else "audio", "transcript": transcript}]
        await self._send("response.output_audio.done", **ids)
        await self._send("response.output_audio_transcript.done", **ids, transcript=transcript)
        await self._send("response.content_part.done", **ids, part={"type": "audio", "transcript": transcript})
        await self._finish(response, item, previous, self.audio_sent.get(item["id"], 0) // BYTES_PER_MS)
