"""export marks in their own table instead of a column of exchanges

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 06:10:00

Marking a million exported exchanges by updating ``exchanges.export_shard_id`` took about half a
minute on PostgreSQL (a new version of every row, six indexes, a foreign-key check per row); an
append to a narrow table with one index takes about a second. See ``bot.storage.export_marks``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "export_marks",
        sa.Column("exchange_id", sa.BigInteger(), nullable=False),
        sa.Column("shard_id", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_export_marks_exchange_id", "export_marks", ["exchange_id"])
    op.execute(
        "INSERT INTO export_marks (exchange_id, shard_id) "
        "SELECT id, export_shard_id FROM exchanges WHERE export_shard_id IS NOT NULL"
    )
    with op.batch_alter_table("exchanges", schema=None) as batch_op:
        batch_op.drop_constraint("fk_exchanges_export_shard_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_exchanges_export_shard_id"))
        batch_op.drop_column("export_shard_id")


def downgrade() -> None:
    with op.batch_alter_table("exchanges", schema=None) as batch_op:
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
    op.execute(
        "UPDATE exchanges SET export_shard_id = "
        "(SELECT MAX(shard_id) FROM export_marks WHERE export_marks.exchange_id = exchanges.id)"
    )
    op.drop_table("export_marks")
