"""The tables: calls, their transcript lines and events, and the outbox of webhooks to deliver.

These ORM classes stay inside the store; the repository hands callers plain frozen dataclasses. The schema itself
is owned by the Alembic migrations next to this module: change a model, then add a revision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Names for every constraint and index, so that later migrations can refer to them on any database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Twilio's final call statuses; every other status means the call may still be live.
FINAL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")
"""Twilio's final call statuses: its status callback sets one when the phone call is over."""
ENDED = "ended"
"""callbridge's status of a call whose stream has ended while Twilio has not yet said how the call ended: not live,
not final. Twilio's final status replaces it when it comes; a late non-final status never does."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    SQLite has no time zones: it stores the wall-clock text and reads back naive values. Binding converts every
    value to UTC (naive values are taken as UTC) and reading attaches UTC, so comparisons and ordering agree on
    SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _as_utc(value)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON(none_as_null=True)  # Python None is SQL NULL, not the JSON text 'null'

# 64-bit ids on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class CallRow(Base):
    __tablename__ = "calls"
    __table_args__ = (
        Index(None, "created_at", "id"),
        Index(None, "status", "created_at"),
        Index(None, "from_number", "created_at"),
        Index(None, "to_number", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    call_sid: Mapped[str] = mapped_column(unique=True)
    stream_sid: Mapped[str | None]
    direction: Mapped[str]  # "inbound" or "outbound"
    from_number: Mapped[str | None]
    to_number: Mapped[str | None]
    agent: Mapped[str]
    status: Mapped[str]  # as Twilio reports it: queued, ringing, in-progress, completed, busy, failed, ...
    context: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None]
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)  # the session's stats, once the call has ended
    usage: Mapped[dict[str, int] | None] = mapped_column(Json)  # the model's token counts, once the call has ended
    owner: Mapped[str | None]  # the process carrying the stream ("host:pid:start"), to tell orphans after a crash
    answered_by: Mapped[str | None]  # Twilio's answering-machine verdict (human, machine_end_beep, fax, ...)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TranscriptRow(Base):
    __tablename__ = "transcript_lines"
    # One row per spoken item and side, so a line delivered twice is kept once. The index behind this constraint
    # also serves lookups by call_sid, its leading column.
    __table_args__ = (UniqueConstraint("call_sid", "item_id", "speaker"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    call_sid: Mapped[str] = mapped_column(ForeignKey("calls.call_sid", ondelete="CASCADE"))
    speaker: Mapped[str]  # "caller" or "agent"
    text: Mapped[str] = mapped_column(Text)
    start_ms: Mapped[int]
    end_ms: Mapped[int]
    item_id: Mapped[str]
    interrupted: Mapped[bool]
    failed: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EventRow(Base):
    __tablename__ = "call_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    call_sid: Mapped[str] = mapped_column(ForeignKey("calls.call_sid", ondelete="CASCADE"), index=True)
    kind: Mapped[str]  # "tool_call", "barge_in", "error", "status", ...
    data: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


OUTBOX_STATUSES = ("pending", "delivered", "dead")
"""A delivery is pending (due now or later), delivered (the receiver answered 2xx) or dead (its attempts ran out)."""


class OutboxRow(Base):
    __tablename__ = "webhook_outbox"
    # Delivered entries pile up; the index of the pending ones stays small.
    __table_args__ = (
        Index(
            "ix_webhook_outbox_pending",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(None, "status", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    webhook_id: Mapped[str]
    """The ``webhook-id`` of every attempt of this delivery: receivers tell a retry from a new delivery by it."""
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    status: Mapped[str] = mapped_column(default="pending")  # one of OUTBOX_STATUSES
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    dead_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None]  # the receiver's HTTP status at the last attempt (None: no answer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
