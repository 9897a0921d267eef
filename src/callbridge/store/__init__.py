"""Calls and campaigns on record: SQLAlchemy models, repositories, and the Alembic migrations that own the schema."""

from callbridge.store.campaigns import CampaignStore
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
    "CampaignStore",
    "DatabaseTranscriptSink",
    "OutboxEntry",
    "OutboxPage",
    "Store",
    "async_database_url",
]
