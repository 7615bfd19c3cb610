"""What the admin dashboard reads: conversation search, one thread with who answered, activity
per hour, reply latency, channel settings, the forget-me log and the export shards.

Plain functions taking a keyword-only ``session`` (run them with :meth:`bot.storage.Store.run`),
each returning frozen dataclasses; every list is limited, and none runs a query per row. The
review queue is :mod:`bot.storage.review`.

Users are named by pseudonym on the dashboard (the keyed pseudonyms of the export and the
forget-me log, :class:`bot.learning.Pseudonymizer`). The database stores raw platform ids, so
a search by pseudonym takes the function that computes them: the distinct authors are few,
and each one's pseudonym is one HMAC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_
from sqlalchemy import select as sql_select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from bot.conversation import Role, utcnow
from bot.storage.tables import (
    AnsweredBy,
    ChannelSettingRecord,
    ConversationRecord,
    DeletionRecord,
    DeliveryState,
    ExchangeRecord,
    ExchangeReviewRecord,
    ExportShardRecord,
    MessageRecord,
    RatingRecord,
    export_marks,
)

#: (platform, author id) -> pseudonym, e.g. a :class:`bot.learning.Pseudonymizer`.
Pseudonymize = Callable[[str, str], str]

SNIPPET_CHARS = 200


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are stored in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _maybe_utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _check_page(limit: int, offset: int = 0) -> None:
    if limit < 1 or offset < 0:
        raise ValueError("limit must be positive and offset not negative")


def like_pattern(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching ``text`` anywhere, literally: a ``%``
    or ``_`` typed by the admin is no wildcard."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# --------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class ConversationHit:
    """A conversation that matched a search."""

    conversation_id: int
    platform: str
    workspace: str
    channel: str
    thread: str
    parent_channel: str
    created_at: datetime
    message_count: int  # live (not deleted) messages
    last_message_at: datetime | None
    matches: int  # its messages that matched (all of them without text or author filter)
    snippet: str  # the first matching message, cut to SNIPPET_CHARS


def search_conversations(
    *,
    session: Session,
    text: str | None = None,
    platform: str | None = None,
    channel: str | None = None,
    author_ids: Sequence[str] | None = None,
    author_pseudonym: str | None = None,
    pseudonymize: Pseudonymize | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[ConversationHit]:
    """Conversations with a live message matching every filter given, newest first.

    ``text``: a case-insensitive substring of a message (``%`` and ``_`` are literal; SQLite
    folds the case of ASCII letters only). ``platform``; ``channel``: the conversation's
    channel, or the channel it is a thread of. ``author_ids``: raw platform ids of the
    message's author. ``author_pseudonym``: the author's pseudonym, as ``pseudonymize``
    computes it (required with it). Three queries, whatever the page size.

    Raises:
        ValueError: ``author_pseudonym`` without ``pseudonymize``, or a bad page.
    """
    _check_page(limit, offset)
    live = col(MessageRecord.deleted_at).is_(None)
    where: list[Any] = []  # on the conversation
    if platform:
        where.append(col(ConversationRecord.platform) == platform)
    if channel:
        where.append(
            (col(ConversationRecord.channel) == channel)
            | (col(ConversationRecord.parent_channel) == channel)
        )
    matching: list[Any] = []  # on the message
    if text:
        matching.append(col(MessageRecord.text).ilike(like_pattern(text), escape="\\"))
    if author_ids is not None:
        if not author_ids:
            return []
        matching.append(col(MessageRecord.author_id).in_(list(author_ids)))
    if author_pseudonym is not None:
        if pseudonymize is None:
            raise ValueError("a search by pseudonym needs the function that computes them")
        authors = _authors_with_pseudonym(
            session=session,
            pseudonym=author_pseudonym,
            pseudonymize=pseudonymize,
            platform=platform,
        )
        if not authors:
            return []
        matching.append(
            or_(
                *(
                    and_(col(MessageRecord.platform) == p, col(MessageRecord.author_id) == a)
                    for p, a in authors
                )
            )
        )
    if matching:
        matched = [
            (int(row[0]), int(row[1]), int(row[2] or 0))
            for row in session.exec(
                select(MessageRecord.conversation_id, func.count(), func.min(MessageRecord.id))
                .join(
                    ConversationRecord,
                    col(ConversationRecord.id) == MessageRecord.conversation_id,
                )
                .where(live, *where, *matching)
                .group_by(col(MessageRecord.conversation_id))
                .order_by(col(MessageRecord.conversation_id).desc())
                .limit(limit)
                .offset(offset)
            ).all()
        ]
        ids = [row[0] for row in matched]
    else:  # the newest conversations: a page of the primary key, not a scan of every message
        has_live = exists().where(col(MessageRecord.conversation_id) == ConversationRecord.id, live)
        ids = [
            int(conversation_id)
            for conversation_id in session.exec(
                select(ConversationRecord.id)
                .where(has_live, *where)
                .order_by(col(ConversationRecord.id).desc())
                .limit(limit)
                .offset(offset)
            ).all()
            if conversation_id is not None
        ]
    if not ids:
        return []
    conversations = {
        record.id: record
        for record in session.exec(
            select(ConversationRecord).where(col(ConversationRecord.id).in_(ids))
        ).all()
    }
    totals = {
        int(row[0]): (int(row[1]), row[2], int(row[3]))
        for row in session.execute(
            sql_select(
                col(MessageRecord.conversation_id),
                func.count(),
                func.max(col(MessageRecord.stored_at)),
                func.min(col(MessageRecord.id)),
            )
            .where(col(MessageRecord.conversation_id).in_(ids), live)
            .group_by(col(MessageRecord.conversation_id))
        ).all()
    }
    if not matching:  # every live message matches; the first is the snippet
        matched = [(i, totals[i][0], totals[i][2]) for i in ids if i in totals]
    first_ids = [row[2] for row in matched]
    snippets = dict(
        session.exec(
            select(MessageRecord.id, MessageRecord.text).where(col(MessageRecord.id).in_(first_ids))
        ).all()
    )
    hits = []
    for conversation_id, matches, first_id in matched:
        record = conversations[conversation_id]
        total, last, _ = totals.get(conversation_id, (0, None, 0))
        hits.append(
            ConversationHit(
                conversation_id=conversation_id,
                platform=record.platform,
                workspace=record.workspace,
                channel=record.channel,
                thread=record.thread,
                parent_channel=record.parent_channel,
                created_at=as_utc(record.created_at),
                message_count=total,
                last_message_at=_maybe_utc(last),
                matches=int(matches),
                snippet=snippets.get(first_id, "")[:SNIPPET_CHARS],
            )
        )
    return hits


def _authors_with_pseudonym(
    *, session: Session, pseudonym: str, pseudonymize: Pseudonymize, platform: str | None
) -> list[tuple[str, str]]:
    query = select(MessageRecord.platform, MessageRecord.author_id).distinct()
    if platform:
        query = query.where(col(MessageRecord.platform) == platform)
    return [
        (author_platform, author_id)
        for author_platform, author_id in session.exec(query).all()
        if pseudonymize(author_platform, author_id) == pseudonym
    ]


# --------------------------------------------------------------------------- one thread


@dataclass(frozen=True, slots=True)
class ThreadMessage:
    """One message of a conversation; an answer carries its exchange (who answered, the
    model, ratings, the review verdict)."""

    message_id: int
    role: str  # user, assistant (the bot), human_agent (an agent, or a correction)
    author_id: str
    author_name: str
    author_pseudonym: str | None  # when the caller gave ``pseudonymize``
    text: str  # "" once deleted
    sent_at: datetime
    edited: bool
    deleted: bool
    answer_state: str | None  # user messages: answered, unanswered, ...
    delivery_state: str | None  # bot replies: sent, failed, ...
    exchange_id: int | None = None  # the exchange this message answers in
    answered_by: str | None = None  # bot, human_agent or correction
    question_message_id: int | None = None  # the message it answers
    model_version: str | None = None
    upvotes: int = 0
    downvotes: int = 0
    verdict: str | None = None  # approved, rejected, corrected; None: not reviewed
    reviewer: str | None = None
    reviewed_at: datetime | None = None
    exported: bool = False  # an export shard holds the exchange

    @property
    def score(self) -> int:
        return self.upvotes - self.downvotes


def conversation_thread(
    *,
    session: Session,
    conversation_id: int,
    pseudonymize: Pseudonymize | None = None,
    limit: int = 1000,
) -> list[ThreadMessage]:
    """The first ``limit`` messages of a conversation, oldest first, deleted ones too (without
    their text). One query. Empty for a conversation that does not exist."""
    _check_page(limit)
    exchange = aliased(ExchangeRecord)
    review = aliased(ExchangeReviewRecord)

    def votes(positive: bool) -> Any:
        value = col(RatingRecord.value)
        return (
            select(func.count())
            .where(
                col(RatingRecord.exchange_id) == exchange.id, value > 0 if positive else value < 0
            )
            .scalar_subquery()
        )

    columns: list[Any] = [
        MessageRecord,
        exchange.id,
        exchange.answered_by,
        exchange.user_message_id,
        exchange.model_version,
        votes(True),
        votes(False),
        review.verdict,
        review.reviewer,
        review.reviewed_at,
        exists().where(export_marks.c.exchange_id == exchange.id),
    ]
    rows = session.execute(
        sql_select(*columns)
        .outerjoin(exchange, col(exchange.answer_message_id) == MessageRecord.id)
        .outerjoin(review, col(review.exchange_id) == exchange.id)
        .where(col(MessageRecord.conversation_id) == conversation_id)
        .order_by(col(MessageRecord.id))
        .limit(limit)
    ).all()
    thread = []
    for message, exchange_id, answered_by, question_id, model, up, down, *rest in rows:
        verdict, reviewer, reviewed_at, exported = rest
        assert message.id is not None
        answer = exchange_id is not None
        thread.append(
            ThreadMessage(
                message_id=message.id,
                role=message.role,
                author_id=message.author_id,
                author_name=message.author_name,
                author_pseudonym=(
                    pseudonymize(message.platform, message.author_id)
                    if pseudonymize is not None and message.role == Role.USER.value
                    else None
                ),
                text=message.text,
                sent_at=as_utc(message.sent_at),
                edited=message.edited_at is not None,
                deleted=message.deleted_at is not None,
                answer_state=message.answer_state,
                delivery_state=message.delivery_state,
                exchange_id=exchange_id,
                answered_by=answered_by,
                question_message_id=question_id,
                model_version=model,
                upvotes=int(up or 0) if answer else 0,
                downvotes=int(down or 0) if answer else 0,
                verdict=verdict,
                reviewer=reviewer,
                reviewed_at=_maybe_utc(reviewed_at),
                exported=bool(exported) if answer else False,
            )
        )
    return thread


# --------------------------------------------------------------------------- activity


@dataclass(frozen=True, slots=True)
class HourlyActivity:
    hour: datetime  # the start of the hour (UTC)
    messages_in: int  # user messages stored in that hour
    replies_out: int  # bot replies stored in that hour and delivered to their platform


def _hour_label(dialect: str, column: Any) -> Any | None:
    """An SQL expression naming the UTC hour of ``column`` as ``YYYY-MM-DD HH``."""
    if dialect == "sqlite":  # stored as UTC text
        return func.strftime("%Y-%m-%d %H", column)
    if dialect == "postgresql":  # timestamptz: its hour in UTC, whatever the session's zone
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD HH24")
    return None


def activity_by_hour(
    *, session: Session, hours: int = 24, now: datetime | None = None
) -> list[HourlyActivity]:
    """Messages in and replies out in each of the last ``hours`` hours (UTC, the current one
    last), hours without any included. Counted by the database on SQLite and PostgreSQL, in
    Python elsewhere.

    Raises:
        ValueError: ``hours`` outside 1..744 (a month).
    """
    if not 1 <= hours <= 744:
        raise ValueError("hours must be between 1 and 744")
    current = as_utc(now or utcnow()).replace(minute=0, second=0, microsecond=0)
    start = current - timedelta(hours=hours - 1)
    end = current + timedelta(hours=1)
    is_reply = (col(MessageRecord.role) == Role.ASSISTANT.value) & (
        col(MessageRecord.delivery_state) == DeliveryState.SENT.value
    )
    counted = (col(MessageRecord.role) == Role.USER.value) | is_reply
    window = [
        col(MessageRecord.stored_at) >= start,
        col(MessageRecord.stored_at) < end,
        counted,
    ]
    buckets: dict[datetime, list[int]] = {start + timedelta(hours=i): [0, 0] for i in range(hours)}
    label = _hour_label(session.get_bind().dialect.name, col(MessageRecord.stored_at))
    if label is not None:
        rows = session.exec(
            select(label, is_reply, func.count()).where(*window).group_by(label, is_reply)
        ).all()
        for hour_text, reply, count in rows:
            hour = datetime.strptime(hour_text, "%Y-%m-%d %H").replace(tzinfo=UTC)
            if hour in buckets:
                buckets[hour][1 if reply else 0] += int(count)
    else:
        for stored_at, reply in session.exec(
            select(MessageRecord.stored_at, is_reply).where(*window)
        ).all():
            hour = as_utc(stored_at).replace(minute=0, second=0, microsecond=0)
            if hour in buckets:
                buckets[hour][1 if reply else 0] += 1
    return [
        HourlyActivity(hour=hour, messages_in=counts[0], replies_out=counts[1])
        for hour, counts in buckets.items()
    ]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """How long the bot took to answer: from storing a question to storing its answer."""

    count: int
    p50_seconds: float | None  # None without any answer in the window
    p99_seconds: float | None
    max_seconds: float | None


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``fraction`` of the
    values at or below it."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def reply_latency(
    *, session: Session, since: datetime, until: datetime | None = None, sample: int = 100_000
) -> LatencySummary:
    """p50 and p99 of the bot's reply latency for answers stored since ``since`` (and before
    ``until``), from the stored times of each question and its answer; the newest ``sample``
    answers when there are more."""
    question = aliased(MessageRecord)
    answer = aliased(MessageRecord)
    conditions: list[Any] = [
        ExchangeRecord.answered_by == AnsweredBy.BOT.value,
        col(answer.stored_at) >= since,
    ]
    if until is not None:
        conditions.append(col(answer.stored_at) < until)
    rows = session.exec(
        select(question.stored_at, answer.stored_at)
        .select_from(ExchangeRecord)
        .join(question, col(question.id) == ExchangeRecord.user_message_id)
        .join(answer, col(answer.id) == ExchangeRecord.answer_message_id)
        .where(*conditions)
        .order_by(col(ExchangeRecord.id).desc())
        .limit(sample)
    ).all()
    seconds = sorted(
        max(0.0, (as_utc(answered) - as_utc(asked)).total_seconds()) for asked, answered in rows
    )
    if not seconds:
        return LatencySummary(count=0, p50_seconds=None, p99_seconds=None, max_seconds=None)
    return LatencySummary(
        count=len(seconds),
        p50_seconds=percentile(seconds, 0.50),
        p99_seconds=percentile(seconds, 0.99),
        max_seconds=seconds[-1],
    )


# --------------------------------------------------------------------------- data and privacy


@dataclass(frozen=True, slots=True)
class ChannelSetting:
    platform: str
    channel: str
    training_opt_out: bool
    updated_by: str
    updated_at: datetime


def channel_settings(*, session: Session, limit: int = 1000) -> list[ChannelSetting]:
    """The channels an admin set a switch for (training on or off), by platform and channel."""
    _check_page(limit)
    records = session.exec(
        select(ChannelSettingRecord)
        .order_by(col(ChannelSettingRecord.platform), col(ChannelSettingRecord.channel))
        .limit(limit)
    ).all()
    return [
        ChannelSetting(
            platform=record.platform,
            channel=record.channel,
            training_opt_out=record.training_opt_out,
            updated_by=record.updated_by,
            updated_at=as_utc(record.updated_at),
        )
        for record in records
    ]


@dataclass(frozen=True, slots=True)
class DeletionEntry:
    """A forget-me request: who by pseudonym only, what it deleted, when."""

    platform: str
    user_pseudonym: str
    requested_at: datetime
    messages_deleted: int
    exchanges_deleted: int


def deletion_log(*, session: Session, limit: int = 100, offset: int = 0) -> list[DeletionEntry]:
    """The forget-me requests, newest first."""
    _check_page(limit, offset)
    records = session.exec(
        select(DeletionRecord).order_by(col(DeletionRecord.id).desc()).limit(limit).offset(offset)
    ).all()
    return [
        DeletionEntry(
            platform=record.platform,
            user_pseudonym=record.user_pseudonym,
            requested_at=as_utc(record.requested_at),
            messages_deleted=record.messages_deleted,
            exchanges_deleted=record.exchanges_deleted,
        )
        for record in records
    ]


@dataclass(frozen=True, slots=True)
class ShardSummary:
    """A committed export shard (its folder is ``name`` under the export directory)."""

    id: int
    name: str
    created_at: datetime
    exchange_count: int
    superseded_count: int
    first_exchange_at: datetime | None
    last_exchange_at: datetime | None
    schema_version: int
    content_hash: str


def export_shards(*, session: Session, limit: int = 100, offset: int = 0) -> list[ShardSummary]:
    """The export shards, newest first."""
    _check_page(limit, offset)
    records = session.exec(
        select(ExportShardRecord)
        .order_by(col(ExportShardRecord.id).desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [
        ShardSummary(
            id=record.id or 0,
            name=record.name,
            created_at=as_utc(record.created_at),
            exchange_count=record.exchange_count,
            superseded_count=record.superseded_count,
            first_exchange_at=_maybe_utc(record.first_exchange_at),
            last_exchange_at=_maybe_utc(record.last_exchange_at),
            schema_version=record.schema_version,
            content_hash=record.content_hash,
        )
        for record in records
    ]
