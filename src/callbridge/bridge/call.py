"""The asyncio driver of one call: two sockets around a :class:`~callbridge.core.session.CallSession`.

It is deliberately small and dumb: each frame read becomes an event, handed to the session right in the read
callback, and the commands it returns are performed at once: sends are buffered writes, and whatever has to wait
(the model's connection, a tool, a REST call, a record) runs as a task that reports back with an event. So events
are handled one at a time, in arrival order, with no lock, no queue and no task switch per audio frame, and a
call's state has one owner. Everything a call starts is cancelled or closed before :meth:`CallBridge.wait` returns.

The Twilio side is any :class:`TwilioLink` (buffered ``send_text`` and ``close``) whose owner passes frames to
:meth:`CallBridge.twilio_message`, so the bridge runs inside any asyncio application; callbridge's own server
serves the media stream with picows (:mod:`callbridge.transport.router`). The Realtime side is a picows client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, get_args

import structlog

from callbridge.config import Settings
from callbridge.core import events as ev
from callbridge.core.commands import (
    AppendAudio,
    CancelResponse,
    ClearAudio,
    Command,
    ControlRefused,
    CreateItem,
    CreateResponse,
    DeleteItem,
    EndCall,
    Log,
    Measure,
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
    TwilioCommand,
    UpdateSession,
)
from callbridge.core.context import CallContext
from callbridge.core.recording import CallRecorder, RecordingSink
from callbridge.core.session import CallSession, SessionConfig
from callbridge.core.transcript import TranscriptLine, TranscriptSink
from callbridge.observability.metrics import RELAY_SAMPLE_EVERY
from callbridge.realtime.client import ModelConnection, RealtimeEndpoint, connect
from callbridge.realtime.client_events import encode as realtime_encode
from callbridge.realtime.protocol import parse_server_event
from callbridge.service.tools import ToolContext, ToolRegistry, ToolRunner
from callbridge.telephony.media_streams import parse_twilio_message
from callbridge.telephony.outbound import encode as twilio_encode

HangUp = Callable[[str], Awaitable[None]]
"""Ends a call through Twilio's REST API, by call SID."""
Transfer = Callable[[str, str], Awaitable[None]]
"""Redirects a live call (call SID) to a number with ``<Dial>``."""
ContextResolver = Callable[[CallContext], Awaitable[CallContext | None]]
"""Looks up a call's context in the host application (``None``: nothing to add)."""
EventSink = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""Keeps a call event: (call SID, kind, data)."""
LivePublish = Callable[[str, str, dict[str, Any]], None]
"""Publishes a live event of a call: (call SID, type, data); it never waits."""
Fallback = Callable[[str], Awaitable[None]]
"""Redirects a live call (call SID) to the fallback: an apology and hang-up, or a human."""
Authorize = Callable[[CallSession], Awaitable[CallContext | str | None]]
"""Checks an admitted call before the model is opened: a string is why it is refused; otherwise the call is let in,
with its context as the service keeps it (a :class:`CallContext`) or as its stream parameters carried it
(``None``)."""
OpenRecording = Callable[[CallSession], RecordingSink | None]
"""Where a call let in is recorded (``None``: it is not); asked once, when it is let in."""


TOOL_TIMEOUT_S: float = Settings.model_fields["tool_timeout_seconds"].default
"""How long a tool may run before the model hears that it failed (``CALLBRIDGE_TOOL_TIMEOUT_SECONDS``)."""
CONTEXT_DEADLINE_S: float = Settings.model_fields["context_timeout_seconds"].default
"""How long the host application may take to add to a call's context (``CALLBRIDGE_CONTEXT_TIMEOUT_SECONDS``)."""

# For isinstance (a tuple is checked faster than a union); the unions' members, spelled out for mypy.
_TWILIO_COMMANDS = (PlayAudio, SendMark, ClearAudio)
_REALTIME_COMMANDS = (
    AppendAudio,
    UpdateSession,
    CreateItem,
    DeleteItem,
    TruncateItem,
    CreateResponse,
    CancelResponse,
)
assert set(_TWILIO_COMMANDS) == set(get_args(TwilioCommand))
assert set(_REALTIME_COMMANDS) == set(get_args(RealtimeCommand))


