"""Calls on record: SQLAlchemy models, the repository, and the Alembic migrations that own the schema."""

from callbridge.store.repository import (
    CallChanges,
    CallEvent,
    CallPage,
    CallRecord,
    DatabaseTranscriptSink,
    OutboxEntry,
    OutboxPage,
    Store,
    async_database_url,
)

__all__ = [
    "CallChanges",
    "CallEvent",
    "CallPage",
    "CallRecord",
    "DatabaseTranscriptSink",
    "OutboxEntry",
    "OutboxPage",
    "Store",
    "async_database_url",
]
