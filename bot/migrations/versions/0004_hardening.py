"""crash recovery, command dedupe, thread parents, queue indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 20:30:00

- ``messages.answer_claimed_by`` / ``answer_claimed_at``: the instance answering a user message,
  so recovery after a crash answers it exactly once across replicas;
  ``messages.reply_placeholder_id``: the placeholder or partial reply shown for it, and
  ``messages.reply_chunks_sent``: how many chunks of a partly delivered reply are complete.
- ``handled_commands``: command deliveries already run (dedupe across restarts).
- ``conversations.parent_channel``: the channel a Discord thread lives in (training opt-out).
- Indexes for the recovery pass and the delivery queue.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("answer_claimed_by", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("answer_claimed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("reply_placeholder_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("reply_chunks_sent", sa.Integer(), nullable=True))
        batch_op.create_index("ix_messages_answer_queue", ["answer_state", "stored_at"])
        batch_op.create_index("ix_messages_delivery_queue", ["delivery_state", "platform"])
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("parent_channel", sa.String(length=255), nullable=False, server_default="")
        )
    op.create_table(
        "handled_commands",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("delivery_key", sa.String(length=255), nullable=False),
        sa.Column("command", sa.String(length=64), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("platform", "delivery_key", name="uq_handled_command"),
    )


def downgrade() -> None:
    op.drop_table("handled_commands")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("parent_channel")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_delivery_queue")
        batch_op.drop_index("ix_messages_answer_queue")
        batch_op.drop_column("reply_chunks_sent")
        batch_op.drop_column("reply_placeholder_id")
        batch_op.drop_column("answer_claimed_at")
        batch_op.drop_column("answer_claimed_by")
