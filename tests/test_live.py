"""The live bus, in process and in Redis: order, resuming after an id exactly once, the bounded buffer, Redis down."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.config import Settings
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.service.agents import load_agents
from callbridge.service.calls import CallServices
from callbridge.service.live import (
    BadEventId,
    LiveEvent,
    LiveEvents,
    LocalLiveEvents,
    RedisLiveEvents,
    parse_event_id,
)
from callbridge.service.tools import ToolRegistry
from callbridge.store.repository import Store
from callbridge.telephony.params import StreamParameterSigner
from support import wait_until

REDIS_URL = "redis://127.0.0.1:6379/5"


class Losses:
    def __init__(self) -> None:
        self.counted: list[tuple[str, str]] = []

    def live_event_lost(self, reason: str, kind: str) -> None:
        self.counted.append((reason, kind))


async def _redis_up() -> bool:
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except OSError:
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["local", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[LiveEvents]:
    if request.param == "redis":
        assert await _redis_up(), "no Redis at 127.0.0.1:6379 (.ci/run starts it)"
        live: LiveEvents = RedisLiveEvents(REDIS_URL, prefix=f"test-{secrets.token_hex(6)}", block_ms=200)
    else:
        live = LocalLiveEvents()
    await live.start()
    try:
        yield live
    finally:
        await live.aclose()


async def take(bus: LiveEvents, call_sid: str | None, after: str | None, count: int) -> list[LiveEvent]:
    events: list[LiveEvent] = []
    async with asyncio.timeout(5):
        async for event in bus.subscribe(call_sid, after):
            events.append(event)
            if len(events) == count:
                break
    return events


def texts(events: list[LiveEvent]) -> list[Any]:
    return [event.data.get("text") for event in events]


async def test_a_call_s_events_in_order_then_resumed_after_an_id_exactly_once(bus: LiveEvents) -> None:
    for n in range(5):
        bus.publish("CA1", "transcript.line", {"text": f"line {n}"})
    bus.publish("CA2", "transcript.line", {"text": "another call"})
    first = await take(bus, "CA1", None, 5)
    assert texts(first) == [f"line {n}" for n in range(5)]
    ids = [parse_event_id(event.id) for event in first]
    assert ids == sorted(ids) and len(set(ids)) == 5
    resumed = await take(bus, "CA1", first[2].id, 2)
    assert texts(resumed) == ["line 3", "line 4"]
    later = asyncio.create_task(take(bus, "CA1", first[-1].id, 1))
    await asyncio.sleep(0.05)
    bus.publish("CA1", "transcript.line", {"text": "after"})
    assert texts(await later) == ["after"]


async def test_the_call_list_has_the_calls_lifecycle_only(bus: LiveEvents) -> None:
    listing = asyncio.create_task(take(bus, None, None, 2))
    await asyncio.sleep(0.3)  # the subscriber starts at the next event
    bus.publish("CA1", "call.started", {"status": "in-progress"})
    bus.publish("CA1", "transcript.line", {"text": "not listed"})
    bus.publish("CA1", "call.ended", {"end_reason": "hangup"})
    events = await listing
    assert [(event.call_sid, event.type) for event in events] == [("CA1", "call.started"), ("CA1", "call.ended")]


async def test_a_last_event_id_that_is_garbage_or_from_the_future_is_refused(bus: LiveEvents) -> None:
    bus.publish("CA1", "transcript.line", {"text": "one"})
    (event,) = await take(bus, "CA1", None, 1)
    assert await bus.check_event_id("CA1", event.id) == event.id
    for garbage in ["", "abc", "1-2-3", "-1-0", "12", "1-", "9" * 40 + "-0", "1-0\n"]:
        with pytest.raises(BadEventId, match="event id"):
            await bus.check_event_id("CA1", garbage)
    ms, seq = parse_event_id(event.id)
    with pytest.raises(BadEventId, match="future"):
        await bus.check_event_id("CA1", f"{ms}-{seq + 1}")
    with pytest.raises(BadEventId, match="future"):
        await bus.check_event_id("CA9", f"{ms + 3_600_000}-0")  # no events yet: the clock is the bound


async def test_a_full_buffer_drops_partials_first_and_lines_never() -> None:
    losses = Losses()
    bus = LocalLiveEvents(losses, buffer=4)  # not started: nothing drains
    for n in range(3):
        bus.publish("CA1", "transcript.partial", {"text": f"partial {n}"})
    bus.publish("CA1", "call.event", {"kind": "dtmf"})
    for n in range(3):
        bus.publish("CA1", "transcript.line", {"text": f"line {n}"})
    bus.publish("CA1", "transcript.partial", {"text": "no room"})
    bus.publish("CA1", "call.event", {"kind": "no room"})
    assert losses.counted == [("dropped", "transcript.partial")] * 4 + [("dropped", "call.event")]
    await bus.start()
    events = await take(bus, "CA1", None, 4)
    await bus.aclose()
    assert [event.type for event in events] == ["call.event"] + ["transcript.line"] * 3


async def test_redis_down_publishing_neither_raises_nor_waits_and_losses_are_counted() -> None:
    losses = Losses()
    bus = RedisLiveEvents("redis://127.0.0.1:1/5", losses)  # nothing listens there
    await bus.start()
    try:
        bus.publish("CA1", "transcript.line", {"text": "lost"})
        bus.publish("CA1", "call.ended", {"end_reason": "hangup"})
        await wait_until(lambda: len(losses.counted) >= 2, 5)
        assert losses.counted == [("failed", "transcript.line"), ("failed", "call.ended")]
        # A client resuming meanwhile: its id is checked against the clock, and it waits for Redis.
        recent = f"{time.time_ns() // 1_000_000 - 1000}-0"
        assert await bus.check_event_id("CA1", recent) == recent
        with pytest.raises(BadEventId, match="future"):
            await bus.check_event_id("CA1", f"{time.time_ns() // 1_000_000 + 3_600_000}-0")
    finally:
        await bus.aclose()


async def ttl_when(client: aioredis.Redis, key: str, wanted: Callable[[int], bool]) -> int:
    """The key's time to live once it is ``wanted`` (the bus sets it from its own task)."""
    for _ in range(100):
        ttl: int = await client.ttl(key)
        if wanted(ttl):
            return ttl
        await asyncio.sleep(0.05)
    raise AssertionError(f"the time to live of {key} stayed {ttl}")


