"""Which exchanges an export writes: the pick into a scratch table, near-duplicates superseded
by the best-ranked, then newest, answer, and the marks that keep them from being exported twice
(the rules are told in :mod:`bot.learning.exporter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from bot.storage import Database

SCRATCH_TABLE = "export_scratch"

# The candidates of this run, with what the writers need of each, in a scratch table that every
# writing process can read (UNLOGGED on PostgreSQL: it is rebuilt by every run). ``rn`` is 1 for
# the winner of each near-duplicate group. CREATE TABLE AS rather than INSERT: PostgreSQL plans
# it in parallel (an INSERT never is), about twice as fast on a million exchanges. It takes no
# bind parameters, so the two values below are formatted in (an int and a boolean).
# An admin's verdict (``exchange_reviews``, :mod:`bot.storage.review`) overrides the ratings:
# approved counts as 👍-rated (rank 1, also unrated), rejected and corrected (replaced by a
# correction exchange) are never candidates.
# Conversations in a channel with training off now, or in a thread of one, are left out, also
# those recorded before it was turned off (``set_training_opt_out`` withdraws those for good;
# this covers a setting written otherwise, or one written while the export runs). The few
# opted-out channels drive that subquery (CROSS JOIN: SQLite keeps the order as written), so
# with none it costs nothing.
_PICK_SQL = """
CREATE {unlogged}TABLE export_scratch AS
SELECT id AS exchange_id, answer_message_id, user_message_id, conversation_id, source,
       ROW_NUMBER() OVER (PARTITION BY text_key ORDER BY source_rank, id DESC) AS rn,
       created_at, platform, author_id, text_key
