"""The store on SQLite and on PostgreSQL: migrations, call records, transcripts, events, orphans and the outbox.

PostgreSQL tests run in a schema of their own, dropped afterwards; point ``CALLBRIDGE_TEST_POSTGRES_URL`` at another
server, or leave it unreachable to skip them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from callbridge.core.transcript import Speaker, TranscriptLine, TranscriptSink
from callbridge.core.usage import TokenUsage
from callbridge.store import DatabaseTranscriptSink, Store, async_database_url
from callbridge.store.models import Base, CallRow, OutboxRow
from callbridge.store.repository import alembic_config

POSTGRES_URL = os.environ.get("CALLBRIDGE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "calls",
    "transcript_lines",
    "call_events",
    "webhook_outbox",
    "campaigns",
    "campaign_contacts",
    "campaign_attempts",
}
TABLES |= {"dnc_numbers", "leases"}


@dataclass
class Database:
    """An empty database of one kind; every store opened on it is closed after the test."""

    kind: str
    url: str
    options: dict[str, Any]
    stores: list[Store] = field(default_factory=list)

    async def open(self, *, migrate: bool = True) -> Store:
        store = await Store.open(self.url, migrate=migrate, **self.options)
        self.stores.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database("sqlite", f"sqlite:///{tmp_path / 'calls.db'}", {})
        yield db
        for store in db.stores:
            await store.close()
        return

    admin = create_async_engine(POSTGRES_URL)
    schema = f"callbridge_test_{uuid.uuid4().hex[:12]}"
    try:
        async with admin.begin() as connection:
            await connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except (OSError, sa.exc.DBAPIError) as exc:  # a missing database is a failure, never a silent skip
        await admin.dispose()
        raise RuntimeError(f"PostgreSQL is not reachable at {POSTGRES_URL} (.ci/run starts it): {exc}") from exc
    db = Database("postgresql", POSTGRES_URL, {"connect_args": {"server_settings": {"search_path": schema}}})
    try:
        yield db
    finally:
        for store in db.stores:
            await store.close()
        async with admin.begin() as connection:
            await connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture
async def store(database: Database) -> Store:
    return await database.open()


def sid(n: int) -> str:
    return f"CA{n:032x}"


async def set_created_at(store: Store, call_sid: str, at: datetime) -> None:
    """Calls are stamped when recorded; tests of time filters and ordering place them in time themselves."""
    async with store.engine.begin() as connection:
        await connection.execute(sa.update(CallRow).where(CallRow.call_sid == call_sid).values(created_at=at))


# ---------------------------------------------------------------------------------------------------- migrations


async def test_migrations_apply_from_zero_and_again(database: Database) -> None:
    store = await database.open(migrate=False)
    async with store.engine.connect() as connection:
        assert TABLES.isdisjoint(await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names()))

    await store.upgrade()
    await store.upgrade()  # at head already: nothing to do
    await database.open()  # so is opening with migrate=True

    async with store.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        version = (await connection.execute(sa.text("SELECT version_num FROM alembic_version"))).scalars().all()
        # The migrations build exactly what the models describe.
        diff = await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    assert set(tables) >= TABLES
    assert version == ["0005"]
    assert diff == []


async def test_usage_migration_keeps_the_calls_on_record(database: Database) -> None:
    """0003 adds ``calls.usage`` to a database already in use: the calls there keep their fields, with no usage."""
    store = await database.open(migrate=False)
    async with store.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "0002"))
        await connection.execute(
            sa.text(
                "INSERT INTO calls (call_sid, direction, agent, status, metrics, owner, created_at, updated_at)"
                " VALUES (:sid, 'inbound', 'default', 'completed', :metrics, 'host:1:0', :at, :at)"
            ),
            {"sid": sid(1), "metrics": '{"barge_ins": 1}', "at": T0},
        )
    await store.upgrade()
    record = await store.get_call(sid(1))
    assert record is not None and record.usage is None
    assert (record.status, record.metrics, record.owner) == ("completed", {"barge_ins": 1}, "host:1:0")


async def test_stores_opening_together_take_turns_to_migrate(database: Database) -> None:
    """Worker processes start at once, each migrating: one does the work, the others find the schema at head."""
    stores = await asyncio.gather(*(database.open() for _ in range(4)))
    await stores[0].record_call(call_sid=sid(1), direction="inbound")
    assert all([await store.get_call(sid(1)) is not None for store in stores])


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'calls.db'}")
    try:
        async with store.engine.connect() as connection:
            assert (await connection.execute(sa.text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await connection.execute(sa.text("PRAGMA foreign_keys"))).scalar_one() == 1
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------------- calls


async def test_record_update_and_get(store: Store) -> None:
    assert await store.get_call(sid(1)) is None
    assert await store.update_call(sid(1), status="ringing") is None

    record = await store.record_call(
        call_sid=sid(1),
        direction="outbound",
        from_number="+15550100001",
        to_number="+15550100002",
        agent="sales",
        context={"reference": "order-7", "items": [["system", "hi"]]},
    )
    assert (record.call_sid, record.direction, record.agent, record.status) == (sid(1), "outbound", "sales", "queued")
    assert record.context == {"reference": "order-7", "items": [["system", "hi"]]}
    assert record.created_at.tzinfo is UTC and record.created_at == record.updated_at
    assert (record.stream_sid, record.started_at, record.ended_at, record.metrics) == (None, None, None, None)
    assert await store.get_call(sid(1)) == record

    # Recording the same call again updates it; None keeps the numbers and the context on record.
    again = await store.record_call(call_sid=sid(1), direction="outbound", agent="support", status="in-progress")
    assert (again.agent, again.status, again.from_number, again.context) == (
        "support",
        "in-progress",
        "+15550100001",
        record.context,
    )
    assert again.created_at == record.created_at and again.updated_at > record.updated_at

    started = datetime.now(UTC)
    updated = await store.update_call(sid(1), stream_sid="MZ1", started_at=started, status="in-progress")
    assert updated is not None
    assert (updated.stream_sid, updated.started_at) == ("MZ1", started)
    assert updated.updated_at > again.updated_at

    ended = await store.update_call(
        sid(1), ended_at=started + timedelta(seconds=42), end_reason="caller_hung_up", metrics={"barge_ins": 2}
    )
    assert ended is not None and await store.get_call(sid(1)) == ended
    assert (ended.ended_at, ended.end_reason, ended.metrics) == (
        started + timedelta(seconds=42),
        "caller_hung_up",
        {"barge_ins": 2},
    )
    assert ended.usage is None

    usage = TokenUsage(input_text=120, input_audio=900, input_cached=64, output_text=40, output_audio=700, responses=3)
    with_usage = await store.update_call(sid(1), usage=usage.as_record())
    assert with_usage is not None and with_usage.usage == usage.as_record()
    assert await store.get_call(sid(1)) == with_usage
    assert (await store.list_calls()).calls[0].usage == usage.as_record()

    inbound = await store.record_call(call_sid=sid(2), direction="inbound")
    assert (inbound.agent, inbound.status, inbound.from_number, inbound.context) == ("default", "queued", None, None)


async def test_list_calls_filters_and_pages(store: Store) -> None:
    # 30 calls, a minute apart, except that calls 10 to 14 share one instant: pages must not split them wrongly.
    for n in range(30):
        await store.record_call(
            call_sid=sid(n),
            direction="inbound",
            from_number=f"+1555010{n % 3:04d}",
            to_number="+15550199999" if n % 5 == 0 else "+15550188888",
            status="completed" if n % 2 else "in-progress",
        )
        await set_created_at(store, sid(n), T0 + timedelta(minutes=10 if 10 <= n < 15 else n))

    async def every_page(limit: int, **filters: Any) -> list[str]:
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page = await store.list_calls(limit=limit, cursor=cursor, **filters)
            assert len(page.calls) <= limit
            seen.extend(call.call_sid for call in page.calls)
            if page.next_cursor is None:
                return seen
            cursor = page.next_cursor

    newest_first = [sid(n) for n in sorted(range(30), key=lambda n: (10 if 10 <= n < 15 else n, n), reverse=True)]
    first = await store.list_calls(limit=50)
    assert [call.call_sid for call in first.calls] == newest_first and first.next_cursor is None
    for limit in (1, 4, 7, 30):
        assert await every_page(limit) == newest_first  # no duplicates, no gaps, in order

    assert await every_page(4, status="completed") == [s for s in newest_first if int(s[2:], 16) % 2]
    assert await every_page(3, number="+15550100001") == [s for s in newest_first if int(s[2:], 16) % 3 == 1]
    assert await every_page(3, number="+15550199999") == [s for s in newest_first if int(s[2:], 16) % 5 == 0]
    in_window = await every_page(4, since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=20))
    assert in_window == [s for s in newest_first if 10 <= int(s[2:], 16) < 20]
    # The same instants in another zone, and naive (taken as UTC), bound the same window.
    since, until = (T0 + timedelta(minutes=10)).astimezone(timezone(timedelta(hours=2))), T0 + timedelta(minutes=20)
    assert await every_page(50, since=since, until=until.replace(tzinfo=None)) == in_window
    assert await every_page(2, status="in-progress", number="+15550199999", since=T0 + timedelta(minutes=5)) == [
        sid(n) for n in (20, 10)
    ]
    assert (await store.list_calls(status="busy")).calls == ()

    # A call recorded while a client pages shows up on a fresh listing, not in the middle of the pages.
    page = await store.list_calls(limit=10)
    await store.record_call(call_sid=sid(99), direction="inbound")
    rest = await store.list_calls(limit=50, cursor=page.next_cursor)
    assert [c.call_sid for c in page.calls + rest.calls] == newest_first

    with pytest.raises(ValueError, match="invalid cursor"):
        await store.list_calls(cursor="not-a-cursor")
    with pytest.raises(ValueError):
        await store.list_calls(limit=0)


async def test_close_orphaned_calls(store: Store) -> None:
    for n, status in enumerate(["queued", "ringing", "in-progress", "in-progress", "completed", "busy"]):
        await store.record_call(call_sid=sid(n), direction="inbound", status=status)
    await store.update_call(sid(3), ended_at=datetime.now(UTC), end_reason="caller_hung_up")  # ended, status lags
    await set_created_at(store, sid(2), T0)

    assert await store.close_orphaned_calls("process_died", lambda call: call.call_sid == sid(2)) == 1
    assert await store.close_orphaned_calls("process_died") == 2
    assert await store.close_orphaned_calls("process_died") == 0

    calls = {call.call_sid: call for call in (await store.list_calls()).calls}
    for n in (0, 1, 2):
        assert calls[sid(n)].status == "failed" and calls[sid(n)].end_reason == "process_died"
        assert calls[sid(n)].ended_at is not None
    assert (calls[sid(3)].status, calls[sid(3)].end_reason) == ("in-progress", "caller_hung_up")
    assert [calls[sid(n)].status for n in (4, 5)] == ["completed", "busy"]
    assert calls[sid(4)].ended_at is None


# ---------------------------------------------------------------------------------------------------- transcripts


def line(item_id: str, start_ms: int, speaker: Speaker = "caller", text: str = "hello") -> TranscriptLine:
    return TranscriptLine(sid(1), speaker, text, start_ms, start_ms + 900, item_id)


async def test_transcript_in_spoken_order_and_idempotent(store: Store) -> None:
    await store.record_call(call_sid=sid(1), direction="inbound")
    sink: TranscriptSink = DatabaseTranscriptSink(store)
    agent = replace(line("item_a", 0, "agent", "Hello, how can I help?"), end_ms=2000, interrupted=True)
    late_caller = line("item_c", 2500, text="I'd like to book a table")  # its transcription completes last
    failed = replace(line("item_d", 5000, text=""), failed=True)
    await sink.write(agent)
    await sink.write(line("item_b", 4000, "agent", "For how many?"))
    await sink.write(late_caller)
    await sink.write(failed)
    await sink.write(late_caller)  # delivered twice: kept once
    await sink.write(replace(late_caller, text="a different text"))  # same line again: the first one stays
    await sink.write(line("item_c", 2500, "agent", "same item, other side"))  # a different line

    assert await store.transcript(sid(1)) == [
        agent,
        late_caller,
        line("item_c", 2500, "agent", "same item, other side"),
        line("item_b", 4000, "agent", "For how many?"),
        failed,
    ]
    assert await store.transcript(sid(2)) == []


async def test_written_line_is_visible_to_another_store_at_once(database: Database) -> None:
    writer, reader = await database.open(), await database.open(migrate=False)
    await writer.record_call(call_sid=sid(1), direction="inbound")
    await writer.add_transcript_line(line("item_a", 0))
    assert await reader.transcript(sid(1)) == [line("item_a", 0)]


async def test_lines_and_events_need_a_call_on_record(store: Store) -> None:
    with pytest.raises(IntegrityError):
        await store.add_transcript_line(line("item_a", 0))
    with pytest.raises(IntegrityError):
        await store.add_event(sid(1), "error", {})


# ---------------------------------------------------------------------------------------------------- events


async def test_events_in_recorded_order(store: Store) -> None:
    await store.record_call(call_sid=sid(1), direction="inbound")
    await store.add_event(sid(1), "status", {"status": "in-progress"})
    await store.add_event(sid(1), "tool_call", {"name": "book", "arguments": '{"n": 2}', "ok": True})
    await store.add_event(sid(1), "barge_in", {})

    events = await store.events(sid(1))
    assert [(event.kind, event.data) for event in events] == [
        ("status", {"status": "in-progress"}),
        ("tool_call", {"name": "book", "arguments": '{"n": 2}', "ok": True}),
        ("barge_in", {}),
    ]
    assert all(event.call_sid == sid(1) and event.created_at.tzinfo is UTC for event in events)
    assert events[0].id < events[1].id < events[2].id
    assert await store.events(sid(2)) == []


# ---------------------------------------------------------------------------------------------------- outbox


async def test_outbox_lifecycle(store: Store) -> None:
    now = datetime.now(UTC)
    first = await store.enqueue_webhook("https://example.com/hook", {"event": "call.ended", "call": {"n": 1}}, "msg_1")
    second = await store.enqueue_webhook("https://example.com/hook", {"event": "call.ended", "call": {"n": 2}}, "msg_2")
    assert await store.due_webhooks(now - timedelta(minutes=1)) == []  # not due yet

    claimed = await store.due_webhooks(now + timedelta(seconds=1), lease=timedelta(minutes=5))
    assert [entry.id for entry in claimed] == [first, second]
    assert claimed[0].payload == {"event": "call.ended", "call": {"n": 1}}
    assert claimed[0].attempts == 0 and claimed[0].delivered_at is None and claimed[0].last_error is None
    assert (claimed[0].webhook_id, claimed[0].status) == ("msg_1", "pending")
    assert await store.due_webhooks(now + timedelta(seconds=2)) == []  # claimed: others pass them by

    await store.mark_delivered(first)
    retry_at = now + timedelta(minutes=1)
    await store.mark_failed(second, "ConnectError: refused", retry_at)
    assert await store.due_webhooks(retry_at - timedelta(seconds=1)) == []
    [retry] = await store.due_webhooks(retry_at)
    assert (retry.id, retry.attempts, retry.last_error) == (second, 1, "ConnectError: refused")
    assert retry.webhook_id == "msg_2"  # every attempt of a delivery carries its id

    # A claim that is never finished (the process died) falls due again when its lease runs out.
    [again] = await store.due_webhooks(retry_at + timedelta(minutes=6))
    assert again.id == second
    await store.mark_failed(second, "HTTPStatusError: 500", retry_at + timedelta(minutes=7), 500)
    await store.mark_delivered(second, 204)
    assert await store.due_webhooks(now + timedelta(days=1)) == []
    delivered = await store.get_webhook(second)
    assert delivered is not None and (delivered.status, delivered.attempts, delivered.last_status) == (
        "delivered",
        2,
        204,
    )


async def test_outbox_dead_deliveries_are_listed_and_retried(store: Store) -> None:
    ids = [await store.enqueue_webhook("https://example.com/hook", {"n": n}, f"msg_{n}") for n in range(5)]
    now = datetime.now(UTC) + timedelta(seconds=1)
    await store.due_webhooks(now)
    await store.mark_failed(ids[1], "HTTPStatusError: 503", None, 503)  # no next attempt: dead
    await store.mark_failed(ids[3], "ConnectError: refused", None)
    await store.mark_delivered(ids[4], 200)
    later = await store.due_webhooks(now + timedelta(days=2))  # dead ones are never due
    assert [entry.id for entry in later] == [ids[0], ids[2]]

    dead = await store.list_webhooks(status="dead")
    assert [(entry.id, entry.status, entry.last_status) for entry in dead.entries] == [
        (ids[3], "dead", None),
        (ids[1], "dead", 503),
    ]
    assert all(entry.dead_at is not None and entry.attempts == 1 for entry in dead.entries)
    # Newest first, a page at a time.
    first = await store.list_webhooks(limit=2)
    assert [entry.id for entry in first.entries] == [ids[4], ids[3]] and first.next_cursor is not None
    rest = await store.list_webhooks(limit=3, cursor=first.next_cursor)
    assert [entry.id for entry in rest.entries] == ids[2::-1] and rest.next_cursor is None
    assert [entry.id for entry in (await store.list_webhooks(status="pending")).entries] == [ids[2], ids[0]]
    with pytest.raises(ValueError, match="cursor"):
        await store.list_webhooks(cursor="nope")

    retried = await store.retry_webhook(ids[1], now, reset_attempts=True)
    assert retried is not None and (retried.status, retried.attempts, retried.dead_at) == ("pending", 0, None)
    [due] = await store.due_webhooks(now)
    assert (due.id, due.webhook_id) == (ids[1], "msg_1")
    delivered = await store.retry_webhook(ids[4], now, reset_attempts=True)
    assert delivered is not None and delivered.status == "delivered"  # left as it was
    assert await store.retry_webhook(10_000, now, reset_attempts=True) is None


async def test_outbox_migration_keeps_the_entries_in_the_outbox(database: Database) -> None:
    """0004 adds ids and statuses to an outbox already in use: each entry gets an id of its own and its status."""
    store = await database.open(migrate=False)
    async with store.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "0003"))
        for delivered in (None, T0):
            await connection.execute(
                sa.text(
                    "INSERT INTO webhook_outbox (url, payload, attempts, next_attempt_at, delivered_at, created_at)"
                    " VALUES ('https://example.com/hook', '{}', 1, :at, :delivered, :at)"
                ),
                {"at": T0, "delivered": delivered},
            )
    await store.upgrade()
    entries = (await store.list_webhooks()).entries
    assert [(entry.status, entry.attempts) for entry in entries] == [("delivered", 1), ("pending", 1)]
    assert len({entry.webhook_id for entry in entries}) == 2
    [due] = await store.due_webhooks(datetime.now(UTC))
    assert due.status == "pending"


async def test_outbox_claims_do_not_overlap(database: Database) -> None:
    one, other = await database.open(), await database.open(migrate=False)
    ids = [await one.enqueue_webhook("https://example.com/hook", {"n": n}, f"msg_{n}") for n in range(6)]
    now = datetime.now(UTC) + timedelta(seconds=1)

    first = await one.due_webhooks(now, limit=2)
    second = await other.due_webhooks(now, limit=2)
    assert [entry.id for entry in first + second] == ids[:4]

    if database.kind == "postgresql":
        # While another process holds entries it is claiming, a claim passes them by rather than wait for them.
        async with other.engine.connect() as connection, connection.begin():
            await connection.execute(sa.select(OutboxRow.id).where(OutboxRow.id == ids[4]).with_for_update())
            claimed = await asyncio.wait_for(one.due_webhooks(now), timeout=5)
        assert [entry.id for entry in claimed] == ids[5:]


# ---------------------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p%40ss@db:5432/calls", "postgresql+asyncpg://u:p%40ss@db:5432/calls"),
        ("postgres://u@db/calls?ssl=require", "postgresql+asyncpg://u@db/calls?ssl=require"),
        ("postgresql+asyncpg://u@db/calls", "postgresql+asyncpg://u@db/calls"),
        ("postgresql+psycopg://u@db/calls", "postgresql+psycopg://u@db/calls"),
        ("sqlite:///callbridge.db", "sqlite+aiosqlite:///callbridge.db"),
        ("sqlite:////var/lib/callbridge/calls.db", "sqlite+aiosqlite:////var/lib/callbridge/calls.db"),
        ("sqlite+aiosqlite:///callbridge.db", "sqlite+aiosqlite:///callbridge.db"),
    ],
)
def test_async_database_url(url: str, expected: str) -> None:
    assert async_database_url(url) == expected