async def test_redis_streams_are_capped_and_expire_after_the_call() -> None:
    assert await _redis_up(), "no Redis at 127.0.0.1:6379 (.ci/run starts it)"
    prefix = f"test-{secrets.token_hex(6)}"
    bus = RedisLiveEvents(REDIS_URL, prefix=prefix, maxlen=10)
    await bus.start()
    client = aioredis.from_url(REDIS_URL)
    try:
        for n in range(300):
            bus.publish("CA1", "transcript.partial", {"text": str(n)})
        (last,) = await take(bus, "CA1", None, 1)  # waits for the first entry kept, then for the rest below
        assert 3600 < await ttl_when(client, bus.key("CA1"), lambda ttl: ttl > 0) <= 86_400
        bus.publish("CA1", "call.ended", {"end_reason": "hangup"})
        assert await ttl_when(client, bus.key("CA1"), lambda ttl: ttl <= 3600) > 0
        assert await client.xlen(bus.key("CA1")) < 300
        assert last.id
    finally:
        await client.delete(bus.key("CA1"), bus.key(None))
        await client.aclose()
        await bus.aclose()


async def test_the_services_publish_a_call_s_life_and_its_events(tmp_path: Path) -> None:
    settings = Settings(secret="s" * 32, database_url=f"sqlite:///{tmp_path / 'calls.db'}", _env_file=None)
    store = await Store.open(settings.database_url)
    bus = LocalLiveEvents()
    await bus.start()
    agents = load_agents(settings, ToolRegistry(), None)
    services = CallServices(settings, store, StreamParameterSigner("s" * 32, 600), agents, None, bus)
    call_sid = "CA" + "6" * 32
    try:
        await services.call_started(call_sid, "MZ" + "4" * 32, CallContext(caller="+15550100001", agent="default"))
        await services.record_event(call_sid, "dtmf", {"digit": "5"})
        await services.stream_status({"CallSid": call_sid, "StreamEvent": "stream-error", "StreamError": "31920 x"})
        await services.status_callback({"CallSid": call_sid, "CallStatus": "completed"})
        session = CallSession(SessionConfig(agent=AgentConfig(), verify_parameters=lambda _, __: CallContext()))
        session.call_sid, session.end_reason = call_sid, "caller_hung_up"
        await services.call_ended(session)
        events = await take(bus, call_sid, None, 5)
        listed = await take(bus, None, "0-0", 3)
    finally:
        await services.aclose()
        await bus.aclose()
        await store.close()
    assert [(event.type, event.data.get("kind")) for event in events] == [
        ("call.started", None),
        ("call.event", "dtmf"),
        ("call.event", "stream_error"),
        ("call.updated", None),
        ("call.ended", None),
    ]
    assert events[0].data["from"] == "+15550100001" and events[1].data["data"] == {"digit": "5"}
    assert events[2].data["data"]["code"] == 31920 and events[3].data == {"status": "completed"}
    assert events[4].data == {"status": "completed", "end_reason": "caller_hung_up"}
    assert [event.type for event in listed] == ["call.started", "call.updated", "call.ended"]
