"""exchange reviews: an admin's verdict on an exchange (the review queue)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00

- ``exchange_reviews``: one row per reviewed exchange, the latest verdict (approved, rejected,
  corrected), who gave it and when; it goes with its exchange (ON DELETE CASCADE, so a
  forget-me takes it too). The unique key on ``exchange_id`` is also the index the review
  queue and the export look verdicts up by.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "exchange_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("exchange_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("reviewer", sa.String(length=255), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["exchange_id"], ["exchanges.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("exchange_id", name="uq_exchange_review"),
    )


def downgrade() -> None:
    op.drop_table("exchange_reviews")