class BridgeMetrics(Protocol):
    """Where the bridge reports measurements (:class:`callbridge.observability.metrics.Metrics`)."""

    def observe(self, name: str, value: float) -> None: ...

    def relayed(self, direction: str, seconds: float) -> None: ...

    def error(self, kind: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CallHooks:
    """What the host application does for a call. Each is optional: without it, the call does without."""

    authorize: Authorize | None = None
    """Checks an admitted call before the model is opened (default: a call whose parameters verified is in)."""
    resolve_context: ContextResolver | None = None
    """Adds to the call's context, within :attr:`CallLimits.context_deadline`."""
    on_admitted: Callable[[CallSession], Awaitable[None]] | None = None
    """Told once the call is let in (e.g. to put it on record)."""
    events: EventSink | None = None
    """Keeps the call's events (tool calls, barge-ins, key presses, errors)."""
    hang_up: HangUp | None = None
    transfer: Transfer | None = None
    fallback: Fallback | None = None
    record: OpenRecording | None = None
    """Records the call from the stream's start: the caller, and the agent as the caller heard it."""
    live: LivePublish | None = None
    """Publishes the call's live events (its phase, interim text, turn latency); it must not wait."""


@dataclass(frozen=True, slots=True)
class CallLimits:
    """How long a call waits for the host application, and how large a frame it takes."""

    tool_timeout: float = TOOL_TIMEOUT_S
    context_deadline: float = CONTEXT_DEADLINE_S
    max_frame_bytes: int | None = None
    """Larger Twilio frames are counted and dropped unparsed (None: no limit but the WebSocket's)."""


class TwilioLink(Protocol):
    """The media stream's sending side. Its frames come in through :meth:`CallBridge.twilio_message` and
    :meth:`CallBridge.twilio_closed`; both directions are plain calls, so a frame is handled where it is read."""

    def send_text(self, text: str | bytes) -> None:
        """Queue one text frame; never blocks."""
        ...

    def close(self, code: int = 1000, reason: str = "") -> None: ...


class CallBridge:
    """Runs one call from the media stream's first frame to the close of both sockets.

    Start it with :meth:`start` when the media stream opens, feed it the stream's frames, and await :meth:`wait`
    (or do both with :meth:`run`).
    """

    def __init__(
        self,
        session_config: SessionConfig,
        realtime: RealtimeEndpoint,
        *,
        sink: TranscriptSink,
        tools: ToolRunner | None = None,
        hooks: CallHooks | None = None,
        limits: CallLimits | None = None,
        metrics: BridgeMetrics | None = None,
        logger: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self.session = CallSession(session_config)
        self._endpoint = realtime
        self._sink = sink
        self._tools: ToolRunner = tools or ToolRegistry()
        hooks = hooks or CallHooks()
        limits = limits or CallLimits()
        self._tool_timeout = limits.tool_timeout
        self._hang_up = hooks.hang_up
        self._transfer = hooks.transfer
        self._resolve_context = hooks.resolve_context
        self._context_deadline = limits.context_deadline
        self._events = hooks.events
        self._live = hooks.live
        self._phase: str | None = None  # as last published (call.updated); None until the call is on record
        self._fallback = hooks.fallback
        self._authorize: Authorize | None = hooks.authorize or _admit_as_signed
        self._on_admitted = hooks.on_admitted
        self._open_recording = hooks.record
        self._recorder: CallRecorder | None = None  # from the stream's start, while the call may be recorded
        self._recording: RecordingSink | None = None  # once the call is let in and its agent records
        self._metrics = metrics
        self._max_frame_bytes = limits.max_frame_bytes
        # The frame being timed through the bridge, per direction: (event, when it was read).
        self._timed_in: tuple[ev.Event, float] | None = None
        self._timed_out: tuple[ev.Event, float] | None = None
        self._log = logger or structlog.stdlib.get_logger("callbridge.call")
        self._pending: deque[ev.Event] = deque()  # events raised while another one is being handled
        self._handling = False
        self._bound = False
        self._records: asyncio.Queue[TranscriptLine | RecordEvent | None] = asyncio.Queue()
        self._realtime: ModelConnection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._twilio: TwilioLink | None = None
        self._writer: asyncio.Task[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._ending = False
        self._refusal: ControlRefused | None = None  # of the host application's command being handled
        self._last_action: asyncio.Task[None] | None = None
        # Two timers wake the session: one at its next deadline, one when held agent audio is due (set and cleared
        # every 40 ms of agent audio, so it is kept apart and costs one call_at and one cancel).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_at: float | None = None
        self._timers_version = -1

    def start(self, twilio: TwilioLink) -> None:
        """Begin the call on a media stream that has just opened (from the event loop, before its first frame)."""
        self._twilio = twilio
        self._finished = asyncio.get_running_loop().create_future()
        self._writer = asyncio.create_task(self._write_records())

    async def wait(self) -> CallSession:
        """Until the call has ended and everything it started is stopped; returns the finished session."""
        assert self._finished is not None and self._writer is not None, "start() first"
        try:
            await asyncio.shield(self._finished)
        finally:
            for timer in (self._timer, self._flush_timer):
                if timer is not None:
                    timer.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._close_realtime()
            await self._close_recording()
            self._records.put_nowait(None)
            await self._writer
        return self.session

    async def run(self, twilio: TwilioLink) -> CallSession:
        """:meth:`start` and :meth:`wait`."""
        self.start(twilio)
        return await self.wait()

    # ------------------------------------------------------------------------------------------------ input

    def twilio_message(self, payload: str | bytes | memoryview, binary: bool = False) -> None:
        """One message of the media stream (a memoryview need only be valid during the call)."""
        if binary:
            event: ev.Event = ev.TwilioInvalidMessage("binary frame")
        else:
            event = parse_twilio_message(payload, self._max_frame_bytes)
            if (
                self._metrics is not None
                and type(event) is ev.TwilioMedia
                # The 16th, 32nd, ... frame (the session counts it when it handles it, just below).
                and self.session.stats.frames_in % RELAY_SAMPLE_EVERY == RELAY_SAMPLE_EVERY - 1
                and self._timed_in is None
            ):
                self._timed_in = (event, time.perf_counter())
        self._dispatch(event)

    def twilio_closed(self) -> None:
        self._dispatch(ev.TwilioDisconnected())

    def request_hang_up(self, reason: str = "requested") -> None:
        """End the call from the application (hang up through Twilio); call it from the event loop."""
        self._dispatch(ev.HangupRequested(reason))

    def request_end(self, reason: str = "shutdown") -> None:
        """Let the call go with the fallback (apology or human), e.g. when a drain deadline has passed."""
        self._dispatch(ev.EndRequested(reason))

    def control(self, command: ev.HostEvent | ev.AmdVerdict) -> ControlRefused | None:
        """The host application's command to the call (say, instruct, transfer), from the event loop: carried out
        at once or queued in the call (``None``), or refused, with why (the call is not live, or ending)."""
        if self._finished is None or self._ending:
            return ControlRefused("ended", "the call has ended")
        self._refusal = None
        self._dispatch(command)  # handled before this returns: a task never runs inside another event's handling
        refusal, self._refusal = self._refusal, None
        return refusal

    def realtime_message(self, connection: ModelConnection, payload: bytes | memoryview) -> None:
        if connection is not self._realtime:
            return  # a connection already replaced or closed by us
        event = parse_server_event(payload, self._endpoint.dialect)
        if (
            self._metrics is not None
            and type(event) is ev.RealtimeAudioDelta
            and self.session.stats.deltas_out % RELAY_SAMPLE_EVERY == RELAY_SAMPLE_EVERY - 1
            and self._timed_out is None
        ):
            self._timed_out = (event, time.perf_counter())
        self._dispatch(event)

    def realtime_closed(self, connection: ModelConnection) -> None:
        if connection is self._realtime:  # closed by the other side, not by us
            self._realtime = None
            self._dispatch(ev.RealtimeClosed(connection.close_code, connection.close_reason))

    # ------------------------------------------------------------------------------------------------ handling

    def _dispatch(self, event: ev.Event) -> None:
        """Hand one event to the session and perform what it returns, right where the event arose.

        Performing never waits (sends are buffered; whatever must wait runs as a task that reports back with an
        event), so each event is handled whole before the next, in arrival order, with no lock and no queue. An
        event raised while another is handled waits in ``_pending`` for its turn.
        """
        if self._handling:
            self._pending.append(event)
            return
        self._handling = True
        try:
            while True:
                self._process(event)
                if not self._pending:
                    break
                event = self._pending.popleft()
        except Exception as exc:  # a bug: the call goes to the fallback rather than on in an unknown state
            self._pending.clear()
            self._fail(exc)
        finally:
            self._handling = False
        if self.session.timers_version != self._timers_version:  # most events change no deadline
            self._timers_version = self.session.timers_version
            self._set_timers()

    def _set_timers(self) -> None:
        """Keep the two timers at the session's deadlines."""
        session = self.session
        flush_at = session.flush_deadline()
        if flush_at != self._flush_at:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            self._flush_at = flush_at
            self._flush_timer = None if flush_at is None else asyncio.get_running_loop().call_at(flush_at, self._flush)
        deadline = session.control_deadline()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = None
            if deadline is not None:
                loop = asyncio.get_running_loop()
                # A deadline already past is due: at once would do, but 10 ms later rules out waking in a loop.
                self._timer = loop.call_at(max(deadline, loop.time() + 0.01), self._tick)

    def _tick(self) -> None:
        """The session's timer fired: it sees the time (the loop's clock is the monotonic clock it is given)."""
        self._timer = None
        self._timer_at = None
        self._dispatch(ev.Tick())

    def _flush(self) -> None:
        self._flush_timer = None
        self._flush_at = None
        self._dispatch(ev.Tick())

    def _process(self, event: ev.Event) -> None:
        now = time.monotonic()
        commands = self.session.handle(event, now)
        if not self._bound and self.session.stream_sid:
            self._bound = True  # every line of the call from here on names it
            self._log = self._log.bind(call_sid=self.session.call_sid, stream_sid=self.session.stream_sid)
            if self._open_recording is not None:
                self._recorder = CallRecorder(now)  # the recording's time zero: the stream's start
        recorder = self._recorder
        if recorder is not None and type(event) is ev.TwilioMedia:
            self._record_caller(recorder, event, now)
        for command in commands:
            # The commands for the two sockets first (the audio path's), before the match of _perform.
            if isinstance(command, _TWILIO_COMMANDS):
                assert self._twilio is not None and self.session.stream_sid is not None
                self._twilio.send_text(twilio_encode(command, self.session.stream_sid))
                if recorder is not None:
                    recorder.command(command, now)
            elif isinstance(command, _REALTIME_COMMANDS):
                if self._realtime is not None:
                    self._realtime.send_text(realtime_encode(command, self._endpoint.dialect))
            else:
                self._perform(command)
        if self._phase is not None and self.session.phase != self._phase:
            self._announce_phase()
        if self._timed_in is not None or self._timed_out is not None:  # one frame in 16 is being timed
            self._time_relay(event)

    def _record_caller(self, recorder: CallRecorder, event: ev.TwilioMedia, now: float) -> None:
        """A caller frame into the recording, and what can no longer change out to it every half second."""
        recorder.caller(event.payload, event.timestamp_ms, now)
        if now >= recorder.flush_at and self._recording is not None:
            self._recording.append(recorder.take(now))

    def _start_recording(self) -> None:
        """The call is let in: record it if the host application says where (what came before is kept)."""
        opener, self._open_recording = self._open_recording, None
        if opener is None or self._recorder is None or self._ending:
            return
        try:
            self._recording = opener(self.session)
        except Exception as exc:  # the call goes on unrecorded
            self._log.error("recording.open_failed", error=f"{type(exc).__name__}: {exc}")
        if self._recording is None:
            self._recorder = None

    async def _close_recording(self) -> None:
        recorder, self._recorder = self._recorder, None
        recording, self._recording = self._recording, None
        if recorder is None or recording is None:
            return
        try:
            recording.append(recorder.finish(time.monotonic()))
            await recording.close()
        except Exception as exc:
            self._log.error("recording.close_failed", error=f"{type(exc).__name__}: {exc}")

    def _fail(self, exc: BaseException) -> None:
        self._log.error("bridge.failed", error=f"{type(exc).__name__}: {exc}")
        self._error("internal")
        try:
            for command in self.session.handle(ev.EndRequested("internal_error"), time.monotonic()):
                self._perform(command)
        except Exception as again:
            self._log.error("bridge.end_failed", error=f"{type(again).__name__}: {again}")
        if not self._ending:  # nothing is ending the call: stop it here
            self._close_realtime()
            if self._twilio is not None:
                self._twilio.close(1011, "internal error")
            self._finish()

    def _time_relay(self, event: ev.Event) -> None:
        assert self._metrics is not None
        if self._timed_in is not None and self._timed_in[0] is event:
            self._metrics.relayed("caller_to_model", time.perf_counter() - self._timed_in[1])
            self._timed_in = None
        elif self._timed_out is not None and self._timed_out[0] is event:
            self._metrics.relayed("model_to_caller", time.perf_counter() - self._timed_out[1])
            self._timed_out = None

    def _finish(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    # ------------------------------------------------------------------------------------------------ commands

    def _perform(self, command: Command) -> None:
        """Every command but those for the two sockets, which :meth:`_process` sends itself."""
        match command:
            case OpenRealtime(delay_s, replace):
                if replace:
                    self._close_realtime()  # done with: its closing is not a loss
                self._spawn(self._open_realtime(delay_s))
            case RecordTranscript(line):
                self._records.put_nowait(line)
            case RecordEvent():
                self._records.put_nowait(command)
            case ResolveContext(context):
                self._spawn(self._resolve(context))
            case TransferCall(to):
                self._in_order(self._transfer_call(to))
            case RunTool(call_id, name, arguments):
                self._spawn(self._run_tool(call_id, name, arguments))
            case Log(event, level, fields):
                getattr(self._log, level)(event, **fields)
            case Measure(name, value):
                self._measure(name, value)
            case ControlRefused():
                self._refusal = command
            case ShowPartial(speaker, item_id, text):
                self._publish("transcript.partial", {"speaker": speaker, "item_id": item_id, "text": text})
            case EndCall():
                self._ending = True
                if self._recorder is not None:
                    self._recorder.end(time.monotonic())  # what is still queued for the caller is never heard
                self._close_realtime()
                self._in_order(self._end(command))

    def _measure(self, name: str, value: float) -> None:
        if self._metrics is not None:
            self._metrics.observe(name, value)
        if name == "turn_latency_s":
            self._publish("turn.metrics", {"turn_latency_s": value})

    def _publish(self, kind: str, data: dict[str, Any]) -> None:
        """A live event of the call, for whoever watches it (never waits)."""
        if self._live is not None and self.session.call_sid:
            self._live(self.session.call_sid, kind, data)

    async def _check(self, authorize: Authorize) -> CallContext | str | None:
        try:
            return await authorize(self.session)
        except Exception as exc:  # fail closed: a check that cannot run admits nobody
            self._log.error("call.authorize_failed", error=f"{type(exc).__name__}: {exc}")
            return "admission check failed"

    async def _end(self, command: EndCall) -> None:
        try:
            # The fallback when asked for and possible, else the hang-up when asked for: both act through REST.
            action = (self._fallback if command.fallback else None) or (self._hang_up if command.hang_up else None)
            if action is not None and self.session.call_sid:
                try:
                    await action(self.session.call_sid)
                except Exception as exc:
                    self._log.error("twilio.end_call_failed", fallback=action is self._fallback, error=str(exc))
                    self._error("twilio_rest")
            if self._twilio is not None:
                self._twilio.close(command.twilio_close_code, command.reason)
        finally:
            self._finish()

    def _close_realtime(self) -> None:
        connection, self._realtime = self._realtime, None
        if connection is not None:
            connection.close()

    def _error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind)

    # ------------------------------------------------------------------------------------------------ tasks

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _in_order(self, action: Coroutine[Any, Any, None]) -> None:
        """Run a REST action on the call after the ones asked for before it: a transfer is sent before the end."""
        previous = self._last_action

        async def after_previous() -> None:
            try:
                if previous is not None:
                    await asyncio.wait([previous])
            except asyncio.CancelledError:
                action.close()  # never started
                raise
            await action

        self._last_action = self._spawn(after_previous())

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task that dies of a bug ends the call with the fallback rather than leave it waiting forever."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("bridge.task_failed", error=f"{type(exc).__name__}: {exc}")
            self._error("internal")
            self._dispatch(ev.EndRequested("internal_error"))

    async def _open_realtime(self, delay_s: float) -> None:
        if self._authorize is not None:  # once, before the model hears anything
            authorize, self._authorize = self._authorize, None
            verdict = await self._check(authorize)
            if isinstance(verdict, str):
                self._dispatch(ev.CallRefused(verdict))
                return
            self._dispatch(ev.ContextLoaded(verdict))
            self._start_recording()
            if self._on_admitted is not None:
                self._spawn(self._admitted(self._on_admitted))
                self._on_admitted = None
        if self._ending:
            return
        await asyncio.sleep(delay_s)
        endpoint = self._endpoint
        connection = await connect(endpoint, self)
        if isinstance(connection, ev.RealtimeConnectFailed):
            self._dispatch(connection)
            self._error("realtime_connect")
            return
        if self._ending:
            connection.close()
            return
        self._close_realtime()  # a lost connection being replaced
        self._realtime = connection
        self._log.info("realtime.connected", url=endpoint.url, dialect=endpoint.dialect)
        self._dispatch(ev.RealtimeConnected())
        connection.adopted()

    async def _run_tool(self, call_id: str, name: str, arguments: str) -> None:
        session = self.session
        context = ToolContext(session.call_sid or "", session.context or CallContext(), session.agent.name)
        ok, output = await self._tools.run(name, arguments, context, self._tool_timeout)
        if not ok:
            self._log.warning("tool.failed", name=name, call_id=call_id, output=output)
            self._error("tool")
        self._dispatch(ev.ToolFinished(call_id, output, ok))

    async def _admitted(self, hook: Callable[[CallSession], Awaitable[None]]) -> None:
        try:
            await hook(self.session)
        except Exception as exc:  # bookkeeping never disturbs the call
            self._log.error("call.admitted_hook_failed", error=str(exc))
        self._announce_phase()  # from here on, after the call's call.started

    def _announce_phase(self) -> None:
        """The call's phase (connecting, live, ended) to whoever watches it, when it changes."""
        self._phase = self.session.phase
        self._publish("call.updated", {"phase": self._phase})

    async def _resolve(self, context: CallContext) -> None:
        """Ask the host application for context; past the deadline or on failure the agent's defaults hold."""
        resolved = None
        if self._resolve_context is not None:
            try:
                async with asyncio.timeout(self._context_deadline):
                    resolved = await self._resolve_context(context)
            except Exception as exc:  # the caller never waits in silence for a slow or broken resolver
                self._log.warning("context.resolve_failed", error=f"{type(exc).__name__}: {exc}")
        self._dispatch(ev.ContextResolved(resolved))

    async def _transfer_call(self, to: str) -> None:
        if self._transfer is None or not self.session.call_sid:
            self._log.error("call.transfer_unavailable", detail="no Twilio REST credentials configured")
            return
        try:
            await self._transfer(self.session.call_sid, to)
        except Exception as exc:
            self._log.error("call.transfer_failed", error=str(exc))
            self._error("twilio_rest")

    async def _write_records(self) -> None:
        """Deliver transcript lines and events in order, off the audio path: a slow store delays them, not audio."""
        while (record := await self._records.get()) is not None:
            try:
                if isinstance(record, RecordEvent):
                    if self._events is not None and self.session.call_sid:
                        await self._events(self.session.call_sid, record.kind, record.data)
                    continue
                await self._sink.write(record)
                self._log.info(  # after the write: a line logged is a line kept
                    "transcript.line", speaker=record.speaker, text=record.text, interrupted=record.interrupted
                )
            except Exception as exc:
                self._log.error("record.write_failed", error=str(exc))
                self._error("record_write")


async def _admit_as_signed(session: CallSession) -> None:
    """Without a check of its own, a call whose parameters verified is in, with the context they carried."""
