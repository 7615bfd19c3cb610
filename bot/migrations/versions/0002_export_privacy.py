"""export shards, channel settings, deletions, leases, text keys, retry claims

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 02:46:27.619915
"""

import hashlib
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# A copy of bot.storage.text_key as it was when this revision was written, so the backfill
# below keeps its meaning whatever later code does.
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _text_key(text: str) -> int:
    normalised = " ".join(_NOT_WORD.sub(" ", text.casefold()).split())
    digest = hashlib.blake2b(normalised.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "channel_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("channel", sa.String(length=255), nullable=False),
        sa.Column("training_opt_out", sa.Boolean(), nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("platform", "channel", name="uq_channel_setting"),
    )
    op.create_table(
        "deletions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("user_pseudonym", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("messages_deleted", sa.Integer(), nullable=False),
        sa.Column("exchanges_deleted", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deletions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deletions_user_pseudonym"), ["user_pseudonym"], unique=False
        )

    op.create_table(
        "export_shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("exchange_count", sa.Integer(), nullable=False),
        sa.Column("superseded_count", sa.Integer(), nullable=False),
        sa.Column("first_exchange_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_exchange_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("exchanges", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("for_training", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(sa.Column("export_shard_id", sa.Integer(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_exchanges_export_shard_id"), ["export_shard_id"], unique=False
        )
        batch_op.create_foreign_key(
            "fk_exchanges_export_shard_id",
            "export_shards",
            ["export_shard_id"],
            ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("text_key", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("delivery_claimed_at", sa.DateTime(timezone=True), nullable=True)
        )

    # Backfill the near-duplicate key of every stored message.
    connection = op.get_bind()
    messages = sa.table(
        "messages",
        sa.column("id", sa.Integer),
        sa.column("text", sa.Text),
        sa.column("text_key", sa.BigInteger),
    )
    rows = connection.execute(sa.select(messages.c.id, messages.c.text)).all()
    for start in range(0, len(rows), 5000):
        connection.execute(
            messages.update()
            .where(messages.c.id == sa.bindparam("row_id"))
            .values(text_key=sa.bindparam("key")),
            [
                {"row_id": row_id, "key": _text_key(text)}
                for row_id, text in rows[start : start + 5000]
            ],
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("delivery_claimed_at")
        batch_op.drop_column("text_key")

    with op.batch_alter_table("exchanges", schema=None) as batch_op:
        batch_op.drop_constraint("fk_exchanges_export_shard_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_exchanges_export_shard_id"))
        batch_op.drop_column("export_shard_id")
        batch_op.drop_column("for_training")

    op.drop_table("leases")
    op.drop_table("export_shards")
    with op.batch_alter_table("deletions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deletions_user_pseudonym"))

    op.drop_table("deletions")
    op.drop_table("channel_settings")
