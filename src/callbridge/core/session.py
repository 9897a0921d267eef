"""The call session: the whole bridge protocol as one sans-I/O state machine.

``CallSession.handle(event, now)`` takes one typed event from Twilio, the Realtime API or the driver, and returns
the commands to perform, in order. It never touches a socket, a clock or a task: ``now`` is the driver's
monotonic time in seconds. One session serves one call.

Phases::

    awaiting_start --start ok--> connecting --session.updated--> live --stop/close--> ended
          \\--start refused--------------------------------------------------------->/

Playback accounting. Every agent audio chunk sent to Twilio is followed by a mark named ``item_id:end_byte``.
Twilio plays chunks in order and echoes each mark when its audio has played, so the head of the pending-mark
queue is the chunk playing now; it started when the previous mark was echoed (or when it was sent, if the queue
was empty). ``clear`` makes Twilio echo every pending mark at once: those echoes mean *flushed*, not played, so
the session forgets the pending marks when it sends ``clear`` and ignores their echoes.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from callbridge.core import events as ev
from callbridge.core.commands import (
    Command,
    EndCall,
    Log,
    Measure,
    OpenRealtime,
    RecordEvent,
    RecordTranscript,
    ResolveContext,
    RunTool,
    SendRealtime,
    SendTwilio,
    TransferCall,
)
from callbridge.core.context import (
    AgentConfig,
    CallContext,
    ParameterError,
    ParameterVerifier,
    merge_context,
)
from callbridge.core.transcript import TranscriptLine, cut_to_heard

BYTES_PER_MS = 8  # G.711 μ-law, 8 kHz, one byte per sample
BYTES_PER_SECOND = 8000
MARK_EVERY_BYTES = 100 * BYTES_PER_MS
"""Agent audio goes to Twilio as the model sends it, but a ``mark`` follows only every 100 ms of it (and at the end
of a response): what the caller heard is the last echoed mark plus the time the next chunk has been playing, so the
truncation point stays as precise as one mark per 20 ms delta made it, while the model's smallest deltas cost
Twilio one message each instead of two (and the caller's side one echo in five)."""
GOODBYE_LIMIT_S = 15.0
"""After ``end_call`` or ``transfer_call``, the call ends or moves on by then even if the goodbye is never said
or its playback never confirmed: a silent model must not hold a caller on the line."""

Phase = Literal["awaiting_start", "connecting", "live", "ended"]


def b64_audio_bytes(b64: str) -> int:
    """Length in bytes of base64-encoded audio, without decoding it."""
    padding = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return len(b64) * 3 // 4 - padding


@dataclass(frozen=True, slots=True)
class SessionConfig:
    agent: AgentConfig
    """The default agent; ``agents`` holds the others, chosen by the ``agent`` of the signed parameters."""
    verify_parameters: ParameterVerifier
    pre_ready_buffer_ms: int = 5000
    hang_up_when_model_ends: bool = False
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    resolve_context: bool = False
    """Ask the host application for context (in parallel with opening the Realtime connection)."""
    reconnect_delays_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    """Backoff of the attempts to (re)connect when the model's connection fails or is lost; then the fallback."""
    reconnect_deadline_s: float = 10.0
    """No new attempt starts this long after the model was lost: the caller gets the fallback instead."""
    rollover_after_s: float | None = 55 * 60
    """Replace the model's session by a fresh one (with the conversation) at the first quiet moment after this
    long, before the provider's session limit (60 minutes for OpenAI) cuts it mid-sentence."""


@dataclass(slots=True)
class _PendingMark:
    """Agent audio at Twilio, up to a mark: sent (``name`` set) or still growing (the open chunk, name ``""``)."""

    name: str
    item_id: str
    start_byte: int
    end_byte: int


@dataclass(slots=True)
class _AgentItem:
    """An assistant audio item as the bridge sees it."""

    item_id: str
    response_id: str
    received_bytes: int = 0
    played_bytes: int = 0
    started_at: float | None = None  # when its first audio began to play at the caller
    interrupted: bool = False
    heard_bytes: int | None = None  # fixed at interruption
    transcript: str | None = None
    response_done: bool = False
    recorded: bool = False


@dataclass(slots=True)
class _CallerTurn:
    start_ms: int = 0
    end_ms: int | None = None


@dataclass(slots=True)
class SessionStats:
    frames_in: int = 0
    frames_buffered_dropped: int = 0
    frames_before_start: int = 0
    deltas_out: int = 0
    deltas_dropped: int = 0
    barge_ins: int = 0
    truncations: int = 0
    cancels: int = 0
    tool_calls: int = 0
    realtime_errors: int = 0
    protocol_errors: int = 0


@dataclass(slots=True)
class _Pending:
    """Pre-ready caller audio, bounded by duration; the oldest frames go first."""

    frames: deque[ev.TwilioMedia] = field(default_factory=deque)
    bytes: int = 0


class CallSession:
    """The bridge protocol for one call. See the module docstring."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.phase: Phase = "awaiting_start"
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.context: CallContext | None = None
        self.agent: AgentConfig = config.agent
        self.end_reason: str | None = None
        self.stats = SessionStats()

        self._t0 = 0.0
        self._event_ids = itertools.count(1)
        self._buffer = _Pending()
        self._audio_offset_ms: int | None = None  # stream time of the first frame the model received
        self._configured = False
        self._attempt = 0  # failed (re)connection attempts since the model was last ready
        self._outage_since: float | None = None  # when the model was lost (None while it is there)
        self._realtime_since = 0.0  # when the current model session was connected
        self._history: list[tuple[str, str]] = []  # (speaker, text) of every line so far, replayed on reconnect
        self._realtime_connected = False
        self._context_ready = not config.resolve_context
        self._closing: tuple[str, str | None] | None = None  # (end reason, transfer number) once a tool asked
        self._closing_response: str | None = None  # the goodbye response
        self._closing_stage: Literal["", "awaiting_goodbye", "goodbye"] = ""
        self._closing_since = 0.0

        self._active_response: str | None = None
        self._interrupted_responses: set[str] = set()
        self._items: dict[str, _AgentItem] = {}
        self._current_item: _AgentItem | None = None
        self._dropped_items: set[str] = set()

        self._pending_marks: deque[_PendingMark] = deque()
        self._open_chunk: _PendingMark | None = None  # the last pending chunk while its mark is not yet sent
        self._flushed_marks: set[str] = set()
        self._head_started_at = 0.0

        self._caller_turns: dict[str, _CallerTurn] = {}

        self._running_tools: dict[str, tuple[str, str]] = {}  # call id → (name, arguments)
        self._turn_ended_at: float | None = None  # when the caller last stopped speaking, until the agent answers
        self._needs_response = False

    # ------------------------------------------------------------------------------------------------ API

    def handle(self, event: ev.Event, now: float) -> list[Command]:
        """Advance the session by one event; return what to do."""
        if self.phase == "ended":
            return []
        # The audio path first: 100 of these a second, before the match below tries 30 patterns.
        if type(event) is ev.TwilioMedia:
            return self._on_media(event, now)
        if type(event) is ev.RealtimeAudioDelta:
            return self._on_audio_delta(event, now)
        match event:
            case ev.TwilioConnected():
                return []
            case ev.TwilioStart():
                return self._on_start(event, now)
            case ev.TwilioMark():
                return self._on_mark(event, now)
            case ev.TwilioDtmf():
                return self._on_dtmf(event)
            case ev.TwilioStop():
                return self._end("caller_hung_up", now)
            case ev.TwilioDisconnected():
                return self._end("stream_closed", now)
            case ev.TwilioInvalidMessage():
                self.stats.protocol_errors += 1
                return [Log("twilio.invalid_message", "warning", {"reason": event.reason})]
            case ev.RealtimeConnected():
                self._realtime_connected = True
                self._realtime_since = now
                return self._maybe_configure()
            case ev.ContextResolved():
                return self._on_context_resolved(event)
            case ev.RealtimeConnectFailed():
                log = Log("realtime.connect_failed", "warning", {"reason": event.reason, "attempt": self._attempt})
                return [log, *self._retry("realtime_unavailable", now)]
            case ev.RealtimeSessionUpdated():
                return self._on_session_updated()
            case ev.RealtimeSpeechStarted():
                return self._on_speech_started(event, now)
            case ev.RealtimeSpeechStopped():
                self._caller_turns.setdefault(event.item_id, _CallerTurn()).end_ms = event.audio_end_ms
                self._turn_ended_at = now
                return []
            case ev.RealtimeResponseCreated():
                self._active_response = event.response_id
                if self._closing_stage == "awaiting_goodbye" and self._closing_response is None:
                    self._closing_response = event.response_id
                return []
            case ev.RealtimeResponseDone():
                return self._on_response_done(event, now)
            case ev.RealtimeAudioTranscriptDone():
                return self._on_agent_transcript(event, now)
            case ev.RealtimeInputTranscriptionCompleted():
                return self._caller_line(event.item_id, event.transcript, failed=False)
            case ev.RealtimeInputTranscriptionFailed():
                return [
                    Log(
                        "transcription.failed",
                        "warning",
                        {"item_id": event.item_id, "message": event.message},
                    ),
                    *self._caller_line(event.item_id, "", failed=True),
                ]
            case ev.RealtimeFunctionCallDone():
                return self._on_function_call(event, now)
            case ev.ToolFinished():
                return self._on_tool_finished(event)
            case ev.RealtimeError():
                return self._on_realtime_error(event)
            case ev.RealtimeClosed():
                log = Log("realtime.closed", "warning", {"code": event.code, "reason": event.reason})
                if self.phase != "live":
                    return [log, *self._retry("realtime_closed", now)]
                return [log, *self._reconnect(now)]
            case ev.HangupRequested():
                return self._end(event.reason, now, hang_up=True)
            case ev.EndRequested():
                return self._end(event.reason, now, fallback=True)
            case ev.CallRefused():
                self.context = None  # not this call's to claim: nothing is recorded against it
                return self._refuse(event.reason, now)
            case ev.RealtimeOther(known=False):
                self.stats.protocol_errors += 1
                return [Log("realtime.unknown_event", "warning", {"type": event.type})]
            case ev.RealtimeSessionCreated() | ev.RealtimeItemTruncated() | ev.RealtimeOther():
                return []
        return []  # pragma: no cover - exhaustive match

    def played_ms(self, item_id: str, now: float) -> int:
        """How much of an agent item the caller has heard, in ms (mark-confirmed, interpolated within a chunk)."""
        return self._played_bytes(item_id, now) // BYTES_PER_MS

    # ------------------------------------------------------------------------------------------------ Twilio

    def _on_start(self, event: ev.TwilioStart, now: float) -> list[Command]:
        if self.phase != "awaiting_start":
            self.stats.protocol_errors += 1
            # Named apart from the call's own ids, which every line of the call carries: a forged start must not
            # relabel the log line.
            fields = {"start_stream_sid": event.stream_sid, "start_call_sid": event.call_sid}
            return [Log("twilio.duplicate_start", "warning", fields)]
        self.stream_sid = event.stream_sid
        self.call_sid = event.call_sid
        self._t0 = now
        if event.encoding != "audio/x-mulaw" or event.sample_rate != 8000:
            return self._refuse(f"unsupported media format {event.encoding}/{event.sample_rate}", now)
        try:
            self.context = self.config.verify_parameters(event.custom_parameters, event.call_sid)
        except ParameterError as exc:
            return self._refuse(str(exc), now)
        self.phase = "connecting"
        self.agent = self.config.agents.get(self.context.agent or "", self.config.agent)
        commands: list[Command] = [
            Log("call.admitted", "info", {"caller": self.context.caller, "agent": self.agent.name}),
            OpenRealtime(),
        ]
        if self.config.resolve_context:
            commands.append(ResolveContext(self.context))
        return commands

    def _refuse(self, why: str, now: float) -> list[Command]:
        return [
            Log("security.stream_refused", "warning", {"reason": why}),
            *self._end("refused", now, twilio_close_code=1008),
        ]

    def _on_media(self, event: ev.TwilioMedia, now: float) -> list[Command]:
        if self.phase == "awaiting_start":
            self.stats.frames_before_start += 1
            self.stats.protocol_errors += 1
            if self.stats.frames_before_start == 1:
                return [Log("twilio.media_before_start", "warning")]
            return []
        self.stats.frames_in += 1
        if self.phase == "connecting":
            return self._buffer_frame(event)
        if self._audio_offset_ms is None:
            self._audio_offset_ms = event.timestamp_ms
        append = SendRealtime({"type": "input_audio_buffer.append", "audio": event.payload})
        if self._closing is not None and now - self._closing_since >= GOODBYE_LIMIT_S:
            return [append, *self._goodbye_overdue(now)]
        if self._rollover_due(now):
            return [append, *self._rollover(now)]
        return [append]

    def _buffer_frame(self, event: ev.TwilioMedia) -> list[Command]:
        buffer = self._buffer
        buffer.frames.append(event)
        buffer.bytes += b64_audio_bytes(event.payload)
        limit = self.config.pre_ready_buffer_ms * BYTES_PER_MS
        dropped = 0
        while buffer.bytes > limit and len(buffer.frames) > 1:
            oldest = buffer.frames.popleft()
            buffer.bytes -= b64_audio_bytes(oldest.payload)
            dropped += 1
        if not dropped:
            return []
        self.stats.frames_buffered_dropped += dropped
        return [Log("audio.buffer_overflow", "warning", {"dropped_total": self.stats.frames_buffered_dropped})]

    def _on_mark(self, event: ev.TwilioMark, now: float) -> list[Command]:
        if event.name in self._flushed_marks:
            self._flushed_marks.discard(event.name)
            return []
        if not event.name or not any(mark.name == event.name for mark in self._pending_marks):
            self.stats.protocol_errors += 1
            return [Log("twilio.unknown_mark", "warning", {"mark": event.name})]
        # Marks play in order: an echo confirms it and every mark before it.
        while self._pending_marks:
            mark = self._pending_marks.popleft()
            item = self._items.get(mark.item_id)
            if item is not None:
                item.played_bytes = max(item.played_bytes, mark.end_byte)
            if mark.name == event.name:
                break
        self._head_started_at = now
        if self._pending_marks:
            head = self._items.get(self._pending_marks[0].item_id)
            if head is not None and head.started_at is None:
                head.started_at = now
        return [*self._record_settled_agent_lines(now), *self._close_after_goodbye(now)]

    def _on_dtmf(self, event: ev.TwilioDtmf) -> list[Command]:
        """A key press reaches the model as a conversation item, and the application as an event."""
        if self.phase != "live":
            return [Log("twilio.dtmf_ignored", "info", {"digit": event.digit})]
        self._needs_response = True  # a caller who presses a key waits for an answer without speaking
        note = _message("user", f"[The caller pressed the key {event.digit} on their keypad.]")
        return [
            Log("twilio.dtmf", "info", {"digit": event.digit}),
            RecordEvent("dtmf", {"digit": event.digit}),
            SendRealtime({"type": "conversation.item.create", "event_id": self._event_id(), "item": note}),
            *self._continue_after_tools(),
        ]

    # ------------------------------------------------------------------------------------------------ Realtime

    def _event_id(self) -> str:
        return f"cb_{next(self._event_ids)}"

    def _on_context_resolved(self, event: ev.ContextResolved) -> list[Command]:
        if self._context_ready:
            return []
        self._context_ready = True
        self.context = merge_context(self.context or CallContext(), event.context)
        return self._maybe_configure()

    def _maybe_configure(self) -> list[Command]:
        """Configure the model once it is connected and the call's context is known (the two run in parallel)."""
        if self.phase != "connecting" or self._configured or not (self._realtime_connected and self._context_ready):
            return []
        self._configured = True
        agent, context = self.agent, self.context or CallContext()
        commands: list[Command] = [SendRealtime(self._session_update(agent, context))]
        items = self._seed_items(context)
        items += [_message("user" if who == "caller" else "assistant", text) for who, text in self._history]
        for item in items:
            commands.append(
                SendRealtime({"type": "conversation.item.create", "event_id": self._event_id(), "item": item})
            )
        if agent.speaks_first and not self._history:  # after a reconnect the conversation goes on, no new greeting
            commands.append(SendRealtime(self._greeting(agent, context)))
        return commands

    def _session_update(self, agent: AgentConfig, context: CallContext) -> dict[str, Any]:
        audio_input: dict[str, Any] = {
            "format": {"type": "audio/pcmu"},
            "turn_detection": agent.turn_detection,
        }
        if agent.transcription_model:
            audio_input["transcription"] = {"model": agent.transcription_model}
        session: dict[str, Any] = {
            "type": "realtime",
            "model": agent.model,
            "output_modalities": ["audio"],
            "instructions": context.instructions or agent.instructions,
            "audio": {
                "input": audio_input,
                "output": {"format": {"type": "audio/pcmu"}, "voice": agent.voice},
            },
        }
        if agent.all_tools:
            session["tools"] = agent.all_tools
            session["tool_choice"] = agent.tool_choice
        return {"type": "session.update", "event_id": self._event_id(), "session": session}

    @staticmethod
    def _seed_items(context: CallContext) -> list[dict[str, Any]]:
        """Context as conversation items: facts about the call first, then earlier conversation."""
        facts = ["You placed this call." if context.direction == "outbound" else "The person called you."]
        if context.name:
            facts.append(f"You are speaking with {context.name}.")
        if context.person_number:
            facts.append(f"Their phone number is {context.person_number}.")
        items = [_message("system", " ".join(facts))]
        items.extend(_message(item.role, item.text) for item in context.items)
        return items

    def _greeting(self, agent: AgentConfig, context: CallContext) -> dict[str, Any]:
        event: dict[str, Any] = {"type": "response.create", "event_id": self._event_id()}
        greeting = context.greeting or agent.greeting
        if greeting:
            instructions = context.instructions or agent.instructions
            event["response"] = {
                "instructions": f"{instructions}\n\nStart the call now by saying exactly: {greeting}",
            }
        return event

    def _on_session_updated(self) -> list[Command]:
        if self.phase != "connecting":
            return []
        self.phase = "live"
        self._attempt = 0
        self._outage_since = None
        commands: list[Command] = []
        frames = self._buffer.frames
        if frames:
            self._audio_offset_ms = frames[0].timestamp_ms
        while frames:
            commands.append(SendRealtime({"type": "input_audio_buffer.append", "audio": frames.popleft().payload}))
        self._buffer.bytes = 0
        commands.append(Log("realtime.ready", "info", {"buffered_frames": len(commands)}))
        return commands

    def _on_audio_delta(self, event: ev.RealtimeAudioDelta, now: float) -> list[Command]:
        if (
            event.item_id in self._dropped_items
            or event.response_id in self._interrupted_responses
            or self.stream_sid is None
        ):
            self.stats.deltas_dropped += 1
            return []
        commands: list[Command] = []
        item = self._items.get(event.item_id)
        if item is None:
            item = self._items[event.item_id] = _AgentItem(event.item_id, event.response_id)
            self._current_item = item
            if self._turn_ended_at is not None:  # the agent's first audio after the caller's turn
                commands.append(Measure("turn_latency_s", now - self._turn_ended_at))
                self._turn_ended_at = None
        start = item.received_bytes
        item.received_bytes += b64_audio_bytes(event.delta)
        if not self._pending_marks:  # Twilio's queue is empty: this chunk starts playing now
            self._head_started_at = now
            if item.started_at is None:
                item.started_at = now
        chunk = self._open_chunk
        if chunk is not None and chunk.item_id != item.item_id:
            commands.extend(self._send_mark())
            chunk = None
        if chunk is None:
            chunk = self._open_chunk = _PendingMark("", item.item_id, start, item.received_bytes)
            self._pending_marks.append(chunk)
        chunk.end_byte = item.received_bytes
        self.stats.deltas_out += 1
        commands.append(SendTwilio({"event": "media", "streamSid": self.stream_sid, "media": {"payload": event.delta}}))
        if chunk.end_byte - chunk.start_byte >= MARK_EVERY_BYTES:
            commands.extend(self._send_mark())
        return commands

    def _send_mark(self) -> list[Command]:
        """Close the open chunk: the mark Twilio echoes once the caller has heard the audio up to it."""
        chunk, self._open_chunk = self._open_chunk, None
        if chunk is None:
            return []
        chunk.name = f"{chunk.item_id}:{chunk.end_byte}"
        return [SendTwilio({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": chunk.name}})]

    def _played_bytes(self, item_id: str, now: float) -> int:
        item = self._items.get(item_id)
        if item is None:
            return 0
        if self._pending_marks and self._pending_marks[0].item_id == item_id:
            head = self._pending_marks[0]
            elapsed = max(0, round((now - self._head_started_at) * BYTES_PER_SECOND))
            return max(item.played_bytes, head.start_byte + min(elapsed, head.end_byte - head.start_byte))
        return item.played_bytes

    def _on_speech_started(self, event: ev.RealtimeSpeechStarted, now: float) -> list[Command]:
        self._caller_turns[event.item_id] = _CallerTurn(start_ms=event.audio_start_ms)
        active = self._active_response
        fresh_response = active is not None and active not in self._interrupted_responses
        if not self._pending_marks and not fresh_response:
            return []  # nothing is playing or being generated: an ordinary turn
        self.stats.barge_ins += 1
        commands: list[Command] = []
        item = self._current_item
        heard = self._played_bytes(item.item_id, now) if item is not None else 0
        if self._pending_marks:
            commands.append(SendTwilio({"event": "clear", "streamSid": self.stream_sid}))
            self._flushed_marks.update(mark.name for mark in self._pending_marks if mark.name)
            self._pending_marks.clear()
            self._open_chunk = None  # never marked: Twilio has nothing to echo for it
        if active is not None and fresh_response:
            self._interrupted_responses.add(active)  # its late deltas must not reach the caller
            if not self.agent.server_cancels_on_speech:
                self.stats.cancels += 1
                commands.append(SendRealtime({"type": "response.cancel", "event_id": self._event_id()}))
        if item is not None and not item.interrupted and (heard < item.received_bytes or item.response_id == active):
            commands.extend(self._truncate(item, heard, now))
        heard_ms = heard // BYTES_PER_MS
        data = {"heard_ms": heard_ms, "item_id": item.item_id if item else None}
        commands += [Log("barge_in", "info", {"heard_ms": heard_ms}), RecordEvent("barge_in", data)]
        return commands

    def _truncate(self, item: _AgentItem, heard: int, now: float) -> list[Command]:
        """Cut an interrupted item to what the caller heard, on the server and in the transcript.

        Skipped when nothing was heard, not even a millisecond (there is nothing to keep, and an item cannot be
        truncated to no audio) and when everything was heard of a finished item. While the response still streams, the
        server holds at least what we received, so ``min(heard, received)`` is always a valid end.
        """
        item.interrupted = True
        item.heard_bytes = min(heard, item.received_bytes)
        self._dropped_items.add(item.item_id)
        commands: list[Command] = []
        all_heard = item.heard_bytes >= item.received_bytes
        heard_ms = item.heard_bytes // BYTES_PER_MS
        if heard_ms > 0 and not (all_heard and item.response_done):
            self.stats.truncations += 1
            commands.append(
                SendRealtime(
                    {
                        "type": "conversation.item.truncate",
                        "event_id": self._event_id(),
                        "item_id": item.item_id,
                        "content_index": 0,
                        "audio_end_ms": heard_ms,
                    }
                )
            )
        commands.extend(self._record_agent_line(item, now))
        return commands

    def _on_response_done(self, event: ev.RealtimeResponseDone, now: float) -> list[Command]:
        if self._active_response == event.response_id:
            self._active_response = None
        for item in self._items.values():
            if item.response_id == event.response_id:
                item.response_done = True
        if self._closing_response == event.response_id:
            self._closing_stage = "goodbye"
        return [
            *self._send_mark(),  # no more audio comes: the last chunk gets its mark now
            *self._record_settled_agent_lines(now),
            *self._continue_after_tools(),
            *self._close_after_goodbye(now),
        ]

    def _on_agent_transcript(self, event: ev.RealtimeAudioTranscriptDone, now: float) -> list[Command]:
        item = self._items.get(event.item_id)
        if item is None:  # a response cancelled before any audio: nothing was said
            return []
        item.transcript = event.transcript
        if item.interrupted:
            return self._record_agent_line(item, now)
        return self._record_settled_agent_lines(now)

    def _record_settled_agent_lines(self, now: float) -> list[Command]:
        """Record agent lines whose audio has fully played (a line is final only once the caller heard it)."""
        commands: list[Command] = []
        for item in self._items.values():
            if (
                not item.recorded
                and item.transcript is not None
                and item.response_done
                and item.played_bytes >= item.received_bytes
            ):
                commands.extend(self._record_agent_line(item, now))
        return commands

    def _record_agent_line(self, item: _AgentItem, now: float) -> list[Command]:
        if item.recorded or item.transcript is None:
            return []
        item.recorded = True
        heard = item.heard_bytes if item.interrupted and item.heard_bytes is not None else item.received_bytes
        if heard <= 0:
            return []
        text = cut_to_heard(item.transcript, heard, item.received_bytes) if item.interrupted else item.transcript
        text = text.strip()
        start_ms = int(((item.started_at if item.started_at is not None else now) - self._t0) * 1000)
        line = TranscriptLine(
            call_sid=self.call_sid or "",
            speaker="agent",
            text=text,
            start_ms=start_ms,
            end_ms=start_ms + heard // BYTES_PER_MS,
            item_id=item.item_id,
            interrupted=item.interrupted,
        )
        self._history.append(("agent", line.text))
        return [RecordTranscript(line)]

    def _caller_line(self, item_id: str, text: str, failed: bool) -> list[Command]:
        turn = self._caller_turns.pop(item_id, _CallerTurn())
        offset = self._audio_offset_ms or 0
        end_ms = turn.end_ms if turn.end_ms is not None else turn.start_ms
        line = TranscriptLine(
            call_sid=self.call_sid or "",
            speaker="caller",
            text=text.strip(),
            start_ms=offset + turn.start_ms,
            end_ms=offset + end_ms,
            item_id=item_id,
            failed=failed,
        )
        if line.text:
            self._history.append(("caller", line.text))
        return [RecordTranscript(line)]

    # ------------------------------------------------------------------------------------------------ tools

    def _on_function_call(self, event: ev.RealtimeFunctionCallDone, now: float) -> list[Command]:
        if event.status != "completed":  # interrupted calls carry truncated arguments
            return [Log("tool.skipped", "info", {"name": event.name, "status": event.status})]
        self.stats.tool_calls += 1
        if event.name in self.agent.builtin_tools:
            return self._call_control(event, now)
        self._running_tools[event.call_id] = (event.name, event.arguments)
        return [
            Log("tool.call", "info", {"name": event.name, "call_id": event.call_id}),
            RunTool(event.call_id, event.name, event.arguments),
        ]

    def _call_control(self, event: ev.RealtimeFunctionCallDone, now: float) -> list[Command]:
        """``end_call`` and ``transfer_call``: the model says a last sentence, then the call ends or moves on."""
        self._closing_since = now
        if event.name == "transfer_call" and not self.agent.transfer_number:
            output = {"ok": False, "error": "No transfer number is configured; keep helping the caller yourself."}
        elif event.name == "transfer_call":
            self._closing = ("transferred", self.agent.transfer_number)
            output = {"ok": True, "instruction": "Tell the caller in one short sentence that you transfer them now."}
        else:
            self._closing = ("agent_ended_call", None)
            output = {"ok": True, "instruction": "Say a short goodbye now; the call ends right after it."}
        self._needs_response = True
        result = _json(output)
        item = {"type": "function_call_output", "call_id": event.call_id, "output": result}
        record = {"name": event.name, "arguments": event.arguments, "output": result, "ok": output["ok"]}
        return [
            Log("tool.call", "info", {"name": event.name, "call_id": event.call_id}),
            RecordEvent("tool_call", record),
            SendRealtime({"type": "conversation.item.create", "event_id": self._event_id(), "item": item}),
            *self._continue_after_tools(),
        ]

    def _on_tool_finished(self, event: ev.ToolFinished) -> list[Command]:
        if event.call_id not in self._running_tools:
            return [Log("tool.unknown_result", "warning", {"call_id": event.call_id})]
        name, arguments = self._running_tools.pop(event.call_id)
        self._needs_response = True
        output = {"type": "function_call_output", "call_id": event.call_id, "output": event.output}
        record = {"name": name, "arguments": arguments, "output": event.output, "ok": event.ok}
        return [
            RecordEvent("tool_call", record),
            SendRealtime({"type": "conversation.item.create", "event_id": self._event_id(), "item": output}),
            *self._continue_after_tools(),
        ]

    def _continue_after_tools(self) -> list[Command]:
        """One ``response.create`` once every tool of the turn has answered and no response is active."""
        if not self._needs_response or self._running_tools or self._active_response is not None:
            return []
        self._needs_response = False
        if self._closing is not None and not self._closing_stage:
            self._closing_stage = "awaiting_goodbye"
        return [SendRealtime({"type": "response.create", "event_id": self._event_id()})]

    def _goodbye_overdue(self, now: float) -> list[Command]:
        self._closing_stage = "goodbye"
        self._flushed_marks.update(mark.name for mark in self._pending_marks if mark.name)  # late echoes are expected
        self._pending_marks.clear()
        self._open_chunk = None
        return [Log("call.goodbye_overdue", "warning", {"waited_s": GOODBYE_LIMIT_S}), *self._close_after_goodbye(now)]

    def _close_after_goodbye(self, now: float) -> list[Command]:
        """End or transfer the call once the goodbye has been said and heard (or cut off by the caller)."""
        if self._closing is None or self._closing_stage != "goodbye" or self._pending_marks:
            return []
        reason, transfer_to = self._closing
        self._closing = None
        if transfer_to is not None:
            return [TransferCall(transfer_to), *self._end(reason, now)]
        return self._end(reason, now, hang_up=True)

    # ------------------------------------------------------------------------------------------------ errors, end

    def _on_realtime_error(self, event: ev.RealtimeError) -> list[Command]:
        self.stats.realtime_errors += 1
        fields = {"code": event.code, "message": event.message, "event_id": event.event_id}
        if event.code == "conversation_already_has_active_response":
            self._needs_response = True  # the server started a response of its own: ours follows it
            return [Log("realtime.error", "warning", fields)]
        if event.code == "response_cancel_not_active":
            return [Log("realtime.error", "warning", fields)]
        return [Log("realtime.error", "error", fields), RecordEvent("error", fields)]

    def _retry(self, reason: str, now: float) -> list[Command]:
        """Try the model's connection again after the next backoff delay; past the last one or the deadline, the
        caller gets the fallback (redirected to an apology or a human) rather than silence."""
        delays = self.config.reconnect_delays_s
        if self._outage_since is None:
            self._outage_since = now
        out_for = now - self._outage_since
        if self._attempt >= len(delays) or out_for + delays[self._attempt] >= self.config.reconnect_deadline_s:
            return self._end(reason, now, hang_up=self.config.hang_up_when_model_ends, fallback=True)
        delay = delays[self._attempt]
        self._attempt += 1
        return [Log("realtime.retry", "info", {"attempt": self._attempt, "delay_s": delay}), OpenRealtime(delay)]

    def _rollover_due(self, now: float) -> bool:
        """Time for a fresh model session, and a quiet moment: nobody speaking, nothing playing or running."""
        limit = self.config.rollover_after_s
        return (
            limit is not None
            and now - self._realtime_since >= limit
            and self._active_response is None
            and not self._pending_marks
            and not self._running_tools
            and not self._needs_response
            and self._closing is None
            and all(turn.end_ms is not None for turn in self._caller_turns.values())
        )

    def _rollover(self, now: float) -> list[Command]:
        """Move the call to a new model session before the provider's limit ends the old one."""
        age_s = round(now - self._realtime_since)
        self._forget_model_session()
        return [
            Log("realtime.rollover", "info", {"session_age_s": age_s}),
            RecordEvent("realtime_rollover", {"session_age_s": age_s}),
            OpenRealtime(),
        ]

    def _reconnect(self, now: float) -> list[Command]:
        """The model's connection was lost mid-call: a new session gets the configuration and the conversation.

        Agent audio already at Twilio plays on; caller audio is buffered until the new session is ready; the
        old session's responses and tool calls are gone with it.
        """
        self._forget_model_session()
        return [*self._send_mark(), *self._record_settled_agent_lines(now), *self._retry("realtime_closed", now)]

    def _forget_model_session(self) -> None:
        """Back to connecting: the next model session starts from the configuration and the transcript."""
        self.phase = "connecting"
        self._configured = False
        self._realtime_connected = False
        self._audio_offset_ms = None
        self._caller_turns.clear()
        if self._active_response is not None:
            self._interrupted_responses.add(self._active_response)
        self._active_response = None
        self._running_tools.clear()
        self._needs_response = False
        self._current_item = None  # the new session knows none of the old items: never truncate them there
        for item in self._items.values():
            item.response_done = True

    def _end(
        self, reason: str, now: float, *, hang_up: bool = False, twilio_close_code: int = 1000, fallback: bool = False
    ) -> list[Command]:
        if self.phase == "ended":
            return []
        commands: list[Command] = []
        for item in self._items.values():
            if not item.recorded and item.transcript is not None:
                if item.played_bytes < item.received_bytes:
                    item.interrupted = True
                    item.heard_bytes = self._played_bytes(item.item_id, now)
                commands.extend(self._record_agent_line(item, now))
        self.phase = "ended"
        self.end_reason = reason
        commands.append(Log("call.ended", "info", {"reason": reason}))
        commands.append(EndCall(reason, hang_up=hang_up, twilio_close_code=twilio_close_code, fallback=fallback))
        return commands


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _message(role: str, text: str) -> dict[str, Any]:
    content_type = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": content_type, "text": text}]}
