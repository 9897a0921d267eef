"""Calls, transcript lines, call events and the webhook outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
Json = sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", Id, nullable=False),
        sa.Column("call_sid", sa.String(), nullable=False),
        sa.Column("stream_sid", sa.String(), nullable=True),
        sa.Column("direction", sa.String(), nullable=False),
        sa.Column("from_number", sa.String(), nullable=True),
        sa.Column("to_number", sa.String(), nullable=True),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("context", Json, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("ended_at", Timestamp, nullable=True),
        sa.Column("end_reason", sa.String(), nullable=True),
        sa.Column("metrics", Json, nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_calls"),
        sa.UniqueConstraint("call_sid", name="uq_calls_call_sid"),
    )
    op.create_index("ix_calls_created_at_id", "calls", ["created_at", "id"])
    op.create_index("ix_calls_status_created_at", "calls", ["status", "created_at"])
    op.create_index("ix_calls_from_number_created_at", "calls", ["from_number", "created_at"])
    op.create_index("ix_calls_to_number_created_at", "calls", ["to_number", "created_at"])

    op.create_table(
        "transcript_lines",
        sa.Column("id", Id, nullable=False),
        sa.Column("call_sid", sa.String(), nullable=False),
        sa.Column("speaker", sa.String(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("start_ms", sa.Integer(), nullable=False),
        sa.Column("end_ms", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.Column("failed", sa.Boolean(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_transcript_lines"),
        sa.ForeignKeyConstraint(
            ["call_sid"], ["calls.call_sid"], name="fk_transcript_lines_call_sid_calls", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("call_sid", "item_id", "speaker", name="uq_transcript_lines_call_sid_item_id_speaker"),
    )

    op.create_table(
        "call_events",
        sa.Column("id", Id, nullable=False),
        sa.Column("call_sid", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("data", Json, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_call_events"),
        sa.ForeignKeyConstraint(
            ["call_sid"], ["calls.call_sid"], name="fk_call_events_call_sid_calls", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_call_events_call_sid", "call_events", ["call_sid"])

    op.create_table(
        "webhook_outbox",
        sa.Column("id", Id, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", Json, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("delivered_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_outbox"),
    )
    op.create_index(
        "ix_webhook_outbox_pending",
        "webhook_outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("webhook_outbox")
    op.drop_table("call_events")
    op.drop_table("transcript_lines")
    op.drop_table("calls")
