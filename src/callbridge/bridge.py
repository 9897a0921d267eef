"""The asyncio driver of one call: two sockets around a :class:`~callbridge.core.session.CallSession`.

It is deliberately small and dumb: readers turn frames into events; each event is handed to the session and the
commands it returns are performed, in order, one event at a time (under one lock: by the reader itself when
nothing else is in flight, else by the run loop from a queue). So a call's state has exactly one owner at a time,
and only the handling of an event sends. Everything a call starts (reader tasks, tool runs, the Realtime socket)
is cancelled or closed before :meth:`CallBridge.run` returns.

The Twilio side is any object with ``receive``/``send``/``close`` (:class:`TwilioTransport`), so the bridge runs
inside any asyncio application, not only callbridge's own ASGI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed  # imported once: ``websockets.X`` resolves lazily on each use

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
from callbridge.core.context import CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.core.transcript import TranscriptLine, TranscriptSink
from callbridge.realtime.dialect import Dialect, headers_for, to_beta
from callbridge.realtime.protocol import parse_server_event
from callbridge.telephony.media_streams import dumps, parse_twilio_message
from callbridge.tools import ToolContext, ToolRegistry

HangUp = Callable[[str], Awaitable[None]]
"""Ends a call through Twilio's REST API, by call SID."""
Transfer = Callable[[str, str], Awaitable[None]]
"""Redirects a live call (call SID) to a number with ``<Dial>``."""
ContextResolver = Callable[[CallContext], Awaitable[CallContext | None]]
"""Looks up a call's context in the host application (``None``: nothing to add)."""
EventSink = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""Keeps a call event: (call SID, kind, data)."""
Fallback = Callable[[str], Awaitable[None]]
"""Redirects a live call (call SID) to the fallback: an apology and hang-up, or a human."""
Authorize = Callable[[CallSession], Awaitable[str | None]]
"""Checks an admitted call before the model is opened: ``None`` lets it in, a string is why it is refused."""


class BridgeMetrics(Protocol):
    """Where the bridge reports measurements (:class:`callbridge.metrics.Metrics`)."""

    def observe(self, name: str, value: float) -> None: ...

    def relayed(self, direction: str, seconds: float) -> None: ...

    def error(self, kind: str) -> None: ...


RELAY_SAMPLE_EVERY = 16
"""One audio frame in this many has its time through the bridge measured."""


class TwilioTransport(Protocol):
    async def receive(self) -> str | bytes | None:
        """The next frame, or ``None`` once the socket is closed."""
        ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class RealtimeEndpoint:
    url: str
    model: str
    dialect: Dialect = "ga"
    api_key: str | None = None
    connect_timeout: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024

    @property
    def full_url(self) -> str:
        separator = "&" if "?" in self.url else "?"
        return f"{self.url}{separator}{urlencode({'model': self.model})}"


class CallBridge:
    """Runs one call from the media stream's first frame to the close of both sockets."""

    def __init__(
        self,
        session_config: SessionConfig,
        realtime: RealtimeEndpoint,
        *,
        sink: TranscriptSink,
        tools: ToolRegistry | None = None,
        tool_timeout: float = 10.0,
        hang_up: HangUp | None = None,
        transfer: Transfer | None = None,
        resolve_context: ContextResolver | None = None,
        context_deadline: float = 2.0,
        events: EventSink | None = None,
        fallback: Fallback | None = None,
        authorize: Authorize | None = None,
        on_admitted: Callable[[CallSession], Awaitable[None]] | None = None,
        metrics: BridgeMetrics | None = None,
        max_frame_bytes: int | None = None,
        logger: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self.session = CallSession(session_config)
        self._endpoint = realtime
        self._sink = sink
        self._tools = tools or ToolRegistry()
        self._tool_timeout = tool_timeout
        self._hang_up = hang_up
        self._transfer = transfer
        self._resolve_context = resolve_context
        self._context_deadline = context_deadline
        self._events = events
        self._fallback = fallback
        self._authorize = authorize
        self._on_admitted = on_admitted
        self._metrics = metrics
        self._max_frame_bytes = max_frame_bytes  # larger Twilio frames are counted and dropped unparsed
        # The frame being timed through the bridge, per direction: (event, when it was read).
        self._timed_in: tuple[ev.Event, float] | None = None
        self._timed_out: tuple[ev.Event, float] | None = None
        self._log = logger or structlog.stdlib.get_logger("callbridge.call")
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._turn = asyncio.Lock()  # held while one event is handled and its commands performed
        self._bound = False
        self._records: asyncio.Queue[TranscriptLine | RecordEvent | None] = asyncio.Queue()
        self._realtime: ClientConnection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._twilio: TwilioTransport | None = None

    async def run(self, twilio: TwilioTransport) -> CallSession:
        """Drive the call until it ends; returns the finished session (its stats and end reason)."""
        self._twilio = twilio
        self._spawn(self._read_twilio(twilio))
        writer = asyncio.create_task(self._write_records())
        try:
            while self.session.phase != "ended":
                event = await self._inbox.get()
                async with self._turn:
                    await self._process(event)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._close_realtime()
            self._records.put_nowait(None)
            await writer
        return self.session

    async def _deliver(self, event: ev.Event) -> None:
        """A reader's event: handled right here when nothing else is in flight (one task switch less per audio
        frame), else queued behind the others. Either way events are handled one at a time, in arrival order."""
        if self._turn.locked() or not self._inbox.empty():
            self._inbox.put_nowait(event)
            return
        async with self._turn:
            await self._process(event)
            if self.session.phase == "ended":
                self._inbox.put_nowait(ev.EndRequested("ended"))  # wakes run(), which waits for an event

    async def _process(self, event: ev.Event) -> None:
        """Hand one event to the session and perform what it returns (only ever while holding ``_turn``)."""
        commands = self.session.handle(event, time.monotonic())
        if not self._bound and self.session.stream_sid:
            self._bound = True  # every line of the call from here on names it
            self._log = self._log.bind(call_sid=self.session.call_sid, stream_sid=self.session.stream_sid)
        for command in commands:
            await self._perform(command)
        if self._metrics is not None:
            self._time_relay(event)

    def _time_relay(self, event: ev.Event) -> None:
        assert self._metrics is not None
        if self._timed_in is not None and self._timed_in[0] is event:
            self._metrics.relayed("caller_to_model", time.perf_counter() - self._timed_in[1])
            self._timed_in = None
        elif self._timed_out is not None and self._timed_out[0] is event:
            self._metrics.relayed("model_to_caller", time.perf_counter() - self._timed_out[1])
            self._timed_out = None

    def request_hang_up(self, reason: str = "requested") -> None:
        """End the call from the application (hang up through Twilio); call it from the event loop."""
        self._inbox.put_nowait(ev.HangupRequested(reason))

    def request_end(self, reason: str = "shutdown") -> None:
        """Let the call go with the fallback (apology or human), e.g. when a drain deadline has passed."""
        self._inbox.put_nowait(ev.EndRequested(reason))

    # ------------------------------------------------------------------------------------------------ commands

    async def _perform(self, command: Command) -> None:
        match command:
            case SendTwilio(message):
                assert self._twilio is not None
                with contextlib.suppress(Exception):  # a closed stream surfaces as a disconnect event
                    await self._twilio.send(dumps(message))
            case SendRealtime(event):
                await self._send_realtime(event)
            case OpenRealtime(delay_s):
                if self._authorize is not None:  # once, before the model hears anything
                    authorize, self._authorize = self._authorize, None
                    if (refusal := await self._check(authorize)) is not None:
                        self._inbox.put_nowait(ev.CallRefused(refusal))
                        return
                self._spawn(self._connect_realtime(delay_s))
                if self._on_admitted is not None:  # once: later OpenRealtime commands are retries
                    self._spawn(self._admitted(self._on_admitted))
                    self._on_admitted = None
            case RecordTranscript(line):
                self._records.put_nowait(line)
            case RecordEvent():
                self._records.put_nowait(command)
            case ResolveContext(context):
                self._spawn(self._resolve(context))
            case TransferCall(to):
                await self._transfer_call(to)
            case RunTool(call_id, name, arguments):
                self._spawn(self._run_tool(call_id, name, arguments))
            case Log(event, level, fields):
                getattr(self._log, level)(event, **fields)
            case Measure(name, value):
                if self._metrics is not None:
                    self._metrics.observe(name, value)
            case EndCall():
                await self._end(command)

    async def _send_realtime(self, event: dict[str, Any]) -> None:
        if self._realtime is None:
            return
        if self._endpoint.dialect == "beta":
            event = to_beta(event)
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await self._realtime.send(dumps(event))

    async def _check(self, authorize: Authorize) -> str | None:
        try:
            return await authorize(self.session)
        except Exception as exc:  # fail closed: a check that cannot run admits nobody
            self._log.error("call.authorize_failed", error=f"{type(exc).__name__}: {exc}")
            return "admission check failed"

    async def _end(self, command: EndCall) -> None:
        await self._close_realtime()
        # The fallback when asked for and possible, else the hang-up when asked for: both act through Twilio's REST.
        action = (self._fallback if command.fallback else None) or (self._hang_up if command.hang_up else None)
        if action is not None and self.session.call_sid:
            try:
                await action(self.session.call_sid)
            except Exception as exc:
                self._log.error("twilio.end_call_failed", fallback=action is self._fallback, error=str(exc))
                self._error("twilio_rest")
        assert self._twilio is not None
        with contextlib.suppress(Exception):
            await self._twilio.close(command.twilio_close_code, command.reason)

    async def _close_realtime(self) -> None:
        connection, self._realtime = self._realtime, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind)

    # ------------------------------------------------------------------------------------------------ tasks

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task that dies of a bug ends the call with the fallback: a call without its reader would hang."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("bridge.task_failed", error=f"{type(exc).__name__}: {exc}")
            self._error("internal")
            self._inbox.put_nowait(ev.EndRequested("internal_error"))

    async def _read_twilio(self, twilio: TwilioTransport) -> None:
        count = 0
        while True:
            try:
                raw = await twilio.receive()
            except Exception as exc:
                self._inbox.put_nowait(ev.TwilioDisconnected())
                self._log.warning("twilio.receive_failed", error=str(exc))
                return
            if raw is None:
                self._inbox.put_nowait(ev.TwilioDisconnected())
                return
            if isinstance(raw, bytes):
                self._inbox.put_nowait(ev.TwilioInvalidMessage("binary frame"))
                continue
            event = parse_twilio_message(raw, self._max_frame_bytes)
            if self._metrics is not None and type(event) is ev.TwilioMedia:
                count += 1
                if count % RELAY_SAMPLE_EVERY == 0 and self._timed_in is None:
                    self._timed_in = (event, time.perf_counter())
            await self._deliver(event)

    async def _connect_realtime(self, delay_s: float = 0.0) -> None:
        endpoint = self._endpoint
        await asyncio.sleep(delay_s)
        try:
            connection = await connect(
                endpoint.full_url,
                additional_headers=headers_for(endpoint.dialect, endpoint.api_key),
                open_timeout=endpoint.connect_timeout,
                # Ending a call waits for the model's close handshake at most this long (its answer may sit behind
                # unread audio when the reader itself is the one ending the call).
                close_timeout=2.0,
                max_size=endpoint.max_message_bytes,
                compression=None,
            )
        except Exception as exc:
            self._inbox.put_nowait(ev.RealtimeConnectFailed(f"{type(exc).__name__}: {exc}"))
            self._error("realtime_connect")
            return
        if self.session.phase == "ended":
            await connection.close()
            return
        await self._close_realtime()  # a lost connection being replaced
        self._realtime = connection
        self._log.info("realtime.connected", url=endpoint.url, dialect=endpoint.dialect)
        self._inbox.put_nowait(ev.RealtimeConnected())
        count = 0
        try:
            async for raw in connection:
                event = parse_server_event(raw, endpoint.dialect)
                if self._metrics is not None and type(event) is ev.RealtimeAudioDelta:
                    count += 1
                    if count % RELAY_SAMPLE_EVERY == 0 and self._timed_out is None:
                        self._timed_out = (event, time.perf_counter())
                await self._deliver(event)
        except ConnectionClosed:
            pass
        if self._realtime is connection:  # closed by the other side, not by us
            self._inbox.put_nowait(ev.RealtimeClosed(connection.close_code, connection.close_reason or ""))

    async def _run_tool(self, call_id: str, name: str, arguments: str) -> None:
        context = ToolContext(self.session.call_sid or "", self.session.context or CallContext())
        ok, output = await self._tools.run(name, arguments, context, self._tool_timeout)
        if not ok:
            self._log.warning("tool.failed", name=name, call_id=call_id, output=output)
            self._error("tool")
        self._inbox.put_nowait(ev.ToolFinished(call_id, output, ok))

    async def _admitted(self, hook: Callable[[CallSession], Awaitable[None]]) -> None:
        try:
            await hook(self.session)
        except Exception as exc:  # bookkeeping never disturbs the call
            self._log.error("call.admitted_hook_failed", error=str(exc))

    async def _resolve(self, context: CallContext) -> None:
        """Ask the host application for context; past the deadline or on failure the agent's defaults hold."""
        resolved = None
        if self._resolve_context is not None:
            try:
                async with asyncio.timeout(self._context_deadline):
                    resolved = await self._resolve_context(context)
            except Exception as exc:  # the caller never waits in silence for a slow or broken resolver
                self._log.warning("context.resolve_failed", error=f"{type(exc).__name__}: {exc}")
        self._inbox.put_nowait(ev.ContextResolved(resolved))

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
