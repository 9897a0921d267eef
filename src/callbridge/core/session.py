"""The call session: the whole bridge protocol as one sans-I/O state machine.

``CallSession.handle(event, now)`` takes one typed event from Twilio, the Realtime API or the driver, and returns
the commands to perform, in order. It never touches a socket, a clock or a task: ``now`` is the driver's
monotonic time in seconds. Time itself is an event: the driver sets a timer for :meth:`CallSession.next_deadline`
and hands the session a :class:`~callbridge.core.events.Tick` when it fires, so nothing waits for the caller's next
audio frame to notice that time passed. One session serves one call.

Phases::

    awaiting_start --start ok--> connecting --session.updated (μ-law both ways)--> live --stop/close--> ended
          \\--start refused--------------------------------------------------------------------------->/

A session is live only once the model confirmed it: ``session.update`` goes out alone, and the conversation's
seed items and the greeting follow its ``session.updated``. An error answering the update (matched by the
``event_id`` every client event carries) ends the call with the fallback: the model would otherwise go on with
its defaults, PCM16 at 24 kHz, which a phone plays as static. No agent audio reaches Twilio before then.

Playback accounting. Every agent audio chunk sent to Twilio is followed by a mark named ``item_id:end_byte``.
Twilio plays chunks in order and echoes each mark when its audio has played, so the head of the pending-mark
queue is the chunk playing now; it started when the previous mark was echoed (or when it was sent, if the queue
was empty). ``clear`` makes Twilio echo every pending mark at once: those echoes mean *flushed*, not played, so
the session forgets the pending marks when it sends ``clear`` and ignores their echoes.

Bounded state. A call may last an hour: what is settled (an agent item played or cut, recorded, its marks
accounted; a response done) is dropped, so nothing the session scans per event grows with the call's length.
"""

from __future__ import annotations

import binascii
import dataclasses
import itertools
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from callbridge.core import events as ev
from callbridge.core.commands import (
    AppendAudio,
    CancelResponse,
    ClearAudio,
    Command,
    ControlRefused,
    ConversationItem,
    CreateItem,
    CreateResponse,
    DeleteItem,
    EndCall,
    FunctionOutput,
    Log,
    Measure,
    Message,
    OpenRealtime,
    PlayAudio,
    RealtimeCommand,
    RecordEvent,
    RecordTranscript,
    ResolveContext,
    RunTool,
    SendMark,
    ShowPartial,
    TransferCall,
    TruncateItem,
    UpdateSession,
)
from callbridge.core.context import (
    AgentConfig,
    CallContext,
    ParameterError,
    ParameterVerifier,
    merge_context,
)
from callbridge.core.transcript import TranscriptLine, cut_to_heard
from callbridge.core.usage import TokenUsage

_Control = TypeVar("_Control", bound=RealtimeCommand)

BYTES_PER_MS = 8  # G.711 μ-law, 8 kHz, one byte per sample
BYTES_PER_SECOND = 8000
MARK_EVERY_BYTES = 100 * BYTES_PER_MS
"""Agent audio goes to Twilio as the model sends it, but a ``mark`` follows only every 100 ms of it (and at the end
of a response): what the caller heard is the last echoed mark plus the time the next chunk has been playing, so the
truncation point stays as precise as one mark per 20 ms delta made it, while the model's smallest deltas cost
Twilio one message each instead of two (and the caller's side one echo in five)."""
COALESCE_BYTES = 40 * BYTES_PER_MS
COALESCE_HOLD_S = 0.020
"""Agent deltas shorter than 40 ms are joined into chunks of up to 40 ms before they go to Twilio (steady chunks
play without stutter, and a model running ahead of playback costs Twilio half the messages), but no audio is held
longer than one 20 ms frame: the timer flushes what is held. And none is held while Twilio's queue would run dry
meanwhile: a delta that arrives when the audio before it has (nearly) finished playing goes at once, so joining
never adds latency to what the caller hears."""
GOODBYE_LIMIT_S = 15.0
"""After ``end_call``, ``transfer_call`` or an idle caller's last re-prompt, the call ends or moves on by then even
if the goodbye is never said or its playback never confirmed: a silent model must not hold a caller on the line."""
ROLLOVER_HARD_STOP_S = 240.0
"""A rollover waits for a quiet moment; past this much longer it happens between two agent turns anyway."""
HISTORY_CHARS = 24_000
"""The conversation replayed into a new model session keeps its most recent lines up to this many characters."""
TIMER_SLACK_S = 0.001
"""A timer may fire a hair before its deadline (the event loop's clock resolution)."""
UNTRANSCRIBED_TURN = "[The caller spoke here; what they said was not transcribed.]"
PARTIAL_EVERY_S = 0.1
"""Interim text goes out at most this often per call (ten a second): for people watching, not for every delta."""
PARTIAL_CHARS = 4000
"""Interim text kept of a line being spoken, at most (a longer line shows its beginning until it completes)."""
TOOL_FILLER = "One moment while I check."
VOICEMAIL_LEFT = "voicemail_left"
MACHINE_DETECTED = "machine_detected"
VOICEMAIL_CHARS_PER_S = 8.0
"""A voicemail message's time to play, at its slowest, beyond :data:`GOODBYE_LIMIT_S` (speech runs 12-16
characters a second)."""
HOST_SAY = "Say this to the caller now, word for word and nothing else, by saying exactly: "
"""The instructions of a response that says the host application's text (the same ``saying exactly:`` form as the
greeting and the filler, which models follow to the letter)."""
IDLE_GOODBYE = "It seems you have stepped away, so I will hang up now. Goodbye!"
FATAL_ERRORS = {
    "beta_api_shape_disabled": "realtime_beta_refused",
    "invalid_api_key": "realtime_auth_failed",
    "insufficient_quota": "realtime_quota_exceeded",
    "model_not_found": "realtime_model_not_found",
    "invalid_model": "realtime_model_not_found",
}
"""Errors a retry cannot fix, and the end reason of a call that meets one: it goes to the fallback at once."""

Phase = Literal["awaiting_start", "connecting", "live", "ended"]


def b64_audio_bytes(b64: str) -> int:
    """Length in bytes of base64-encoded audio, without decoding it."""
    padding = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return len(b64) * 3 // 4 - padding


@dataclass(frozen=True, slots=True)
class SessionConfig:
    agent: AgentConfig
    """The default agent; ``agents`` holds the others, chosen by the ``agent`` of the call's context."""
    verify_parameters: ParameterVerifier
    pre_ready_buffer_ms: int = 5000
    hang_up_when_model_ends: bool = False
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    load_context: bool = False
    """The stream's parameters carry only a reference: wait for the call's context (``ContextLoaded``)."""
    resolve_context: bool = False
    """Ask the host application for context (in parallel with opening the Realtime connection)."""
    reconnect_delays_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    """Backoff of the attempts to (re)connect when the model's connection fails or is lost; then the fallback."""
    reconnect_deadline_s: float = 10.0
    """No new attempt starts this long after the model was lost: the caller gets the fallback instead."""
    ready_timeout_s: float = 8.0
    """From the stream's start (or a model session's replacement) to a confirmed session; then the fallback."""
    rollover_after_s: float | None = 55 * 60
    """Replace the model's session by a fresh one (with the conversation) at the first quiet moment after this
    long, before the provider's session limit (60 minutes for OpenAI) cuts it mid-sentence."""
    amd_timeout_s: float = 6.0
    """A call with answering-machine detection and no verdict this long after the stream's start: a person."""
    amd_machine_wait_s: float = 30.0
    """After ``machine_start``, how long to wait for the end of the machine's greeting (Twilio's default
    ``MachineDetectionTimeout``) before leaving the message all the same."""


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
    forwarded_bytes: int = 0  # sent to Twilio (the rest is held for coalescing, or was never sent)
    played_bytes: int = 0
    started_at: float | None = None  # when its first audio began to play at the caller
    interrupted: bool = False
    heard_bytes: int | None = None  # fixed at interruption
    transcript: str | None = None
    response_done: bool = False
    recorded: bool = False  # its transcript line is written, or it was decided it has none


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
    deltas_unconfirmed: int = 0
    """Agent audio that arrived while the model's session was not confirmed: dropped, never played."""
    media_out: int = 0
    """Audio messages sent to Twilio (deltas shorter than 40 ms are joined)."""
    barge_ins: int = 0
    truncations: int = 0
    deletions: int = 0
    cancels: int = 0
    tool_calls: int = 0
    responses_failed: int = 0
    responses_incomplete: int = 0
    realtime_errors: int = 0
    protocol_errors: int = 0


