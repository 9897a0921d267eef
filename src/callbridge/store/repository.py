"""The store: calls on record, their transcripts and events, and the outbox of webhooks to deliver.

One ``Store`` serves a process, on one async engine (SQLite through aiosqlite, PostgreSQL through asyncpg). Every
method is its own short transaction, committed before it returns, and hands back plain frozen dataclasses: ORM
objects never leave this module.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, and_, event, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from callbridge.core.transcript import Speaker, TranscriptLine
from callbridge.store.models import FINAL_STATUSES, Base, CallRow, EventRow, OutboxRow, TranscriptRow, utcnow

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MIGRATIONS = Path(__file__).with_name("migrations")

_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
# The two dialects of INSERT ... ON CONFLICT, alike in all the store uses.
_INSERTS: dict[str, Callable[[Any], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}
_MIGRATION_LOCK = 0x63616C6C  # a PostgreSQL advisory lock key: "call"


def async_database_url(url: str) -> str:
    """``url`` with an asyncio driver: ``postgresql://`` (or ``postgres://``) → asyncpg, ``sqlite://`` → aiosqlite.

    URLs that name a driver already are returned unchanged.
    """
    scheme, separator, rest = url.partition("://")
    return _ASYNC_DRIVERS.get(scheme, scheme) + separator + rest


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for the store's migrations, run on ``connection``; no ``alembic.ini`` is involved."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class CallRecord:
    call_sid: str
    stream_sid: str | None
    direction: str
    from_number: str | None
    to_number: str | None
    agent: str
    status: str
    context: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    metrics: dict[str, Any] | None
    usage: dict[str, int] | None
    """Tokens the model billed for the call (``TokenUsage.as_record()``), once it has ended."""
    owner: str | None
    """The process that carries (or carried) the call's media stream: ``host:pid:start time``."""
    answered_by: str | None
    """Twilio's answering-machine verdict, when detection ran: ``human``, ``machine_end_beep``, ``fax``…"""
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CallPage:
    calls: tuple[CallRecord, ...]
    next_cursor: str | None
    """Pass it back as ``cursor`` for the next page; ``None`` on the last page."""


@dataclass(frozen=True, slots=True)
class CallEvent:
    id: int
    call_sid: str
    kind: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    webhook_id: str
    """The Standard Webhooks ``webhook-id`` of every attempt of this delivery."""
    url: str
    payload: dict[str, Any]
    status: str
    """``pending``, ``delivered`` or ``dead`` (its attempts ran out)."""
    attempts: int
    """Failed attempts so far."""
    next_attempt_at: datetime
    delivered_at: datetime | None
    dead_at: datetime | None
    last_error: str | None
    last_status: int | None
    """The receiver's HTTP status at the last attempt (None: it did not answer)."""
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxPage:
    entries: tuple[OutboxEntry, ...]
    next_cursor: str | None
    """Pass it back as ``cursor`` for the next page; ``None`` on the last page."""


class CallChanges(TypedDict, total=False):
    """The fields ``Store.update_call`` may change."""

    stream_sid: str | None
    direction: str
    from_number: str | None
    to_number: str | None
    agent: str
    status: str
    context: dict[str, Any] | None
    started_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    metrics: dict[str, Any] | None
    usage: dict[str, int] | None
    owner: str | None
    answered_by: str | None


# ---------------------------------------------------------------------------------------------------- the store


