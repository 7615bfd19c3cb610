"""Admins vetting training data: corrections, the review queue and its verdicts.

An exchange answered by the bot waits in the review queue until an admin gives it a verdict
(:class:`ReviewVerdict`), kept in ``exchange_reviews`` (one row per exchange, the last review
wins, with who gave it and when):

- approved: training data; the export takes it like a 👍-rated reply, also unrated;
- rejected: never exported, whatever its ratings;
- corrected: an admin wrote a better answer (``!correct``, or the queue's edit); the better
  answer is stored as a ``correction`` exchange, which the export ranks first, and the original
  is never exported.

Answers from human agents and corrections are trusted already: they never wait in the queue
(:mod:`bot.learning.selection` tells how the export uses the verdicts). The functions take a
keyword-only ``session`` (run them with :meth:`bot.storage.Store.run`); a review of an
exchange that cannot be reviewed (gone, deleted, already exported) is an outcome with a
message for the admin, not an exception.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import exists, func
from sqlalchemy import select as sql_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from bot.conversation import Role, utcnow
from bot.storage.browse import (
    ChannelSetting,
    ConversationHit,
    DeletionEntry,
    HourlyActivity,
    LatencySummary,
    Pseudonymize,
    ShardSummary,
    ThreadMessage,
    activity_by_hour,
    as_utc,
    channel_settings,
    conversation_thread,
    deletion_log,
    export_shards,
    reply_latency,
    search_conversations,
)
from bot.storage.records import _find_message, record_answer
from bot.storage.tables import (
    AnsweredBy,
    ConversationRecord,
    ExchangeRecord,
    ExchangeReviewRecord,
    MessageRecord,
    RatingRecord,
    ReviewVerdict,
    export_marks,
)

# The dashboard's reads live in bot.storage.browse; named here too, as the one module the
# dashboard's data comes from.
__all__ = [
    "ChannelSetting",
    "ConversationHit",
    "DeletionEntry",
    "HourlyActivity",
    "LatencySummary",
    "Pseudonymize",
    "ReviewItem",
    "ReviewOutcome",
    "ReviewStatus",
    "ShardSummary",
    "ThreadMessage",
    "activity_by_hour",
    "channel_settings",
    "conversation_thread",
    "correct_exchange",
    "deletion_log",
    "export_shards",
    "pending_review_count",
    "record_correction",
    "reply_latency",
    "review_exchange",
    "review_queue",
    "search_conversations",
    "set_verdict",
    "store_correction",
]

# --------------------------------------------------------------------------- corrections


def record_correction(
    *,
    session: Session,
    platform: str,
    channel: str,
    thread: str,
    corrected_message_id: str | None,
    text: str,
    admin_id: str,
    admin_name: str,
) -> ExchangeRecord | None:
    """An admin's better answer to a bot reply, stored as a ``correction`` exchange.

    ``corrected_message_id`` is the platform id of the bot reply; without it, the newest bot
    reply of the conversation (channel + thread) is corrected. ``None`` when there is none.
    """
    if corrected_message_id is not None:
        answer = _find_message(
            session=session,
            platform=platform,
            channel=channel,
            platform_message_id=corrected_message_id,
        )
    else:
        answer = session.exec(
            select(MessageRecord)
            .join(ConversationRecord, col(ConversationRecord.id) == MessageRecord.conversation_id)
            .where(
                ConversationRecord.platform == platform,
                ConversationRecord.channel == channel,
                ConversationRecord.thread == thread,
                MessageRecord.role == Role.ASSISTANT.value,
                col(MessageRecord.deleted_at).is_(None),
            )
            .order_by(col(MessageRecord.id).desc())
        ).first()
    if answer is None or answer.role != Role.ASSISTANT.value:
        return None
    original = session.exec(
        select(ExchangeRecord).where(ExchangeRecord.answer_message_id == answer.id)
    ).first()
    if original is None or original.id is None:
        return None
    return store_correction(
        session=session,
        original_id=original.id,
        user_message_id=original.user_message_id,
        text=text,
        admin_id=admin_id,
        admin_name=admin_name,
        reviewer=f"{platform}:{admin_id} ({admin_name})",
    )


def store_correction(
    *,
    session: Session,
    original_id: int,
    user_message_id: int,
    text: str,
    admin_id: str,
    admin_name: str,
    reviewer: str,
) -> ExchangeRecord:
    """Store ``text`` as an admin's better answer to exchange ``original_id`` (whose question
    is ``user_message_id``), in one commit: a ``correction`` exchange answering the same
    question, which the export ranks first, and the verdict ``corrected`` on the original,
    which keeps it out of every export. ``!correct`` and the review queue's edit both come
    here."""
    set_verdict(
        session=session, exchange_id=original_id, verdict=ReviewVerdict.CORRECTED, reviewer=reviewer
    )
    _, exchange = record_answer(  # commits the verdict with the correction
        session=session,
        user_message_id=user_message_id,
        text=text,
        answered_by=AnsweredBy.CORRECTION,
        author_id=admin_id,
        author_name=admin_name,
        model_version=None,
    )
    return exchange


# --------------------------------------------------------------------------- verdicts


@functools.cache
def _upsert_verdict(dialect: str) -> Any:
    insert: Any = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    table: Any = ExchangeReviewRecord.__table__  # type: ignore[attr-defined]
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.exchange_id],
        set_={
            "verdict": statement.excluded.verdict,
            "reviewer": statement.excluded.reviewer,
            "reviewed_at": statement.excluded.reviewed_at,
        },
    )


def set_verdict(
    *, session: Session, exchange_id: int, verdict: ReviewVerdict, reviewer: str
) -> None:
    """Record ``verdict`` on an exchange, replacing an earlier one (the last review wins).
    Not committed: the caller commits it with the rest of its work."""
    values: dict[str, Any] = {
        "exchange_id": exchange_id,
        "verdict": verdict.value,
        "reviewer": reviewer[:255],
        "reviewed_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):  # one statement, safe against a concurrent review
        session.execute(_upsert_verdict(dialect), values)
        return
    existing = session.exec(
        select(ExchangeReviewRecord).where(ExchangeReviewRecord.exchange_id == exchange_id)
    ).first()
    record = existing or ExchangeReviewRecord(**values)
    for name, value in values.items():
        setattr(record, name, value)
    session.add(record)
    session.flush()


class ReviewStatus(StrEnum):
    """How a review went."""

    DONE = "done"
    NOT_FOUND = "not_found"  # no such exchange (never was, or forgotten)
    DELETED = "deleted"  # its question or answer was deleted on the platform
    EXPORTED = "exported"  # an export shard holds it already: a verdict would change nothing
    NOT_FOR_TRAINING = "not_for_training"  # from a channel with training off: never exported
    NOT_EDITABLE = "not_editable"  # only the bot's answers are edited (corrected)
    INVALID = "invalid"  # an empty corrected answer


@dataclass(frozen=True, slots=True)
class ReviewOutcome:
    """What a review did, with the line to show the admin."""

    exchange_id: int
    status: ReviewStatus
    message: str
    verdict: ReviewVerdict | None = None  # the verdict now recorded (DONE only)
    correction_exchange_id: int | None = None  # the new correction exchange (an edit)

    @property
    def ok(self) -> bool:
        return self.status == ReviewStatus.DONE


@dataclass(frozen=True, slots=True)
class _Reviewable:
    exchange: ExchangeRecord
    refusal: ReviewOutcome | None


def _reviewable(*, session: Session, exchange_id: int, editing: bool) -> _Reviewable | None:
    question = aliased(MessageRecord)
    answer = aliased(MessageRecord)
    exported = exists().where(export_marks.c.exchange_id == ExchangeRecord.id)
    row = session.exec(
        select(
            ExchangeRecord,
            col(question.deleted_at).is_not(None) | col(answer.deleted_at).is_not(None),
            exported,
        )
        .join(question, col(question.id) == ExchangeRecord.user_message_id)
        .join(answer, col(answer.id) == ExchangeRecord.answer_message_id)
        .where(ExchangeRecord.id == exchange_id)
    ).first()
    if row is None:
        return None
    exchange, deleted, is_exported = row

    def refuse(status: ReviewStatus, message: str) -> _Reviewable:
        outcome = ReviewOutcome(exchange_id=exchange_id, status=status, message=message)
        return _Reviewable(exchange=exchange, refusal=outcome)

    if deleted:
        return refuse(
            ReviewStatus.DELETED,
            f"Exchange {exchange_id} was deleted on its platform; there is nothing to review.",
        )
    if is_exported:
        return refuse(
            ReviewStatus.EXPORTED,
            f"Exchange {exchange_id} is already in an export shard; a verdict would change "
            "nothing.",
        )
    if not exchange.for_training:
        return refuse(
            ReviewStatus.NOT_FOR_TRAINING,
            f"Exchange {exchange_id} is from a channel with training off; it is never exported.",
        )
    if editing and exchange.answered_by != AnsweredBy.BOT.value:
        return refuse(
            ReviewStatus.NOT_EDITABLE,
            f"Exchange {exchange_id} was answered by a "
            f"{exchange.answered_by.replace('_', ' ')}, not the bot; only the bot's answers "
            "are edited.",
        )
    return _Reviewable(exchange=exchange, refusal=None)


def _not_found(exchange_id: int) -> ReviewOutcome:
    return ReviewOutcome(
        exchange_id=exchange_id,
        status=ReviewStatus.NOT_FOUND,
        message=f"There is no exchange {exchange_id}.",
    )


def review_exchange(
    *, session: Session, exchange_id: int, verdict: ReviewVerdict | str, reviewer: str
) -> ReviewOutcome:
    """Approve (training data, exported like a 👍-rated reply) or reject (never exported) an
    exchange; a later review replaces the verdict. ``reviewer``: who, as the audit log says it
    (``platform:user id (name)``).

    Raises:
        ValueError: ``verdict`` is neither ``approved`` nor ``rejected`` (an edit is
            :func:`correct_exchange`).
    """
    chosen = ReviewVerdict(verdict)
    if chosen not in (ReviewVerdict.APPROVED, ReviewVerdict.REJECTED):
        raise ValueError(f"a review approves or rejects, not {chosen.value!r}")
    found = _reviewable(session=session, exchange_id=exchange_id, editing=False)
    if found is None:
        return _not_found(exchange_id)
    if found.refusal is not None:
        return found.refusal
    set_verdict(session=session, exchange_id=exchange_id, verdict=chosen, reviewer=reviewer)
    session.commit()
    message = (
        f"Approved exchange {exchange_id}: it will be exported as training data."
        if chosen == ReviewVerdict.APPROVED
        else f"Rejected exchange {exchange_id}: it will never be exported."
    )
    return ReviewOutcome(
        exchange_id=exchange_id, status=ReviewStatus.DONE, message=message, verdict=chosen
    )


def correct_exchange(
    *,
    session: Session,
    exchange_id: int,
    answer: str,
    reviewer: str,
    admin_id: str = "",
    admin_name: str = "",
) -> ReviewOutcome:
    """Replace the bot's answer of an exchange with ``answer``: stored as a correction exchange
    (ranked first by the export), the original marked ``corrected`` (never exported), one
    commit. ``admin_id`` / ``admin_name``: the author of the stored correction (default: the
    reviewer)."""
    better = answer.strip()
    if not better:
        return ReviewOutcome(
            exchange_id=exchange_id,
            status=ReviewStatus.INVALID,
            message="The corrected answer is empty.",
        )
    found = _reviewable(session=session, exchange_id=exchange_id, editing=True)
    if found is None:
        return _not_found(exchange_id)
    if found.refusal is not None:
        return found.refusal
    correction = store_correction(
        session=session,
        original_id=exchange_id,
        user_message_id=found.exchange.user_message_id,
        text=better,
        admin_id=admin_id or reviewer,
        admin_name=admin_name or reviewer,
        reviewer=reviewer,
    )
    return ReviewOutcome(
        exchange_id=exchange_id,
        status=ReviewStatus.DONE,
        message=(
            f"Stored the corrected answer of exchange {exchange_id} (as exchange "
            f"{correction.id}); it will be exported instead of the original."
        ),
        verdict=ReviewVerdict.CORRECTED,
        correction_exchange_id=correction.id,
    )


# --------------------------------------------------------------------------- the queue


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A bot answer waiting for an admin's verdict. Who asked is left out: the dashboard names
    users by pseudonym only (see :func:`bot.storage.search_conversations`)."""

    exchange_id: int
    conversation_id: int
    platform: str
    channel: str
    thread: str
    question: str
    answer: str
    answered_by: str
    model_version: str | None
    created_at: datetime
    score: int  # the sum of its ratings (+1 / -1 each); 0 when unrated
    upvotes: int
    downvotes: int