@dataclass(slots=True)
class _Pending:
    """Pre-ready caller audio, bounded by duration; the oldest frames go first."""

    frames: deque[ev.TwilioMedia] = field(default_factory=deque)
    bytes: int = 0


_TWILIO_EVENTS = (
    ev.TwilioConnected,
    ev.TwilioStart,
    ev.TwilioMark,
    ev.TwilioDtmf,
    ev.TwilioStop,
    ev.TwilioDisconnected,
    ev.TwilioInvalidMessage,
)
_CONVERSATION_EVENTS = (
    ev.RealtimeTranscriptDelta,
    ev.RealtimeSpeechStarted,
    ev.RealtimeSpeechStopped,
    ev.RealtimeResponseCreated,
    ev.RealtimeResponseDone,
    ev.RealtimeAudioTranscriptDone,
    ev.RealtimeInputTranscriptionCompleted,
    ev.RealtimeInputTranscriptionFailed,
    ev.RealtimeTimeoutTriggered,
    ev.RealtimeFunctionCallDone,
)
_HOST_EVENTS = (ev.HostSay, ev.HostInstruct, ev.HostTransfer)
_DRIVER_EVENTS = (
    ev.Tick,
    ev.ContextLoaded,
    ev.ContextResolved,
    ev.ToolFinished,
    ev.HangupRequested,
    ev.EndRequested,
    ev.CallRefused,
    ev.AmdVerdict,
)


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
        self.usage = TokenUsage()

        self._t0 = 0.0
        self._deadline: float | None = None
        self.timers_version = 0
        """Changes whenever :meth:`next_deadline` may have: a driver re-reads the deadlines only then."""
        self._event_ids = itertools.count(1)
        self._control_events: dict[str, str] = {}  # event_id → type of the recent client events other than audio
        self._buffer = _Pending()
        self._audio_offset_ms: int | None = None  # stream time of the first frame the model received
        self._context_loaded = not config.load_context
        self._context_ready = not config.resolve_context
        self._configured = False
        self._session_update_id: str | None = None
        self._ready_by: float | None = None  # the model's session must be confirmed by then
        self._ready_reason = "realtime_not_ready"
        self._attempt = 0  # failed (re)connection attempts since the model was last ready
        self._outage_since: float | None = None  # when the model was lost (None while it is there)
        self._realtime_since = 0.0  # when the current model session was connected
        self._rollover_at: float | None = None
        self._history: deque[tuple[str, str]] = deque()  # (speaker, text), replayed into a new model session
        self._history_chars = 0
        self._realtime_connected = False
        self._closing: tuple[str, str | None] | None = None  # (end reason, transfer number) once decided
        self._closing_response: str | None = None  # the goodbye response
        # "queued": the host application's last sentence waits its turn (no other response becomes the goodbye)
        self._closing_stage: Literal["", "queued", "awaiting_goodbye", "goodbye"] = ""
        self._closing_since = 0.0
        self._closing_limit_s = GOODBYE_LIMIT_S
        # Answering-machine detection: "pending" until Twilio's verdict (no greeting, no response meanwhile),
        # "machine_start" while a machine's greeting plays; "" when there is none or it is decided.
        self._amd: Literal["", "pending", "machine_start"] = ""
        self._amd_deadline: float | None = None
        self._amd_early: ev.AmdVerdict | None = None  # a verdict that came before the model was ready
        self._next_instructions: str | None = None  # for the next response.create the session sends

        self._active_response: str | None = None
        self._awaiting_response: str | None = None  # a response.create's event id, until its response is created
        self._cut_next_response = False  # the host application cut in while a response was asked for: it is cancelled
        # The host application's responses waiting their turn: (instructions, whether it is the call's last sentence)
        self._host_responses: deque[tuple[str | None, bool]] = deque()
        # The last one sent, until a response is done (a refusal of it comes before: while another one is active)
        self._host_request: tuple[str, str | None, bool] | None = None
        self._interrupted_responses: set[str] = set()
        self._responses_with_audio: set[str] = set()
        self._greeting_request: str | None = None  # the greeting's instructions, until a response with audio completes
        self._retried_failure = False
        self._items: dict[str, _AgentItem] = {}  # agent items not yet settled
        self._current_item: _AgentItem | None = None
        self._dropped_items: dict[str, str] = {}  # item id → response id: late audio of these is dropped
        self._deleted_items: set[str] = set()  # deleted from the model's conversation (until its response is done)

        self._pending_marks: deque[_PendingMark] = deque()
        self._open_chunk: _PendingMark | None = None  # the last pending chunk while its mark is not yet sent
        self._flushed_marks: set[str] = set()
        self._head_started_at = 0.0
        self._held: list[str] = []  # agent deltas held for coalescing, all of ``_held_item``
        self._held_item: _AgentItem | None = None
        self._held_bytes = 0
        self._held_since = 0.0
        self._playing_until = 0.0  # when the agent audio sent to Twilio will have played, as far as is known

        self._caller_turns: dict[str, _CallerTurn] = {}
        self._partials: dict[str, str] = {}  # item → its interim text, until its line completes
        self._partial_at = float("-inf")  # when interim text last went out
        self._idle_prompts = 0  # re-prompts of a silent caller since they last spoke
        self._idle_goodbye = False  # the next response the server starts by itself is replaced by a goodbye

        self._running_tools: dict[str, tuple[str, str]] = {}  # call id → (name, arguments)
        self._tools_since: float | None = None  # when the oldest running tool started
        self._filler_said = False
        self._turn_ended_at: float | None = None  # when the caller last stopped speaking, until the agent answers
        self._needs_response = False

    # ------------------------------------------------------------------------------------------------ API

    def handle(self, event: ev.Event, now: float) -> list[Command]:
        """Advance the session by one event; return what to do."""
        if self.phase == "ended":
            if isinstance(event, _HOST_EVENTS):
                return [ControlRefused("ended", "the call has ended")]
            return []
        # The audio path first: 100 of these a second, before the match below tries 30 patterns.
        if type(event) is ev.TwilioMedia:
            return self._on_media(event, now)
        if type(event) is ev.RealtimeAudioDelta:
            return self._on_audio_delta(event, now)
        commands = self._on_control(event, now)
        if self.phase == "live" and self._rollover_at is not None and now >= self._rollover_at:
            commands += self._maybe_rollover(now)
        self._update_deadline(now)
        return commands

    def next_deadline(self) -> float | None:
        """When the session next needs a :class:`~callbridge.core.events.Tick` (driver's monotonic time), if ever."""
        flush_at = self.flush_deadline()
        deadline = self._deadline
        return flush_at if flush_at is not None and (deadline is None or flush_at < deadline) else deadline

    def flush_deadline(self) -> float | None:
        """When held agent audio must go to Twilio (``None``: nothing is held).

        Part of :meth:`next_deadline`, and apart from it for a driver that keeps the short, frequent timer of
        coalescing separate from the call's other, rare ones (one is set and cleared every 40 ms of agent audio).
        """
        return self._held_since + COALESCE_HOLD_S if self._held else None

    def control_deadline(self) -> float | None:
        """:meth:`next_deadline` but for :meth:`flush_deadline`: the ready deadline, the goodbye limit, the
        rollover, the tool filler."""
        return self._deadline

    def played_ms(self, item_id: str, now: float) -> int:
        """How much of an agent item the caller has heard, in ms (mark-confirmed, interpolated within a chunk)."""
        return self._played_bytes(item_id, now) // BYTES_PER_MS

    def _on_control(self, event: ev.Event, now: float) -> list[Command]:
        """Every event but the two of the audio path, by where it comes from."""
        if isinstance(event, _TWILIO_EVENTS):
            return self._on_twilio_event(event, now)
        if isinstance(event, _CONVERSATION_EVENTS):
            return self._on_conversation_event(event, now)
        if isinstance(event, _DRIVER_EVENTS):
            return self._on_driver_event(event, now)
        if isinstance(event, _HOST_EVENTS):
            return self._on_host_event(event, now)
        return self._on_model_event(event, now)

    def _on_twilio_event(self, event: ev.Event, now: float) -> list[Command]:
        match event:
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
        return []  # TwilioConnected

    def _on_conversation_event(self, event: ev.Event, now: float) -> list[Command]:
        match event:
            case ev.RealtimeSpeechStarted():
                return self._on_speech_started(event, now)
            case ev.RealtimeSpeechStopped():
                return self._on_speech_stopped(event, now)
            case ev.RealtimeResponseCreated():
                return self._on_response_created(event, now)
            case ev.RealtimeResponseDone():
                return self._on_response_done(event, now)
            case ev.RealtimeTranscriptDelta():
                return self._on_partial(event, now)
            case ev.RealtimeAudioTranscriptDone():
                self._partials.pop(event.item_id, None)
                return self._on_agent_transcript(event, now)
            case ev.RealtimeInputTranscriptionCompleted():
                self._partials.pop(event.item_id, None)
                return self._caller_line(event.item_id, event.transcript, failed=False)
            case ev.RealtimeInputTranscriptionFailed():
                return [
                    Log("transcription.failed", "warning", {"item_id": event.item_id, "message": event.message}),
                    *self._caller_line(event.item_id, "", failed=True),
                ]
            case ev.RealtimeTimeoutTriggered():
                return self._on_idle_timeout()
            case ev.RealtimeFunctionCallDone():
                return self._on_function_call(event, now)
        return []  # pragma: no cover - every conversation event is matched above

    def _on_driver_event(self, event: ev.Event, now: float) -> list[Command]:
        match event:
            case ev.Tick():
                return self._on_tick(now)
            case ev.ContextLoaded():
                return self._on_context_loaded(event)
            case ev.ContextResolved():
                return self._on_context_resolved(event)
            case ev.ToolFinished():
                return self._on_tool_finished(event)
            case ev.HangupRequested():
                return self._end(event.reason, now, hang_up=True)
            case ev.EndRequested():
                return self._end(event.reason, now, fallback=True)
            case ev.CallRefused():
                self.context = None  # not this call's to claim: nothing is recorded against it
                return self._refuse(event.reason, now)
            case ev.AmdVerdict():
                return self._on_amd(event, now)
        return []  # pragma: no cover - every driver event is matched above

    def _on_model_event(self, event: ev.Event, now: float) -> list[Command]:
        """The model's connection and session (the conversation's events are :meth:`_on_conversation_event`'s)."""
        match event:
            case ev.RealtimeConnected():
                self._realtime_connected = True
                self._realtime_since = now
                return self._maybe_configure()
            case ev.RealtimeConnectFailed():
                return self._on_connect_failed(event, now)
            case ev.RealtimeSessionUpdated():
                return self._on_session_updated(event, now)
            case ev.RealtimeError():
                return self._on_realtime_error(event, now)
            case ev.RealtimeClosed():
                log = Log("realtime.closed", "warning", {"code": event.code, "reason": event.reason})
                if self.phase != "live":
                    return [log, *self._retry("realtime_closed", now)]
                return [log, *self._reconnect(now)]
            case ev.RealtimeOther(known=False):
                self.stats.protocol_errors += 1
                return [Log("realtime.unknown_event", "warning", {"type": event.type})]
        return []  # session.created, item truncated, and the events the session does not act on

    # ------------------------------------------------------------------------------------------------ time

    def _update_deadline(self, now: float) -> None:
        """Recompute :meth:`next_deadline` from every timer the session has running."""
        if self.phase == "ended":
            if self._deadline is not None:
                self._deadline = None
                self.timers_version += 1
            return
        deadlines: list[float] = []
        if self.phase == "connecting" and self._ready_by is not None:
            deadlines.append(self._ready_by)
        if self._closing is not None:
            deadlines.append(self._closing_since + self._closing_limit_s)
        if self._amd and self._amd_deadline is not None:
            deadlines.append(self._amd_deadline)
        if self.phase == "live" and self._rollover_at is not None:
            if now < self._rollover_at:
                deadlines.append(self._rollover_at)
            elif now < self._rollover_at + ROLLOVER_HARD_STOP_S:
                deadlines.append(self._rollover_at + ROLLOVER_HARD_STOP_S)
        filler_after = self.agent.tool_filler_after_ms / 1000
        if self._tools_since is not None and filler_after > 0 and not self._filler_said:
            deadlines.append(self._tools_since + filler_after)
        deadline = min(deadlines) if deadlines else None
        if deadline != self._deadline:
            self._deadline = deadline
            self.timers_version += 1

    def _on_tick(self, now: float) -> list[Command]:
        due = now + TIMER_SLACK_S
        if self.phase == "connecting" and self._ready_by is not None and due >= self._ready_by:
            return self._not_ready(now)
        commands: list[Command] = []
        if self._held and due >= self._held_since + COALESCE_HOLD_S:
            commands += self._flush_held(now)
        if self._closing is not None and due >= self._closing_since + self._closing_limit_s:
            return [*commands, *self._goodbye_overdue(now)]
        if self._amd and self._amd_deadline is not None and due >= self._amd_deadline:
            return [*commands, *self._amd_timed_out(now)]
        filler_after = self.agent.tool_filler_after_ms / 1000
        if (
            self._tools_since is not None
            and filler_after > 0
            and not self._filler_said
            and due >= self._tools_since + filler_after
        ):
            commands += self._tool_filler()
        return commands

    def _not_ready(self, now: float) -> list[Command]:
        """The model's session was not confirmed in time: the caller gets the fallback, not more silence."""
        waited_s = round(self.config.ready_timeout_s, 3)
        data = {"waited_s": waited_s, "connected": self._realtime_connected, "configured": self._configured}
        return [
            Log("realtime.not_ready", "error", data),
            RecordEvent("realtime_not_ready", data),
            *self._end(self._ready_reason, now, hang_up=self.config.hang_up_when_model_ends, fallback=True),
        ]

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
        if event.encoding != ev.TWILIO_PHONE_AUDIO or event.sample_rate != ev.PHONE_SAMPLE_RATE:
            return self._refuse(f"unsupported media format {event.encoding}/{event.sample_rate}", now)
        try:
            self.context = self.config.verify_parameters(event.custom_parameters, event.call_sid)
        except ParameterError as exc:
            return self._refuse(str(exc), now)
        self.phase = "connecting"
        self._ready_by = now + self.config.ready_timeout_s
        commands: list[Command] = [OpenRealtime()]
        if self._context_loaded:  # the parameters' context is the call's context
            commands = [*self._context_known(), *commands]
        return commands

    def _context_known(self) -> list[Command]:
        """The call's context is settled: choose its agent, and ask the host application for more if configured."""
        context = self.context or CallContext()
        # Looked up at each admission, the default agent by name too: the agents' tools may have changed since the
        # configuration was made (an MCP server's tools appear once it answers).
        agents = self.config.agents
        self.agent = agents.get(context.agent or "") or agents.get(self.config.agent.name, self.config.agent)
        commands: list[Command] = [Log("call.admitted", "info", {"caller": context.caller, "agent": self.agent.name})]
        if context.machine_detection and context.direction == "outbound" and not self._amd:
            self._amd = "pending"
            self._amd_deadline = self._t0 + self.config.amd_timeout_s
            if context.answered_by and self._amd_early is None:  # decided before the stream came
                self._amd_early = ev.AmdVerdict(context.answered_by)
        if self.config.resolve_context:
            commands.append(ResolveContext(context))
        return commands

    def _on_context_loaded(self, event: ev.ContextLoaded) -> list[Command]:
        if self._context_loaded or self.phase != "connecting":
            return []
        self._context_loaded = True
        signed = self.context or CallContext()
        if event.context is not None:  # the record's context, bound to what the parameters proved
            self.context = dataclasses.replace(event.context, call_sid=signed.call_sid, binding=signed.binding)
        return [*self._context_known(), *self._maybe_configure()]

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
        return [self._append(event.payload)]

    def _append(self, payload: str) -> AppendAudio:
        return AppendAudio(f"cb_{next(self._event_ids)}", payload)

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
        return [*self._settle_agent_items(now), *self._close_after_goodbye(now)]

    def _on_dtmf(self, event: ev.TwilioDtmf) -> list[Command]:
        """A key press reaches the model as a conversation item, and the application as an event."""
        if self.phase != "live":
            return [Log("twilio.dtmf_ignored", "info", {"digit": event.digit})]
        self._needs_response = True  # a caller who presses a key waits for an answer without speaking
        self._idle_prompts = 0
        note = Message("user", f"[The caller pressed the key {event.digit} on their keypad.]")
        return [
            Log("twilio.dtmf", "info", {"digit": event.digit}),
            RecordEvent("dtmf", {"digit": event.digit}),
            self._send(CreateItem(self._event_id(), note)),
            *self._continue_after_tools(),
        ]

    # ------------------------------------------------------------------------------------------------ Realtime

    def _event_id(self) -> str:
        return f"cb_{next(self._event_ids)}"

    def _send(self, command: _Control) -> _Control:
        """A client event, remembered for a while by its ``event_id`` so that an error can name its cause."""
        recent = self._control_events
        recent[command.event_id] = command.operation
        if len(recent) > 64:
            del recent[next(iter(recent))]
        return command

    def _on_context_resolved(self, event: ev.ContextResolved) -> list[Command]:
        if self._context_ready:
            return []
        self._context_ready = True
        self.context = merge_context(self.context or CallContext(), event.context)
        return self._maybe_configure()

    def _maybe_configure(self) -> list[Command]:
        """Configure the model once it is connected and the call's context is known (they are found in parallel).

        Only ``session.update`` goes now: the conversation and the greeting wait for the model to confirm it.
        """
        if (
            self.phase != "connecting"
            or self._configured
            or not (self._realtime_connected and self._context_loaded and self._context_ready)
        ):
            return []
        self._configured = True
        update = self._session_update(self.agent, self.context or CallContext())
        self._session_update_id = update.event_id
        return [update]

    def _session_update(self, agent: AgentConfig, context: CallContext) -> UpdateSession:
        if self._amd:
            agent = _listening_only(agent)
        return self._send(UpdateSession(self._event_id(), agent, context.instructions or agent.instructions))

    def _on_session_updated(self, event: ev.RealtimeSessionUpdated, now: float) -> list[Command]:
        """The model confirmed the configuration: the call goes live, if the audio is what a phone carries."""
        if self.phase != "connecting" or not self._configured:
            return []
        if event.input_format != ev.REALTIME_PHONE_AUDIO or event.output_format != ev.REALTIME_PHONE_AUDIO:
            formats = f"input {event.input_format}, output {event.output_format}"
            return self._session_rejected(
                "unsupported_audio_format", f"the session's audio is {formats}, not audio/pcmu", "session.audio", now
            )
        self.phase = "live"
        self._attempt = 0
        self._outage_since = None
        self._ready_by = None
        if self.config.rollover_after_s is not None:
            self._rollover_at = self._realtime_since + self.config.rollover_after_s
        agent, context = self.agent, self.context or CallContext()
        commands: list[Command] = []
        items = self._seed_items(context)
        items += [self._history_item(who, text) for who, text in self._history]
        commands += [self._send(CreateItem(self._event_id(), item)) for item in items]
        if agent.speaks_first and not self._history and not self._amd:  # after a reconnect: no new greeting
            self._greeting_request = self._greeting(agent, context)
            commands.append(self._response_create(self._greeting_request))
        frames = self._buffer.frames
        if frames:
            self._audio_offset_ms = frames[0].timestamp_ms
        buffered = len(frames)
        while frames:
            commands.append(self._append(frames.popleft().payload))
        self._buffer.bytes = 0
        commands.append(Log("realtime.ready", "info", {"buffered_frames": buffered}))
        if self._amd_early is not None:  # Twilio decided before the model was ready
            early, self._amd_early = self._amd_early, None
            commands += self._on_amd(early, now)
        return commands + self._flush_host()  # what the host application asked for before the model was lost

    def _session_rejected(self, code: str, message: str, param: str | None, now: float) -> list[Command]:
        """The model refused the configuration: the same one would be refused again, so the caller gets the
        fallback at once (the model would otherwise go on with its defaults, whose audio a phone plays as noise)."""
        data = {"code": code, "message": message, "param": param}
        return [
            Log("realtime.session_rejected", "error", data),
            RecordEvent("realtime_session_rejected", data),
            *self._end("realtime_session_rejected", now, hang_up=self.config.hang_up_when_model_ends, fallback=True),
        ]

    @staticmethod
    def _seed_items(context: CallContext) -> list[ConversationItem]:
        """Context as conversation items: facts about the call first, then earlier conversation."""
        facts = ["You placed this call." if context.direction == "outbound" else "The person called you."]
        if context.name:
            facts.append(f"You are speaking with {context.name}.")
        if context.person_number:
            facts.append(f"Their phone number is {context.person_number}.")
        items: list[ConversationItem] = [Message("system", " ".join(facts))]
        items.extend(Message(item.role, item.text) for item in context.items)
        return items

    @staticmethod
    def _history_item(speaker: str, text: str) -> ConversationItem:
        if speaker == "agent":
            return Message("assistant", text)
        if speaker == "system":  # the host application's instructions
            return Message("system", text)
        return Message("user", text or UNTRANSCRIBED_TURN)

    def _remember(self, speaker: str, text: str) -> None:
        """Keep a line for the replay into a new model session, within :data:`HISTORY_CHARS`."""
        self._history.append((speaker, text))
        self._history_chars += len(text) or len(UNTRANSCRIBED_TURN)
        while self._history_chars > HISTORY_CHARS and len(self._history) > 1:
            _, old = self._history.popleft()
            self._history_chars -= len(old) or len(UNTRANSCRIBED_TURN)

    @staticmethod
    def _greeting(agent: AgentConfig, context: CallContext) -> str | None:
        """The greeting response's instructions (None: the model greets as its session's instructions say)."""
        greeting = context.greeting or agent.greeting
        if not greeting:
            return None
        instructions = context.instructions or agent.instructions
        return f"{instructions}\n\nStart the call now by saying exactly: {greeting}"

    def _response_create(self, instructions: str | None = None) -> CreateResponse:
        command = self._send(CreateResponse(self._event_id(), instructions or None))
        self._awaiting_response = command.event_id
        return command

    # ------------------------------------------------------------------------------------------------ agent audio

    def _on_audio_delta(self, event: ev.RealtimeAudioDelta, now: float) -> list[Command]:
        if self.phase != "live":  # never play audio of a session the model has not confirmed
            self.stats.deltas_unconfirmed += 1
            return []
        if (
            event.item_id in self._dropped_items
            or event.response_id in self._interrupted_responses
            or self.stream_sid is None
        ):
            self.stats.deltas_dropped += 1
            return []
        item = self._items.get(event.item_id)
        commands: list[Command] = [] if item is not None else self._new_agent_item(event, now)
        if item is None:
            item = self._items[event.item_id]
        size = b64_audio_bytes(event.delta)
        item.received_bytes += size
        self.stats.deltas_out += 1
        held = self._held
        if not held:
            if size >= COALESCE_BYTES or self._playing_until <= now + COALESCE_HOLD_S:
                if commands:
                    return commands + self._forward(item, event.delta, size, now)
                return self._forward(item, event.delta, size, now)
            self._held_item = item
            self._held_since = now
            self.timers_version += 1
        elif self._held_item is not item or size >= COALESCE_BYTES:
            commands += self._flush_held(now)
            return commands + self._on_more_audio(item, event.delta, size, now)
        held.append(event.delta)
        self._held_bytes += size
        if self._held_bytes >= COALESCE_BYTES:
            commands += self._flush_held(now)
        return commands

    def _new_agent_item(self, event: ev.RealtimeAudioDelta, now: float) -> list[Command]:
        """The first audio of an agent item: it becomes the one playing last; the turn's latency is measured."""
        item = self._items[event.item_id] = _AgentItem(event.item_id, event.response_id)
        self._current_item = item
        self._responses_with_audio.add(event.response_id)
        if self._turn_ended_at is None:
            return []
        latency = now - self._turn_ended_at  # the agent's first audio after the caller's turn
        self._turn_ended_at = None
        return [Measure("turn_latency_s", latency)]

    def _on_more_audio(self, item: _AgentItem, delta: str, size: int, now: float) -> list[Command]:
        """A delta after what was held was flushed: forward it, or start holding again."""
        if size >= COALESCE_BYTES or self._playing_until <= now + COALESCE_HOLD_S:
            return self._forward(item, delta, size, now)
        self._held.append(delta)
        self._held_item = item
        self._held_bytes = size
        self._held_since = now
        self.timers_version += 1
        return []

    def _flush_held(self, now: float) -> list[Command]:
        """Send the held deltas to Twilio as one chunk."""
        item, held, size = self._held_item, self._held, self._held_bytes
        if item is None or not held:
            return []
        self._held = []
        self._held_item = None
        self._held_bytes = 0
        self.timers_version += 1
        if len(held) == 1:
            return self._forward(item, held[0], size, now)
        # Base64 pieces do not concatenate unless each is a multiple of 3 bytes long: join the bytes.
        joined = binascii.b2a_base64(b"".join(binascii.a2b_base64(piece) for piece in held), newline=False)
        return self._forward(item, joined.decode("ascii"), size, now)

    def _discard_held(self, now: float) -> None:
        """Drop what is held (the caller interrupted): it was never sent, so it was never heard."""
        if self._held:
            self._held = []
            self._held_item = None
            self._held_bytes = 0
            self.timers_version += 1

    def _forward(self, item: _AgentItem, payload: str, size: int, now: float) -> list[Command]:
        """Send agent audio to Twilio, and the mark that will say when it has played."""
        commands: list[Command] = []
        if not self._pending_marks:  # Twilio's queue is empty: this chunk starts playing now
            self._head_started_at = now
            if item.started_at is None:
                item.started_at = now
        until = self._playing_until
        self._playing_until = (until if until > now else now) + size / BYTES_PER_SECOND
        start = item.forwarded_bytes
        item.forwarded_bytes += size
        chunk = self._open_chunk
        if chunk is not None and chunk.item_id != item.item_id:
            commands.extend(self._send_mark())
            chunk = None
        if chunk is None:
            chunk = self._open_chunk = _PendingMark("", item.item_id, start, item.forwarded_bytes)
            self._pending_marks.append(chunk)
        chunk.end_byte = item.forwarded_bytes
        self.stats.media_out += 1
        commands.append(PlayAudio(payload))
        if chunk.end_byte - chunk.start_byte >= MARK_EVERY_BYTES:
            commands.extend(self._send_mark())
        return commands

    def _send_mark(self) -> list[Command]:
        """Close the open chunk: the mark Twilio echoes once the caller has heard the audio up to it."""
        chunk, self._open_chunk = self._open_chunk, None
        if chunk is None:
            return []
        chunk.name = f"{chunk.item_id}:{chunk.end_byte}"
        return [SendMark(chunk.name)]

    def _played_bytes(self, item_id: str, now: float) -> int:
        item = self._items.get(item_id)
        if item is None:
            return 0
        if self._pending_marks and self._pending_marks[0].item_id == item_id:
            head = self._pending_marks[0]
            elapsed = max(0, round((now - self._head_started_at) * BYTES_PER_SECOND))
            return max(item.played_bytes, head.start_byte + min(elapsed, head.end_byte - head.start_byte))
        return item.played_bytes

    # ------------------------------------------------------------------------------------------------ turns

    def _on_speech_started(self, event: ev.RealtimeSpeechStarted, now: float) -> list[Command]:
        turns = self._caller_turns
        turns[event.item_id] = _CallerTurn(start_ms=event.audio_start_ms)
        if len(turns) > 32:  # turns whose transcription never came
            del turns[next(iter(turns))]
        self._idle_prompts = 0
        self._idle_goodbye = False
        if self._closing is not None and self._closing[0] == VOICEMAIL_LEFT:
            return []  # a machine's beep or noise does not cut the message short
        active = self._active_response
        fresh_response = active is not None and active not in self._interrupted_responses
        if not self._pending_marks and not self._held and not fresh_response:
            return []  # nothing is playing or being generated: an ordinary turn
        self.stats.barge_ins += 1
        commands, data = self._cut_off(now, cancel=not self.agent.server_cancels_on_speech)
        commands += [Log("barge_in", "info", {"heard_ms": data["heard_ms"], "items": len(data["items"])})]
        commands.append(RecordEvent("barge_in", data))
        commands += self._settle_agent_items(now)
        return commands

    def _cut_off(self, now: float, *, cancel: bool) -> tuple[list[Command], dict[str, Any]]:
        """Stop the agent where the caller is: clear what Twilio has buffered, drop what is held, cancel the response
        being generated (``cancel``: unless the server cancels it itself), and leave in the model's conversation only
        what the caller heard. Returns the commands and what was taken back."""
        active = self._active_response
        fresh_response = active is not None and active not in self._interrupted_responses
        playing = self._pending_marks[0].item_id if self._pending_marks else None
        heard = {item_id: self._played_bytes(item_id, now) for item_id in self._items}
        commands: list[Command] = []
        if self._pending_marks:
            commands.append(ClearAudio())
            self._flushed_marks.update(mark.name for mark in self._pending_marks if mark.name)
            if len(self._flushed_marks) > 4096:  # echoes Twilio never sent
                self._flushed_marks.clear()
            self._pending_marks.clear()
            self._open_chunk = None  # never marked: Twilio has nothing to echo for it
        self._playing_until = now
        self._discard_held(now)
        if active is not None and fresh_response:
            self._interrupted_responses.add(active)  # its late deltas must not reach the caller
            if cancel:
                self.stats.cancels += 1
                commands.append(self._send(CancelResponse(self._event_id())))
        taken_back: list[dict[str, Any]] = []
        for item in list(self._items.values()):
            if item.interrupted:
                continue
            still_coming = item.response_id == active and item is self._current_item
            if heard[item.item_id] >= item.received_bytes and not still_coming:
                continue  # the caller heard all of it
            commands += self._take_back(item, heard[item.item_id], now)
            taken_back.append({"item_id": item.item_id, "heard_ms": (item.heard_bytes or 0) // BYTES_PER_MS})
        heard_ms = heard.get(playing, 0) // BYTES_PER_MS if playing else 0
        return commands, {"heard_ms": heard_ms, "item_id": playing, "items": taken_back}

    def _take_back(self, item: _AgentItem, heard: int, now: float) -> list[Command]:
        """Leave in the model's conversation only what the caller heard of an interrupted item.

        Cut to what was heard (``conversation.item.truncate``), or deleted when not a millisecond of it was (an
        item cannot be truncated to no audio). Not truncated when everything was heard of a finished item. While
        the response still streams, the server holds at least what we received, so ``min(heard, received)`` is
        always a valid end.
        """
        item.interrupted = True
        item.heard_bytes = min(heard, item.received_bytes)
        self._dropped_items[item.item_id] = item.response_id
        heard_ms = item.heard_bytes // BYTES_PER_MS
        if heard_ms <= 0:
            self.stats.deletions += 1
            self._deleted_items.add(item.item_id)
            item.recorded = True  # nothing of it was heard: no transcript line
            return [self._send(DeleteItem(self._event_id(), item.item_id))]
        commands: list[Command] = []
        if not (item.heard_bytes >= item.received_bytes and item.response_done):
            self.stats.truncations += 1
            commands.append(self._send(TruncateItem(self._event_id(), item.item_id, heard_ms)))
        commands.extend(self._record_agent_line(item, now))
        return commands

    def _on_speech_stopped(self, event: ev.RealtimeSpeechStopped, now: float) -> list[Command]:
        self._turn_ended_at = now
        if self.agent.transcription_model:
            self._caller_turns.setdefault(event.item_id, _CallerTurn()).end_ms = event.audio_end_ms
        else:  # no line will come: the replay after a reconnect still says the caller spoke
            self._caller_turns.pop(event.item_id, None)
            self._remember("caller", "")
        return []

    def _on_response_created(self, event: ev.RealtimeResponseCreated, now: float) -> list[Command]:
        self._active_response = event.response_id
        self._awaiting_response = None
        if self._cut_next_response:  # asked for before the host application cut in: it is not heard
            self._cut_next_response = False
            self._interrupted_responses.add(event.response_id)
            self.stats.cancels += 1
            return [self._send(CancelResponse(self._event_id(), event.response_id))]
        if self._idle_goodbye and self._closing is None:
            # The server re-prompts a silent caller by itself; after the last re-prompt the agent says goodbye.
            self._idle_goodbye = False
            self._interrupted_responses.add(event.response_id)
            self._closing = ("caller_idle", None)
            self._closing_since = now
            self._needs_response = True
            self._next_instructions = f"The caller has not answered. End the call by saying exactly: {IDLE_GOODBYE}"
            self.stats.cancels += 1
            return [self._send(CancelResponse(self._event_id(), event.response_id))]
        if self._closing_stage == "awaiting_goodbye" and self._closing_response is None:
            self._closing_response = event.response_id
        return []

    def _on_idle_timeout(self) -> list[Command]:
        self._idle_prompts += 1
        data = {"re_prompts": self._idle_prompts, "limit": self.agent.idle_hangup_after}
        if self._idle_prompts > self.agent.idle_hangup_after:
            self._idle_goodbye = True
        return [Log("caller.idle", "info", data), RecordEvent("caller_idle", data)]

    def _on_response_done(self, event: ev.RealtimeResponseDone, now: float) -> list[Command]:
        rid = event.response_id
        self._host_request = None
        if self._active_response == rid:
            self._active_response = None
        commands: list[Command] = []
        if self._held_item is not None and self._held_item.response_id == rid:
            commands += self._flush_held(now)  # no more audio comes: what is held goes now
        for item in self._items.values():
            if item.response_id == rid:
                item.response_done = True
                if item.transcript is None:  # its transcript comes before response.done, or never: no line
                    item.recorded = True
        if event.usage is not None:
            self.usage.add(event.usage)
        if rid in self._interrupted_responses:
            self._interrupted_responses.discard(rid)
            # Items of the interrupted response that never reached the caller (their audio came after the barge-in,
            # or none came) leave the model's conversation too.
            for item_id in event.output_item_ids:
                if item_id not in self._items and item_id not in self._deleted_items:
                    self.stats.deletions += 1
                    commands.append(self._send(DeleteItem(self._event_id(), item_id)))
        for item_id in [item_id for item_id, owner in self._dropped_items.items() if owner == rid]:
            del self._dropped_items[item_id]
        self._deleted_items.difference_update(event.output_item_ids)
        had_audio = rid in self._responses_with_audio
        self._responses_with_audio.discard(rid)
        if self._closing_response == rid:
            self._closing_stage = "goodbye"
        outcome = self._response_outcome(event, had_audio, now)
        if self.phase == "ended":
            return [*commands, *outcome]
        return [
            *commands,
            *outcome,
            *self._send_mark(),  # no more audio comes: the last chunk gets its mark now
            *self._settle_agent_items(now),
            *self._continue_after_tools(),
            *self._flush_host(),
            *self._close_after_goodbye(now),
        ]

    def _response_outcome(self, event: ev.RealtimeResponseDone, had_audio: bool, now: float) -> list[Command]:
        """A failed or incomplete response is recorded; one that left the caller with nothing is tried again once."""
        if event.status == "completed":
            if had_audio:
                self._retried_failure = False
                self._greeting_request = None
            return []
        if event.status not in ("failed", "incomplete"):
            return []
        details = event.status_details or {}
        kind = f"response_{event.status}"
        data: dict[str, Any] = {"response_id": event.response_id, "status_details": details}
        commands: list[Command] = [Log(f"realtime.{kind}", "warning", data), RecordEvent(kind, data)]
        if event.status == "incomplete":
            self.stats.responses_incomplete += 1
            return commands
        self.stats.responses_failed += 1
        fatal = FATAL_ERRORS.get(details.get("error_code", "")) or FATAL_ERRORS.get(details.get("error_type", ""))
        if fatal is not None:
            return commands + self._end(fatal, now, hang_up=self.config.hang_up_when_model_ends, fallback=True)
        if had_audio:
            return commands  # the caller heard part of it and will answer
        if self._retried_failure:
            return commands + self._end(
                "realtime_response_failed", now, hang_up=self.config.hang_up_when_model_ends, fallback=True
            )
        self._retried_failure = True
        self._needs_response = False  # the retry is the response
        commands.append(Log("realtime.response_retry", "info", {"response_id": event.response_id}))
        commands.append(self._response_create(self._greeting_request))
        return commands

    def _on_partial(self, event: ev.RealtimeTranscriptDelta, now: float) -> list[Command]:
        """Interim text of a line, out at most every :data:`PARTIAL_EVERY_S` (the completed line follows anyway)."""
        partials = self._partials
        text = (partials.get(event.item_id, "") + event.delta)[:PARTIAL_CHARS]
        partials[event.item_id] = text
        if len(partials) > 8:  # lines whose completion never came
            del partials[next(iter(partials))]
        if now - self._partial_at < PARTIAL_EVERY_S or not text.strip():
            return []
        self._partial_at = now
        return [ShowPartial(event.speaker, event.item_id, text)]

    def _on_agent_transcript(self, event: ev.RealtimeAudioTranscriptDone, now: float) -> list[Command]:
        item = self._items.get(event.item_id)
        if item is None:  # no audio of it reached the caller, or it is settled already
            return []
        item.transcript = event.transcript
        if item.interrupted:
            return [*self._record_agent_line(item, now), *self._settle_agent_items(now)]
        return self._settle_agent_items(now)

    def _settle_agent_items(self, now: float) -> list[Command]:
        """Record agent lines whose audio has fully played (a line is final only once the caller heard it), and
        forget the items that are settled: nothing about them can change any more."""
        commands: list[Command] = []
        for item in list(self._items.values()):
            if (
                not item.recorded
                and item.transcript is not None
                and item.response_done
                and item.played_bytes >= item.received_bytes
            ):
                commands.extend(self._record_agent_line(item, now))
            if (
                item.recorded
                and item.response_done
                and (item.interrupted or item.played_bytes >= item.received_bytes)
                and item is not self._held_item
            ):
                del self._items[item.item_id]
                if self._current_item is item:
                    self._current_item = None
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
        self._remember("agent", line.text)
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
        self._remember("caller", line.text)  # an empty line still tells a new session the caller spoke
        return [RecordTranscript(line)]

    # ------------------------------------------------------------------------------------------------ tools

    def _on_function_call(self, event: ev.RealtimeFunctionCallDone, now: float) -> list[Command]:
        if event.status != "completed":  # interrupted calls carry truncated arguments
            return [Log("tool.skipped", "info", {"name": event.name, "status": event.status})]
        self.stats.tool_calls += 1
        if event.name in self.agent.builtin_tools:
            return self._call_control(event, now)
        if not self._running_tools:
            self._tools_since = now
            self._filler_said = False
        self._running_tools[event.call_id] = (event.name, event.arguments)
        return [
            Log("tool.call", "info", {"name": event.name, "call_id": event.call_id}),
            RunTool(event.call_id, event.name, event.arguments),
        ]

    def _tool_filler(self) -> list[Command]:
        """A tool is slow: the caller hears a short filler rather than dead air (once; the tool's answer follows)."""
        self._filler_said = True
        if self._active_response is not None or self._closing is not None or self.phase != "live":
            return []  # the caller is hearing something already
        instructions = (
            "A tool you called is still working. Tell the caller you are checking, in a few words, by saying "
            f"exactly: {TOOL_FILLER}"
        )
        return [Log("tool.filler", "info", {}), self._response_create(instructions)]

    def _call_control(self, event: ev.RealtimeFunctionCallDone, now: float) -> list[Command]:
        """``end_call`` and ``transfer_call``: the model says a last sentence, then the call ends or moves on;
        ``do_not_call``: the person goes on the do-not-call list, and the call goes on."""
        if event.name == "do_not_call":
            return self._do_not_call(event)
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
        record = {"name": event.name, "arguments": event.arguments, "output": result, "ok": output["ok"]}
        return [
            Log("tool.call", "info", {"name": event.name, "call_id": event.call_id}),
            RecordEvent("tool_call", record),
            self._send(CreateItem(self._event_id(), FunctionOutput(event.call_id, result))),
            *self._continue_after_tools(),
        ]

    def _do_not_call(self, event: ev.RealtimeFunctionCallDone) -> list[Command]:
        number = (self.context or CallContext()).person_number
        try:
            reason = json.loads(event.arguments or "{}").get("reason")
        except (ValueError, AttributeError):
            reason = None
        output = {"ok": True, "instruction": "Confirm in one short sentence that they will not be called again."}
        if number is None:
            output = {"ok": False, "error": "The person's number is not known: say a colleague will see to it."}
        self._needs_response = True
        result = _json(output)
        commands: list[Command] = [
            Log("tool.call", "info", {"name": event.name, "call_id": event.call_id}),
            RecordEvent("tool_call", {"name": event.name, "arguments": event.arguments, "output": result, "ok": True}),
        ]
        if number is not None:  # the service puts the number on the list when it keeps this event
            commands.append(RecordEvent("do_not_call", {"number": number, "reason": reason}))
        return [
            *commands,
            self._send(CreateItem(self._event_id(), FunctionOutput(event.call_id, result))),
            *self._continue_after_tools(),
        ]

    def _on_tool_finished(self, event: ev.ToolFinished) -> list[Command]:
        if event.call_id not in self._running_tools:
            return [Log("tool.unknown_result", "warning", {"call_id": event.call_id})]
        name, arguments = self._running_tools.pop(event.call_id)
        if not self._running_tools:
            self._tools_since = None
        self._needs_response = True
        record = {"name": name, "arguments": arguments, "output": event.output, "ok": event.ok}
        return [
            RecordEvent("tool_call", record),
            self._send(CreateItem(self._event_id(), FunctionOutput(event.call_id, event.output))),
            *self._continue_after_tools(),
        ]

    def _continue_after_tools(self) -> list[Command]:
        """One ``response.create`` once every tool of the turn has answered and no response is active (held while
        an answering-machine verdict is awaited)."""
        if not self._needs_response or self._running_tools or self._active_response is not None or self._amd:
            return []
        self._needs_response = False
        if self._closing is not None and not self._closing_stage:
            self._closing_stage = "awaiting_goodbye"
        instructions, self._next_instructions = self._next_instructions, None
        return [self._response_create(instructions)]

    def _goodbye_overdue(self, now: float) -> list[Command]:
        self._closing_stage = "goodbye"
        self._flushed_marks.update(mark.name for mark in self._pending_marks if mark.name)  # late echoes are expected
        self._pending_marks.clear()
        self._open_chunk = None
        return [Log("call.goodbye_overdue", "warning", {"waited_s": GOODBYE_LIMIT_S}), *self._close_after_goodbye(now)]

    def _close_after_goodbye(self, now: float) -> list[Command]:
        """End or transfer the call once the goodbye has been said and heard (or cut off by the caller)."""
        if self._closing is None or self._closing_stage != "goodbye" or self._pending_marks or self._held:
            return []
        reason, transfer_to = self._closing
        self._closing = None
        if transfer_to is not None:
            return [TransferCall(transfer_to), *self._end(reason, now)]
        return self._end(reason, now, hang_up=True)

    # ---------------------------------------------------------------------------------------------- answering machines

    def _on_amd(self, event: ev.AmdVerdict, now: float) -> list[Command]:
        """Twilio's verdict: a person hears the greeting; a machine gets the voicemail at the end of its greeting."""
        verdict = event.answered_by
        data: dict[str, Any] = {"answered_by": verdict, "detection_ms": event.detection_ms}
        data["after_ms"] = round((now - self._t0) * 1000)
        if not self._amd and self.phase in ("awaiting_start", "connecting") and not self._configured:
            self._amd_early = event  # the call's context (does it await a verdict?) is not known yet
            return [Log("amd.verdict_early", "info", data)]
        if not self._amd:  # no detection awaited, or decided already (a late verdict is kept, not acted on)
            return [Log("amd.ignored", "info", data), RecordEvent("amd", {**data, "acted": False})]
        if self.phase != "live":
            self._amd_early = event
            return [Log("amd.verdict_early", "info", data)]
        commands: list[Command] = [Log("amd.verdict", "info", data), RecordEvent("amd", {**data, "acted": True})]
        if verdict == "machine_start":
            self._amd = "machine_start"
            self._amd_deadline = now + self.config.amd_machine_wait_s
            return commands
        if verdict.startswith("machine_end"):
            return commands + self._leave_voicemail(now)
        if verdict == "fax":
            self._amd = ""
            return commands + self._end("fax", now, hang_up=True)
        return commands + self._amd_person()  # human, unknown, or a value Twilio may add

    def _amd_timed_out(self, now: float) -> list[Command]:
        waited = round((now - self._t0) * 1000)
        if self._amd == "machine_start":  # a machine whose greeting never ended: the message all the same
            data = {"answered_by": "machine_start", "timed_out": True, "after_ms": waited}
            return [RecordEvent("amd", data), *self._leave_voicemail(now)]
        data = {"answered_by": None, "timed_out": True, "after_ms": waited}
        commands: list[Command] = [Log("amd.timeout", "info", data), RecordEvent("amd", data)]
        if self.phase != "live":
            self._amd_early = ev.AmdVerdict("unknown")  # a person, once the model is ready
            return commands
        return commands + self._amd_person()

    def _amd_person(self) -> list[Command]:
        """A person answered: the agent listens and answers again, and greets."""
        self._amd = ""
        self._amd_deadline = None
        agent, context = self.agent, self.context or CallContext()
        commands: list[Command] = [self._session_update(agent, context)]
        if agent.speaks_first and not self._history:
            self._greeting_request = self._greeting(agent, context)
            commands.append(self._response_create(self._greeting_request))
        return commands + self._continue_after_tools() + self._flush_host()

    def _leave_voicemail(self, now: float) -> list[Command]:
        """The message word for word, then the call ends once it has played (``voicemail_left``); without a message
        the call ends at once (``machine_detected``)."""
        self._amd = ""
        self._amd_deadline = None
        message = (self.context or CallContext()).voicemail
        if not message:
            return self._end(MACHINE_DETECTED, now, hang_up=True)
        self._closing = (VOICEMAIL_LEFT, None)
        self._closing_since = now
        self._closing_limit_s = GOODBYE_LIMIT_S + len(message) / VOICEMAIL_CHARS_PER_S
        self._closing_stage = "queued"
        self._needs_response = False
        self._host_responses.clear()
        self._host_responses.append((HOST_SAY + message, True))
        return [Log("amd.voicemail", "info", {"chars": len(message)}), *self._flush_host()]

    # ------------------------------------------------------------------------------------------------ host control

    def _on_host_event(self, event: ev.Event, now: float) -> list[Command]:
        """What the host application asks of the live call; refused (and nothing done) unless the call is live."""
        if self.phase != "live":
            return [ControlRefused("not_ready", "the agent is not ready: the model's session is not confirmed yet")]
        if self._closing is not None:
            return [ControlRefused("ending", "the call is ending: a goodbye or a transfer is under way")]
        match event:
            case ev.HostSay():
                return self._host_say(event, now)
            case ev.HostInstruct():
                return self._host_instruct(event)
            case ev.HostTransfer():
                return self._host_transfer(event, now)
        return []  # pragma: no cover - every host event is matched above

    def _host_say(self, event: ev.HostSay, now: float) -> list[Command]:
        """The agent says the text word for word: now, cut in as a barge-in is, or after its current response."""
        commands: list[Command] = [Log("host.say", "info", {"interrupt": event.interrupt, "chars": len(event.text)})]
        data: dict[str, Any] = {"text": event.text, "interrupt": event.interrupt}
        if event.interrupt:
            cut, data["cut_off"] = self._cut_in(now)
            commands += cut
            self._host_responses.appendleft((HOST_SAY + event.text, False))
        else:
            self._host_responses.append((HOST_SAY + event.text, False))
        commands.append(RecordEvent("say", data))
        return commands + self._flush_host()

    def _host_instruct(self, event: ev.HostInstruct) -> list[Command]:
        """A system message in the conversation (replayed into a new model session), and a response if asked."""
        self._remember("system", event.text)
        commands: list[Command] = [
            Log("host.instruct", "info", {"respond": event.respond, "chars": len(event.text)}),
            RecordEvent("instruct", {"text": event.text, "respond": event.respond}),
            self._send(CreateItem(self._event_id(), Message("system", event.text))),
        ]
        if event.respond:
            self._host_responses.append((None, False))
            commands += self._flush_host()
        return commands

    def _host_transfer(self, event: ev.HostTransfer, now: float) -> list[Command]:
        """The agent stops at once, says the host application's last sentence if there is one, and the call moves
        to the number (as after ``transfer_call``, within :data:`GOODBYE_LIMIT_S`)."""
        self._closing = ("transferred", event.to)
        self._closing_since = now
        self._needs_response = False  # no more answers: the call moves on
        self._next_instructions = None
        self._host_responses.clear()
        cut, taken_back = self._cut_in(now)
        # Kept as the request; the redirect, once Twilio has it, is a ``transfer`` event of its own (``{"to"}``).
        data = {"to": event.to, "say": event.say, "requested_by": "host", "cut_off": taken_back}
        commands: list[Command] = [
            Log("host.transfer", "info", {"say": event.say is not None}),
            *cut,
            RecordEvent("transfer", data),
        ]
        if event.say:
            self._closing_stage = "queued"
            self._host_responses.append((HOST_SAY + event.say, True))
            return commands + self._flush_host()
        self._closing_stage = "goodbye"  # nothing to say: as soon as nothing plays any more
        return commands + self._close_after_goodbye(now)

    def _cut_in(self, now: float) -> tuple[list[Command], dict[str, Any]]:
        """The host application cuts in: the agent stops as for a barge-in (its response cancelled by us: the server
        cancels only for the caller's speech), and a response asked for but not started yet is cancelled once it
        starts."""
        commands, taken_back = self._cut_off(now, cancel=True)
        self._cut_next_response = self._awaiting_response is not None
        return [*commands, *self._settle_agent_items(now)], taken_back

    def _flush_host(self) -> list[Command]:
        """The host application's next response, once no response is active or asked for."""
        if (
            not self._host_responses
            or self._active_response is not None
            or self._awaiting_response is not None
            or self.phase != "live"
            or self._amd  # held until the verdict: nothing is said to a machine's greeting
        ):
            return []
        instructions, goodbye = self._host_responses.popleft()
        if goodbye:
            self._closing_stage = "awaiting_goodbye"  # the next response created is the call's last sentence
            self._closing_response = None
        command = self._response_create(instructions)
        self._host_request = (command.event_id, instructions, goodbye)
        return [command]

    def _requeue_host(self) -> None:
        """The host application's response was sent but never started: it waits its turn again."""
        if self._host_request is None:
            return
        _, instructions, goodbye = self._host_request
        self._host_request = None
        self._host_responses.appendleft((instructions, goodbye))
        if goodbye:
            self._closing_stage = "queued"

    # ------------------------------------------------------------------------------------------------ errors, end

    def _on_realtime_error(self, event: ev.RealtimeError, now: float) -> list[Command]:
        self.stats.realtime_errors += 1
        caused_by = self._control_events.get(event.event_id or "")
        if event.event_id is not None and event.event_id == self._awaiting_response:
            self._awaiting_response = None  # refused: no response comes of it
            self._cut_next_response = False
        fields = {
            "code": event.code,
            "message": event.message,
            "param": event.param,
            "event_id": event.event_id,
            "caused_by": caused_by,
        }
        if event.code == "session_expired":  # the provider's session limit: not the call's fault
            return [Log("realtime.session_expired", "info", {"message": event.message}), *self._renew(now, "expired")]
        if event.code in FATAL_ERRORS:
            return [
                Log("realtime.error", "error", fields),
                RecordEvent("error", fields),
                *self._end(FATAL_ERRORS[event.code], now, hang_up=self.config.hang_up_when_model_ends, fallback=True),
            ]
        if event.event_id is not None and event.event_id == self._session_update_id and self.phase == "connecting":
            return [
                Log("realtime.error", "error", fields),
                *self._session_rejected(event.code, event.message, event.param, now),
            ]
        if event.code == "conversation_already_has_active_response":
            if self._host_request is not None and self._host_request[0] == event.event_id:
                self._requeue_host()  # the host application's: it waits its turn again
            else:
                self._needs_response = True  # the server started a response of its own: ours follows it
            return [Log("realtime.error", "warning", fields)]
        if event.code == "response_cancel_not_active":
            return [Log("realtime.error", "warning", fields)]
        return [Log("realtime.error", "error", fields), RecordEvent("error", fields)]

    def _on_connect_failed(self, event: ev.RealtimeConnectFailed, now: float) -> list[Command]:
        fields = {"reason": event.reason, "status": event.status, "code": event.code or None, "attempt": self._attempt}
        fatal = FATAL_ERRORS.get(event.code) or ("realtime_auth_failed" if event.status in (401, 403) else None)
        if fatal is not None:  # the next attempt would be refused the same way
            return [
                Log("realtime.connect_refused", "error", fields),
                RecordEvent("error", {"code": event.code or f"http_{event.status}", "message": event.reason}),
                *self._end(fatal, now, hang_up=self.config.hang_up_when_model_ends, fallback=True),
            ]
        return [Log("realtime.connect_failed", "warning", fields), *self._retry("realtime_unavailable", now)]

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

    def _maybe_rollover(self, now: float) -> list[Command]:
        """Past the rollover time: renew the model's session at a quiet moment (nobody speaking, nothing playing or
        running), or, once the hard stop has passed too, between two agent turns."""
        assert self._rollover_at is not None
        between_turns = (
            self._active_response is None
            and not self._running_tools
            and not self._needs_response
            and self._closing is None
        )
        quiet = (
            between_turns
            and not self._pending_marks
            and not self._held
            and all(turn.end_ms is not None for turn in self._caller_turns.values())
        )
        if quiet or (between_turns and now >= self._rollover_at + ROLLOVER_HARD_STOP_S):
            return self._renew(now, "rollover")
        return []

    def _renew(self, now: float, why: Literal["rollover", "expired"]) -> list[Command]:
        """Move the call to a new model session: before the provider's limit ends the old one mid-sentence, or once
        it has (``session_expired``). The new session gets the configuration and the conversation."""
        age_s = round(now - self._realtime_since)
        commands = [*self._flush_held(now), *self._send_mark()]  # audio already received plays on
        self._forget_model_session(now, "realtime_closed")
        data = {"session_age_s": age_s, "reason": why}
        return [
            *commands,
            Log("realtime.rollover", "info", data),
            RecordEvent("realtime_rollover", data),
            OpenRealtime(replace=True),
        ]

    def _reconnect(self, now: float) -> list[Command]:
        """The model's connection was lost mid-call: a new session gets the configuration and the conversation.

        Agent audio already at Twilio plays on; caller audio is buffered until the new session is ready; the
        old session's responses and tool calls are gone with it.
        """
        commands = [*self._flush_held(now), *self._send_mark()]
        self._forget_model_session(now, "realtime_closed")
        return [*commands, *self._settle_agent_items(now), *self._retry("realtime_closed", now)]

    def _forget_model_session(self, now: float, reason_if_not_ready: str) -> None:
        """Back to connecting: the next model session starts from the configuration and the transcript."""
        self.phase = "connecting"
        self._configured = False
        self._session_update_id = None
        self._realtime_connected = False
        self._ready_by = now + self.config.ready_timeout_s
        self._ready_reason = reason_if_not_ready
        self._rollover_at = None
        self._audio_offset_ms = None
        self._caller_turns.clear()
        self._active_response = None
        if self._host_request is not None and self._host_request[0] == self._awaiting_response:
            self._requeue_host()  # sent to the old session, never started: the new one says it
        self._host_request = None
        self._awaiting_response = None
        self._cut_next_response = False
        self._interrupted_responses.clear()  # the old connection's events no longer arrive
        self._responses_with_audio.clear()
        self._dropped_items.clear()
        self._deleted_items.clear()
        self._running_tools.clear()
        self._tools_since = None
        self._needs_response = False
        self._idle_goodbye = False
        self._current_item = None  # the new session knows none of the old items: never truncate them there
        for item in self._items.values():
            item.response_done = True

    def _end(
        self, reason: str, now: float, *, hang_up: bool = False, twilio_close_code: int = 1000, fallback: bool = False
    ) -> list[Command]:
        if self.phase == "ended":
            return []
        commands: list[Command] = []
        self._discard_held(now)
        for item in self._items.values():
            if not item.recorded and item.transcript is not None:
                if item.played_bytes < item.received_bytes:
                    item.interrupted = True
                    item.heard_bytes = self._played_bytes(item.item_id, now)
                commands.extend(self._record_agent_line(item, now))
        self._items.clear()
        self._pending_marks.clear()
        self._open_chunk = None
        self.phase = "ended"
        self._deadline = None
        self.timers_version += 1
        self.end_reason = reason
        commands.append(Log("call.ended", "info", {"reason": reason}))
        commands.append(EndCall(reason, hang_up=hang_up, twilio_close_code=twilio_close_code, fallback=fallback))
        return commands


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _listening_only(agent: AgentConfig) -> AgentConfig:
    """The agent while an answering-machine verdict is awaited: turn detection runs (the caller's words are heard
    and transcribed) but creates no response and interrupts nothing, and no idle re-prompt is due."""
    detection = {key: value for key, value in agent.turn_detection.items() if key != "idle_timeout_ms"}
    return dataclasses.replace(
        agent, turn_detection={**detection, "create_response": False, "interrupt_response": False}
    )