class Store:
    """Calls on record; see the module docstring. Open with ``await Store.open(url)``, end with ``close()``."""

    def __init__(self, engine: AsyncEngine) -> None:
        if engine.dialect.name not in _INSERTS:
            raise ValueError(f"callbridge keeps its records in SQLite or PostgreSQL, not {engine.dialect.name}")
        self.engine = engine
        self._insert = _INSERTS[engine.dialect.name]
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, **engine_options: Any) -> Store:
        """Connect to ``url`` (see ``async_database_url``) and, unless told otherwise, migrate the schema to head.

        ``engine_options`` go to ``create_async_engine`` (pool sizes, ``connect_args``, ...).
        """
        engine = create_async_engine(async_database_url(url), **{"pool_pre_ping": True, **engine_options})
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        try:
            store = cls(engine)
            if migrate:
                await store.upgrade()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def upgrade(self) -> None:
        """Apply every migration not yet applied (Alembic's ``upgrade head``), in one transaction.

        Workers that start together take turns under a database lock: the first migrates, the others then find the
        schema at head. On SQLite, taking the write lock up front also makes the DDL transactional: left to itself,
        the driver would commit each CREATE on its own.
        """
        async with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            else:
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))

    # ------------------------------------------------------------------------------------------------ calls

    async def record_call(
        self,
        *,
        call_sid: str,
        direction: str,
        from_number: str | None = None,
        to_number: str | None = None,
        agent: str = "default",
        status: str = "queued",
        context: dict[str, Any] | None = None,
    ) -> CallRecord:
        """Put the call on record, or update the record Twilio's ``call_sid`` already has.

        On update the given values replace the stored ones, except that ``None`` for a number or the context keeps
        what is stored.
        """
        now = utcnow()
        new_call = self._insert(CallRow).values(
            call_sid=call_sid,
            direction=direction,
            from_number=from_number,
            to_number=to_number,
            agent=agent,
            status=status,
            context=context,
            created_at=now,
            updated_at=now,
        )
        new = new_call.excluded
        upsert = new_call.on_conflict_do_update(
            index_elements=[CallRow.call_sid],
            set_={
                "direction": new.direction,
                "agent": new.agent,
                "status": new.status,
                "from_number": func.coalesce(new.from_number, CallRow.from_number),
                "to_number": func.coalesce(new.to_number, CallRow.to_number),
                "context": func.coalesce(new.context, CallRow.context),
                "updated_at": new.updated_at,
            },
        )
        async with self._sessions.begin() as session:
            row = (await session.scalars(upsert.returning(CallRow))).one()
            return _plain(CallRecord, row)

    async def update_call(self, call_sid: str, **changes: Unpack[CallChanges]) -> CallRecord | None:
        """Change fields of a call on record; ``None`` when there is no such call."""
        statement = update(CallRow).where(CallRow.call_sid == call_sid).values(**changes).returning(CallRow)
        async with self._sessions.begin() as session:
            row = (await session.scalars(statement)).one_or_none()
            return None if row is None else _plain(CallRecord, row)

    async def get_call(self, call_sid: str) -> CallRecord | None:
        async with self._sessions() as session:
            row = (await session.scalars(select(CallRow).where(CallRow.call_sid == call_sid))).one_or_none()
            return None if row is None else _plain(CallRecord, row)

    async def list_calls(
        self,
        *,
        status: str | None = None,
        number: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> CallPage:
        """Calls, newest first, a page at a time.

        ``number`` matches either end of the call; ``since`` (inclusive) and ``until`` (exclusive) bound when the call
        was put on record. Pages are cut by position (created_at, id), not by offset, so calls recorded while a client
        pages neither repeat nor shift rows between pages. Raises ``ValueError`` for a cursor this store did not make.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = select(CallRow).order_by(CallRow.created_at.desc(), CallRow.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(CallRow.status == status)
        if number is not None:
            query = query.where(or_(CallRow.from_number == number, CallRow.to_number == number))
        if since is not None:
            query = query.where(CallRow.created_at >= since)
        if until is not None:
            query = query.where(CallRow.created_at < until)
        if cursor is not None:
            created_at, id_ = _decode_cursor(cursor)
            query = query.where(
                or_(CallRow.created_at < created_at, and_(CallRow.created_at == created_at, CallRow.id < id_))
            )
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
        return CallPage(calls=tuple(_plain(CallRecord, row) for row in page), next_cursor=next_cursor)

    async def close_orphaned_calls(self, reason: str, is_orphan: Callable[[CallRecord], bool] | None = None) -> int:
        """Close the records of calls a dead process left open; returns how many.

        An open call has no ``ended_at`` and a status that is not final; ``is_orphan`` tells which of them were
        lost (all of them when not given: at the start of the only process, every open call is an orphan). An orphan
        gets ``ended_at`` now, ``end_reason`` = ``reason`` and status ``failed``: callbridge lost the call, and
        ``completed`` would hide that among the calls that ended well. Should Twilio's status callback still
        arrive, it sets the true status (the end is kept).
        """
        still_open = (CallRow.ended_at.is_(None), CallRow.status.not_in(FINAL_STATUSES))
        async with self._sessions.begin() as session:
            rows = (await session.scalars(select(CallRow).where(*still_open))).all()
            orphans = [row.id for row in rows if is_orphan is None or is_orphan(_plain(CallRecord, row))]
            if orphans:
                await session.execute(
                    update(CallRow)
                    .where(CallRow.id.in_(orphans), *still_open)
                    .values(status="failed", ended_at=utcnow(), end_reason=reason)
                )
        return len(orphans)

    # ------------------------------------------------------------------------------------ transcripts and events

    async def add_transcript_line(self, line: TranscriptLine) -> None:
        """Keep a completed line, committed before returning; the same (call, item, speaker) again is ignored."""
        new_line = self._insert(TranscriptRow).values(
            call_sid=line.call_sid,
            speaker=line.speaker,
            text=line.text,
            start_ms=line.start_ms,
            end_ms=line.end_ms,
            item_id=line.item_id,
            interrupted=line.interrupted,
            failed=line.failed,
        )
        async with self.engine.begin() as connection:
            await connection.execute(new_line.on_conflict_do_nothing(index_elements=["call_sid", "item_id", "speaker"]))

    async def transcript(self, call_sid: str) -> list[TranscriptLine]:
        """The call's lines in spoken order."""
        query = (
            select(TranscriptRow)
            .where(TranscriptRow.call_sid == call_sid)
            .order_by(TranscriptRow.start_ms, TranscriptRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [
            TranscriptLine(
                call_sid=row.call_sid,
                speaker=cast(Speaker, row.speaker),
                text=row.text,
                start_ms=row.start_ms,
                end_ms=row.end_ms,
                item_id=row.item_id,
                interrupted=row.interrupted,
                failed=row.failed,
            )
            for row in rows
        ]

    async def add_event(self, call_sid: str, kind: str, data: dict[str, Any]) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(insert(EventRow).values(call_sid=call_sid, kind=kind, data=data))

    async def events(self, call_sid: str) -> list[CallEvent]:
        """The call's events in the order they were recorded."""
        query = select(EventRow).where(EventRow.call_sid == call_sid).order_by(EventRow.id)
        async with self._sessions() as session:
            return [_plain(CallEvent, row) for row in (await session.scalars(query)).all()]

    # ------------------------------------------------------------------------------------------------ the outbox

    async def enqueue_webhook(self, url: str, payload: dict[str, Any], webhook_id: str) -> int:
        """Keep a webhook to deliver, due now, with the ``webhook-id`` all its attempts carry; returns its id."""
        statement = insert(OutboxRow).values(url=url, payload=payload, webhook_id=webhook_id).returning(OutboxRow.id)
        async with self.engine.begin() as connection:
            return (await connection.execute(statement)).scalar_one()

    async def due_webhooks(
        self, now: datetime, limit: int = 20, *, lease: timedelta = timedelta(minutes=5)
    ) -> list[OutboxEntry]:
        """Claim up to ``limit`` pending webhooks whose next attempt is due at ``now``.

        Claiming moves an entry's next attempt ``lease`` ahead, so that other processes polling the outbox pass it by
        while this one delivers it; should this one die, the entry falls due again when the lease runs out. Finish
        each entry with ``mark_delivered`` or ``mark_failed``.
        """
        # On PostgreSQL, SKIP LOCKED passes by the entries another process is claiming right now, and rows whose
        # claim committed meanwhile are checked again by FOR UPDATE. SQLite has one writer at a time anyway.
        claimable = (
            select(OutboxRow.id)
            .where(OutboxRow.status == "pending", OutboxRow.next_attempt_at <= now)
            .order_by(OutboxRow.next_attempt_at, OutboxRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(OutboxRow)
            .where(OutboxRow.id.in_(claimable))
            .values(next_attempt_at=now + lease)
            .returning(OutboxRow)
        )
        async with self._sessions.begin() as session:
            rows = (await session.scalars(claim)).all()
            return sorted((_plain(OutboxEntry, row) for row in rows), key=lambda entry: entry.id)

    async def mark_delivered(self, entry_id: int, status_code: int | None = None) -> None:
        statement = (
            update(OutboxRow)
            .where(OutboxRow.id == entry_id)
            .values(status="delivered", delivered_at=utcnow(), last_status=status_code)
        )
        async with self.engine.begin() as connection:
            await connection.execute(statement)

    async def mark_failed(
        self, entry_id: int, error: str, next_attempt_at: datetime | None, status_code: int | None = None
    ) -> None:
        """Count a failed attempt and schedule the next one; with no next attempt (``None``) the delivery is dead."""
        changes: dict[str, Any] = {
            "attempts": OutboxRow.attempts + 1,
            "last_error": error,
            "last_status": status_code,
        }
        if next_attempt_at is None:
            changes |= {"status": "dead", "dead_at": utcnow()}
        else:
            changes["next_attempt_at"] = next_attempt_at
        statement = update(OutboxRow).where(OutboxRow.id == entry_id, OutboxRow.status == "pending").values(**changes)
        async with self.engine.begin() as connection:
            await connection.execute(statement)

    async def get_webhook(self, entry_id: int) -> OutboxEntry | None:
        async with self._sessions() as session:
            row = await session.get(OutboxRow, entry_id)
            return None if row is None else _plain(OutboxEntry, row)

    async def list_webhooks(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> OutboxPage:
        """Deliveries, newest first, a page at a time (cut by id, like the calls' pages by position).

        Raises ``ValueError`` for a cursor this store did not make.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = select(OutboxRow).order_by(OutboxRow.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(OutboxRow.status == status)
        if cursor is not None:
            query = query.where(OutboxRow.id < _decode_id_cursor(cursor))
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        page = rows[:limit]
        next_cursor = _encode_id_cursor(page[-1].id) if len(rows) > limit else None
        return OutboxPage(entries=tuple(_plain(OutboxEntry, row) for row in page), next_cursor=next_cursor)

    async def retry_webhook(self, entry_id: int, now: datetime, *, reset_attempts: bool) -> OutboxEntry | None:
        """Make a pending or dead delivery due at ``now`` (pending again, with all its attempts ahead of it when
        ``reset_attempts``); a delivered one is left as it is. ``None`` when there is no such delivery."""
        changes: dict[str, Any] = {"status": "pending", "next_attempt_at": now, "dead_at": None}
        if reset_attempts:
            changes["attempts"] = 0
        statement = (
            update(OutboxRow)
            .where(OutboxRow.id == entry_id, OutboxRow.status.in_(("pending", "dead")))
            .values(**changes)
            .returning(OutboxRow)
        )
        async with self._sessions.begin() as session:
            row = (await session.scalars(statement)).one_or_none()
            if row is None:
                row = await session.get(OutboxRow, entry_id)
            return None if row is None else _plain(OutboxEntry, row)


class DatabaseTranscriptSink:
    """A ``TranscriptSink`` that puts every line on the call's record as soon as it completes."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def write(self, line: TranscriptLine) -> None:
        await self.store.add_transcript_line(line)


# ---------------------------------------------------------------------------------------------------- helpers

T = TypeVar("T", bound="DataclassInstance")


def _plain(cls: type[T], row: Base) -> T:
    """The dataclass ``cls`` filled from the row's attributes of the same names."""
    return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})


def _encode_cursor(row: CallRow) -> str:
    position = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(position).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        created_at, id_ = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), int(id_)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


def _encode_id_cursor(id_: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([id_]).encode()).decode().rstrip("=")


def _decode_id_cursor(cursor: str) -> int:
    try:
        (id_,) = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return int(id_)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers work while a call writes its transcript; SQLite enforces foreign keys only when asked.

    SQLite takes one writer at a time: when many calls start at once, their writes queue for up to 30 s (the
    driver's default of 5 s turned callers away with the fallback at 200 calls starting within seconds).

    Switching a new file to WAL fails at once, busy timeout or not, while another process does the same (workers
    starting together): the switch is retried for a few seconds. Once a file is in WAL mode it stays so.
    """
    cursor = dbapi_connection.cursor()
    for attempt in range(50):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.1)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