FROM (
    SELECT e.id, e.answer_message_id, e.user_message_id, e.conversation_id, e.created_at,
           q.text_key, q.platform, q.author_id,
           CASE WHEN e.answered_by IN ('human_agent', 'correction') THEN e.answered_by
                WHEN v.verdict = 'approved' THEN 'approved'
                WHEN COALESCE(r.score, 0) > 0 THEN 'upvoted'
                ELSE 'unrated' END AS source,
           CASE WHEN e.answered_by IN ('human_agent', 'correction') THEN 0
                WHEN v.verdict = 'approved' OR COALESCE(r.score, 0) > 0 THEN 1
                ELSE 2 END AS source_rank
    FROM exchanges e
    JOIN messages q ON q.id = e.user_message_id
    JOIN messages a ON a.id = e.answer_message_id
    LEFT JOIN (SELECT exchange_id, SUM(value) AS score FROM ratings GROUP BY exchange_id) r
           ON r.exchange_id = e.id
    LEFT JOIN exchange_reviews v ON v.exchange_id = e.id
    WHERE e.for_training = {yes}
      AND e.id <= {max_exchange_id}
      AND q.deleted_at IS NULL AND a.deleted_at IS NULL
      AND (v.verdict IS NULL OR v.verdict = 'approved')
      AND (e.answered_by IN ('human_agent', 'correction')
           OR v.verdict = 'approved'
           OR COALESCE(r.score, 0) > 0
           OR ({include_unrated} AND r.exchange_id IS NULL))
      AND NOT EXISTS (SELECT 1 FROM export_marks x WHERE x.exchange_id = e.id)
      AND e.conversation_id NOT IN (SELECT c.id FROM channel_settings s CROSS JOIN conversations c
                                    WHERE s.training_opt_out = {yes} AND c.platform = s.platform
                                      AND (c.channel = s.channel OR c.parent_channel = s.channel))
) ranked
"""


@dataclass(frozen=True, slots=True)
class Picked:
    winners: int  # exchanges to write (the best of each near-duplicate group)
    superseded: int  # near-duplicates consumed without a line of their own
    max_message_id: int  # newest message at the pick: later ones are not context
    first_conversation: int  # the winners' conversations lie in this id range
    last_conversation: int


def pick(connection: Connection, *, include_unrated: bool, threads: int) -> Picked:
    """Snapshot this run's candidates into the scratch table (committed, so that worker
    processes can read it). ``threads``: SQLite's helper threads for the sort."""
    postgres = connection.dialect.name == "postgresql"
    connection.execute(text(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}"))
    if postgres:
        # Enough for the ranking sort and the joins to stay in memory (the default 4 MB
        # spills a million rows to disk several times over).
        connection.execute(text("SET LOCAL work_mem = '64MB'"))
    else:
        # SQLite sorts with helper threads when allowed: the ranking sort and the index
        # below take a fifth less time with two.
        connection.exec_driver_sql(f"PRAGMA threads = {threads}")
    max_exchange_id, max_message_id = connection.execute(
        text(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM exchanges), "
            "(SELECT COALESCE(MAX(id), 0) FROM messages)"
        )
    ).one()
    true, false = ("TRUE", "FALSE") if postgres else ("1", "0")
    connection.execute(
        text(
            _PICK_SQL.format(
                unlogged="UNLOGGED " if postgres else "",
                yes=true,
                max_exchange_id=int(max_exchange_id),
                include_unrated=true if include_unrated else false,
            )
        )
    )
    if not postgres:  # SQLite joins by nested loops; PostgreSQL hashes the part's rows
        connection.execute(
            text(f"CREATE INDEX {SCRATCH_TABLE}_answer ON {SCRATCH_TABLE} (answer_message_id)")
        )
    # Fresh tables have no statistics; without them PostgreSQL plans the stream as nested
    # loops over whole tables.
    connection.execute(text(f"ANALYZE {SCRATCH_TABLE}"))
    winners, superseded, first, last = connection.execute(
        text(
            "SELECT COALESCE(SUM(CASE WHEN rn = 1 THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN rn > 1 THEN 1 ELSE 0 END), 0), "
            "MIN(CASE WHEN rn = 1 THEN conversation_id END), "
            f"MAX(CASE WHEN rn = 1 THEN conversation_id END) FROM {SCRATCH_TABLE}"
        )
    ).one()
    connection.commit()
    if not postgres:
        connection.exec_driver_sql("PRAGMA threads = 0")  # the connection goes back to the pool
    return Picked(
        winners=int(winners),
        superseded=int(superseded),
        max_message_id=int(max_message_id),
        first_conversation=int(first or 0),
        last_conversation=int(last or 0),
    )


def drop_scratch(database: Database) -> None:
    with database.engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}"))


def newer_than_exported(database: Database) -> int:
    """How many exchanges are newer than the newest exported one: a cheap (a range of the
    primary key) upper bound of the next pick's size."""
    with database.engine.connect() as connection:
        newer = connection.execute(
            text(
                "SELECT COUNT(*) FROM exchanges WHERE id > "
                "(SELECT COALESCE(MAX(exchange_id), 0) FROM export_marks)"
            )
        ).scalar_one()
    return int(newer)


def time_range(connection: Connection) -> tuple[datetime | None, datetime | None]:
    """When the first and the last of the picked exchanges were recorded."""
    first, last = connection.execute(
        text(f"SELECT MIN(created_at), MAX(created_at) FROM {SCRATCH_TABLE} WHERE rn = 1")
    ).one()
    connection.rollback()
    return (as_datetime(first) if first else None, as_datetime(last) if last else None)


def mark_exported(connection: Connection, shard_id: int) -> None:
    """Mark every picked exchange, the superseded ones too, as consumed by the shard (inside
    the shard's commit)."""
    connection.execute(
        text(
            "INSERT INTO export_marks (exchange_id, shard_id) "
            f"SELECT exchange_id, :shard FROM {SCRATCH_TABLE}"
        ),
        {"shard": shard_id},
    )


def as_datetime(value: Any) -> datetime:
    """SQLite hands back timestamps as text; PostgreSQL as aware datetimes."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed
