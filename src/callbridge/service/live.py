"""Live events: what happens in calls as it happens, for the server-sent event routes and ``callbridge watch``.

Every event belongs to a call and has a type (:data:`EVENT_TYPES`) and an id ``<ms>-<seq>``; a call's events form a
stream of their own, and the call list (``call.started``, ``call.updated``, ``call.ended``) one more. A subscriber
that gives the id of the last event it saw receives what followed it, nothing twice.

:class:`LocalLiveEvents` keeps the streams in this process (the default: one process). :class:`RedisLiveEvents`
keeps them in Redis Streams (``XADD`` capped with ``MAXLEN ~``, expiring after the call, ``XREAD BLOCK`` for
subscribers, the entry id as the event's id), so a subscriber on any worker or host sees the calls of all.

Publishing never waits: an event goes into a bounded buffer that one task drains. When the buffer is full, transcript
partials are dropped first, completed lines last (they are in the database too); when Redis cannot be reached, the
events are lost, logged and counted, and the calls go on.
"""

from __future__ import annotations

import abc
import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple, Protocol

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from callbridge.config import LIVE_EVENT_TYPES

log = structlog.stdlib.get_logger("callbridge.live")

EVENT_TYPES = LIVE_EVENT_TYPES
LIST_TYPES = frozenset({"call.started", "call.updated", "call.ended"})
"""The call list's events: what ``GET /api/live`` streams."""
PARTIAL = "transcript.partial"
LINE = "transcript.line"

STREAM_MAXLEN = 10_000
"""Events a stream keeps (about: ``MAXLEN ~``)."""
BUFFER = 2_000
"""Events waiting to be published, at most; completed lines may go past it (up to ten times as many)."""
ENDED_TTL_S = 3600
"""A call's stream is kept this long after the call ended, for subscribers that reconnect late."""
OPEN_TTL_S = 86_400
"""A call's stream expires this long after its first event even if its end is never published."""
CLOCK_SKEW_MS = 2_000
"""An event id may be this far ahead of this host's clock (another host's) before it is refused as from the future."""

_ID = re.compile(r"^(\d{1,15})-(\d{1,15})$")


class LiveEvent(NamedTuple):
    """One event of a call, as subscribers receive it (the SSE ``id``, ``event`` and, with the call's SID, ``data``)."""

    id: str
    """``<ms>-<seq>``: the Redis stream entry id, or one of the same shape and order in process."""
    call_sid: str
    type: str
    """One of :data:`EVENT_TYPES`."""
    data: dict[str, Any]


class BadEventId(ValueError):
    """A ``Last-Event-ID`` that is not one this service gives, or one from the future."""


class LossCounter(Protocol):
    """Where lost events are counted (:class:`callbridge.observability.metrics.Metrics`)."""

    def live_event_lost(self, reason: str, kind: str) -> None: ...


def parse_event_id(value: str) -> tuple[int, int]:
    """``<ms>-<seq>`` as a pair of integers, or :class:`BadEventId`."""
    match = _ID.fullmatch(value)
    if match is None:
        raise BadEventId("Last-Event-ID must be an event id: <milliseconds>-<sequence>")
    return int(match[1]), int(match[2])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LiveEvents(abc.ABC):
    """The live bus: :meth:`publish` from the calls, :meth:`subscribe` from the routes."""

    def __init__(self, metrics: LossCounter | None = None, buffer: int = BUFFER) -> None:
        self._metrics = metrics
        self._buffer = buffer
        self._queue: deque[tuple[str, str, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def publish(self, call_sid: str, kind: str, data: dict[str, Any]) -> None:
        """Queue an event; never blocks, never raises for want of room (the event, or a less needed one, is lost)."""
        if len(self._queue) >= self._buffer and not self._make_room(kind):
            self._lost("dropped", [kind])
            return
        self._queue.append((call_sid, kind, data))
        self._wake.set()

    def _make_room(self, kind: str) -> bool:
        """Drop the oldest partial to make room for ``kind``; a completed line may overrun the buffer (up to 10x)."""
        for index, (_, queued, _) in enumerate(self._queue):
            if queued == PARTIAL:
                del self._queue[index]
                self._lost("dropped", [PARTIAL])
                return True
        return kind == LINE and len(self._queue) < self._buffer * 10

    def _lost(self, reason: str, kinds: Iterable[str]) -> None:
        for kind in kinds:
            if self._metrics is not None:
                self._metrics.live_event_lost(reason, kind)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._drain())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 200))]
                await self._deliver(batch)

    @abc.abstractmethod
    async def _deliver(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Append a batch to its streams; losses are counted here, nothing is raised."""

    @abc.abstractmethod
    async def _last_id(self, call_sid: str | None) -> tuple[int, int] | None:
        """The id of the newest event of a stream, if it has one."""

    @abc.abstractmethod
    def subscribe(self, call_sid: str | None, after: str | None) -> AsyncIterator[LiveEvent]:
        """A call's events (``None``: the call list's) after the id ``after``, then as they come, for ever. Without
        ``after``, a call's stream starts at its first event kept and the call list's at the next."""

    async def check_event_id(self, call_sid: str | None, value: str) -> str:
        """``value`` if it can be resumed from: of our shape and not past the newest event (nor this host's clock,
        for a stream that has none); :class:`BadEventId` otherwise."""
        key = parse_event_id(value)
        last = await self._last_id(call_sid)
        future = key > last if last is not None else key[0] > _now_ms() + CLOCK_SKEW_MS
        if future:
            raise BadEventId("Last-Event-ID is from the future: no such event has been sent")
        return value


class LocalLiveEvents(LiveEvents):
    """The streams in this process: the embedded default, one process."""

    def __init__(self, metrics: LossCounter | None = None, buffer: int = BUFFER, maxlen: int = STREAM_MAXLEN) -> None:
        super().__init__(metrics, buffer)
        self._maxlen = maxlen
        self._streams: dict[str | None, deque[LiveEvent]] = {}
        self._waiters: dict[str | None, set[asyncio.Future[None]]] = {}
        self._last = (0, 0)

    def _next_id(self) -> str:
        ms, seq = _now_ms(), 0
        if ms <= self._last[0]:
            ms, seq = self._last[0], self._last[1] + 1
        self._last = (ms, seq)
        return f"{ms}-{seq}"

    async def _deliver(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        for call_sid, kind, data in batch:
            event = LiveEvent(self._next_id(), call_sid, kind, data)
            self._append(call_sid, event)
            if kind in LIST_TYPES:
                self._append(None, event)
            if kind == "call.ended":
                asyncio.get_running_loop().call_later(ENDED_TTL_S, self._streams.pop, call_sid, None)

    def _append(self, key: str | None, event: LiveEvent) -> None:
        self._streams.setdefault(key, deque(maxlen=self._maxlen)).append(event)
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _last_id(self, call_sid: str | None) -> tuple[int, int] | None:
        stream = self._streams.get(call_sid)
        return parse_event_id(stream[-1].id) if stream else None

    async def subscribe(self, call_sid: str | None, after: str | None) -> AsyncIterator[LiveEvent]:
        if after is not None:
            last = parse_event_id(after)
        else:
            last = (0, 0) if call_sid is not None else (await self._last_id(None) or (0, 0))
        while True:
            stream = self._streams.get(call_sid, ())
            fresh = [event for event in stream if parse_event_id(event.id) > last]
            for event in fresh:
                last = parse_event_id(event.id)
                yield event
            if not fresh:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(call_sid, set()).add(waiter)
                await waiter


class RedisLiveEvents(LiveEvents):
    """The streams in Redis: a subscriber on any worker or host receives the events of every call."""

    def __init__(
        self,
        url: str,
        metrics: LossCounter | None = None,
        *,
        prefix: str = "callbridge:live",
        buffer: int = BUFFER,
        maxlen: int = STREAM_MAXLEN,
        block_ms: int = 10_000,
    ) -> None:
        super().__init__(metrics, buffer)
        self._prefix = prefix
        self._maxlen = maxlen
        self._block_ms = block_ms
        # Publishing gives up fast (the events are lost, the call goes on); subscribers block on XREAD.
        self._writer = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self._reader = aioredis.from_url(url, socket_connect_timeout=2, decode_responses=True)
        self._down = False

    def key(self, call_sid: str | None) -> str:
        return f"{self._prefix}:calls" if call_sid is None else f"{self._prefix}:call:{call_sid}"

    async def aclose(self) -> None:
        await super().aclose()
        await self._writer.aclose()
        await self._reader.aclose()

    async def _deliver(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        pipe = self._writer.pipeline(transaction=False)
        for call_sid, kind, data in batch:
            fields: dict[Any, Any] = {"call_sid": call_sid, "type": kind, "data": orjson.dumps(data)}
            key = self.key(call_sid)
            pipe.xadd(key, fields, maxlen=self._maxlen, approximate=True)
            if kind in LIST_TYPES:
                pipe.xadd(self.key(None), fields, maxlen=self._maxlen, approximate=True)
            if kind == "call.ended":
                pipe.expire(key, ENDED_TTL_S)
            else:
                pipe.expire(key, OPEN_TTL_S, nx=True)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self._lost("failed", [kind for _, kind, _ in batch])
            if not self._down:
                log.error("live.redis_unavailable", error=f"{type(exc).__name__}: {exc}", lost=len(batch))
            self._down = True
            await asyncio.sleep(0.5)  # what comes meanwhile waits in the buffer, partials dropped first
            return
        if self._down:
            log.warning("live.redis_back")
            self._down = False

    async def _last_id(self, call_sid: str | None) -> tuple[int, int] | None:
        try:
            newest: Any = await self._reader.xrevrange(self.key(call_sid), count=1)
        except (RedisError, OSError) as exc:  # the clock bounds the id instead; the stream waits for Redis
            log.warning("live.redis_unavailable", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
            return None
        return parse_event_id(newest[0][0]) if newest else None

    async def subscribe(self, call_sid: str | None, after: str | None) -> AsyncIterator[LiveEvent]:
        key = self.key(call_sid)
        last = after or ("0-0" if call_sid is not None else "$")
        while True:
            try:
                reply: Any = await self._reader.xread({key: last}, count=100, block=self._block_ms)
            except (RedisError, OSError) as exc:
                log.warning("live.subscribe_failed", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    yield LiveEvent(entry_id, fields["call_sid"], fields["type"], orjson.loads(fields["data"]))


def live_events(redis_url: str | None, metrics: LossCounter | None = None, prefix: str = "callbridge") -> LiveEvents:
    """The bus the settings ask for: Redis Streams with a URL, else in process."""
    if redis_url:
        return RedisLiveEvents(redis_url, metrics, prefix=f"{prefix}:live")
    return LocalLiveEvents(metrics)