def _waiting() -> tuple[Any, Any, list[Any]]:
    """The question and answer aliases and the conditions of an exchange waiting for review."""
    question = aliased(MessageRecord)
    answer = aliased(MessageRecord)
    conditions = [
        ExchangeRecord.answered_by == AnsweredBy.BOT.value,
        col(ExchangeRecord.for_training).is_(True),
        col(question.deleted_at).is_(None),
        col(answer.deleted_at).is_(None),
        ~exists().where(col(ExchangeReviewRecord.exchange_id) == ExchangeRecord.id),
        ~exists().where(export_marks.c.exchange_id == ExchangeRecord.id),
    ]
    return question, answer, conditions


def _rating_sum(*, positive: bool | None) -> Any:
    """A correlated subquery: the sum of an exchange's ratings (of one sign, or all)."""
    query = select(func.coalesce(func.sum(RatingRecord.value), 0)).where(
        col(RatingRecord.exchange_id) == ExchangeRecord.id
    )
    if positive is not None:
        query = query.where(
            col(RatingRecord.value) > 0 if positive else col(RatingRecord.value) < 0
        )
    return query.scalar_subquery()


def review_queue(*, session: Session, limit: int = 50, offset: int = 0) -> list[ReviewItem]:
    """The bot answers not yet vetted, oldest first: no verdict, still for training, question
    and answer not deleted, not yet exported. One query; the ratings are summed only for the
    page's rows (ordered by id, which grows with time, so the primary key drives the page)."""
    if limit < 1 or offset < 0:
        raise ValueError("limit must be positive and offset not negative")
    question, answer, conditions = _waiting()
    columns: list[Any] = [
        ExchangeRecord.id,
        ExchangeRecord.conversation_id,
        ConversationRecord.platform,
        ConversationRecord.channel,
        ConversationRecord.thread,
        question.text,
        answer.text,
        ExchangeRecord.answered_by,
        ExchangeRecord.model_version,
        ExchangeRecord.created_at,
        _rating_sum(positive=None),
        _rating_sum(positive=True),
        _rating_sum(positive=False),
    ]
    rows = session.execute(
        sql_select(*columns)
        .select_from(ExchangeRecord)
        .join(question, col(question.id) == ExchangeRecord.user_message_id)
        .join(answer, col(answer.id) == ExchangeRecord.answer_message_id)
        .join(ConversationRecord, col(ConversationRecord.id) == ExchangeRecord.conversation_id)
        .where(*conditions)
        .order_by(col(ExchangeRecord.id))
        .limit(limit)
        .offset(offset)
    ).all()
    return [
        ReviewItem(
            exchange_id=int(row[0]),
            conversation_id=row[1],
            platform=row[2],
            channel=row[3],
            thread=row[4],
            question=row[5],
            answer=row[6],
            answered_by=row[7],
            model_version=row[8],
            created_at=as_utc(row[9]),
            score=int(row[10]),
            upvotes=int(row[11]),
            downvotes=-int(row[12]),
        )
        for row in rows
    ]


def pending_review_count(*, session: Session) -> int:
    """How many exchanges wait in :func:`review_queue`."""
    question, answer, conditions = _waiting()
    return int(
        session.exec(
            select(func.count())
            .select_from(ExchangeRecord)
            .join(question, col(question.id) == ExchangeRecord.user_message_id)
            .join(answer, col(answer.id) == ExchangeRecord.answer_message_id)
            .where(*conditions)
        ).one()
    )
