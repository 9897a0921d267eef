"""Webhook deliveries keep their Standard Webhooks id across retries, a status (pending, delivered, dead), when they
died and the receiver's last HTTP status.

Entries already in the outbox get an id of their own (``msg_outbox_<id>``) and the status their delivery time says.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.drop_index("ix_webhook_outbox_pending", table_name="webhook_outbox")
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.add_column(sa.Column("webhook_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("status", sa.String(), nullable=True))
        batch.add_column(sa.Column("dead_at", Timestamp, nullable=True))
        batch.add_column(sa.Column("last_status", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE webhook_outbox SET webhook_id = 'msg_outbox_' || CAST(id AS VARCHAR), "
        "status = CASE WHEN delivered_at IS NULL THEN 'pending' ELSE 'delivered' END"
    )
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.alter_column("webhook_id", existing_type=sa.String(), nullable=False)
        batch.alter_column("status", existing_type=sa.String(), nullable=False)
    op.create_index(
        "ix_webhook_outbox_pending",
        "webhook_outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_webhook_outbox_status_id", "webhook_outbox", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_outbox_status_id", table_name="webhook_outbox")
    op.drop_index("ix_webhook_outbox_pending", table_name="webhook_outbox")
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.drop_column("last_status")
        batch.drop_column("dead_at")
        batch.drop_column("status")
        batch.drop_column("webhook_id")
    op.create_index(
        "ix_webhook_outbox_pending",
        "webhook_outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL"),
    )
