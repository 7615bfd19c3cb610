"""Reading conversations back: history for prompts, thread membership, counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func
from sqlmodel import Session, SQLModel, col, select

from bot.conversation import IncomingMessage, Role, Turn
from bot.storage.database import run_statement
from bot.storage.records import record_incoming
from bot.storage.tables import (
    AnswerState,
    ConversationRecord,
    ExchangeRecord,
    ExportShardRecord,
    MessageRecord,
)


def conversation_history(
    *, session: Session, conversation_id: int, up_to_message_id: int, limit: int
) -> list[Turn]:
    """The newest ``limit`` live messages up to and including one, oldest first, each answer
    right after the message it answers.

    Answers to earlier messages count even when they were stored after this message (it
    arrived while they were generated and waited for its turn). Refused messages are left
    out: the bot never answered them, they are no turn.
    """
    params = {"conversation_id": conversation_id, "message_id": up_to_message_id, "limit": limit}
    rows = run_statement(session, _HISTORY, params).all()
    return [Turn(role=Role(role), text=text) for role, text in reversed(rows)]


def _history_statement() -> Any:
    not_refused = col(MessageRecord.answer_state).is_(None) | (
        col(MessageRecord.answer_state) != AnswerState.REFUSED.value
    )
    answered = col(ExchangeRecord.user_message_id)
    # An answer sits where its question is; everything else where it was stored.
    position = func.coalesce(answered, MessageRecord.id)
    up_to: Any = bindparam("message_id")
    return (
        select(MessageRecord.role, MessageRecord.text)
        .outerjoin(ExchangeRecord, col(ExchangeRecord.answer_message_id) == MessageRecord.id)
        .where(
            col(MessageRecord.conversation_id) == bindparam("conversation_id"),
            (col(MessageRecord.id) <= up_to) | (answered < up_to),
            col(MessageRecord.deleted_at).is_(None),
            not_refused,
        )
        .order_by(position.desc(), col(MessageRecord.id).desc())
        .limit(bindparam("limit"))
    )


#: ``since`` bound as the column stores it (SQLite keeps datetimes as text in its own format).
_STORED_AT_TYPE = MessageRecord.__table__.c.stored_at.type  # type: ignore[attr-defined]
#: Every answer reads its history: the statements are built once (see run_statement).
_HISTORY = _history_statement()
_EARLIER_WAITING = (
    select(MessageRecord.id)
    .where(
        col(MessageRecord.conversation_id) == bindparam("conversation_id"),
        col(MessageRecord.id) < bindparam("message_id"),
        col(MessageRecord.answer_state) == AnswerState.PENDING.value,
        col(MessageRecord.stored_at) >= bindparam("since", type_=_STORED_AT_TYPE),
        col(MessageRecord.deleted_at).is_(None),
    )
    .limit(1)
)


def earlier_turn_waiting(
    *, session: Session, conversation_id: int, message_id: int, since: datetime
) -> bool:
    """Whether an earlier user message of the conversation (stored after ``since``) still
    waits for its answer: a message takes its turn only after those before it."""
    params = {"conversation_id": conversation_id, "message_id": message_id, "since": since}
    return run_statement(session, _EARLIER_WAITING, params).first() is not None


def history_in_turn(
    *, session: Session, conversation_id: int, message_id: int, since: datetime, limit: int
) -> list[Turn] | None:
    """:func:`conversation_history` up to ``message_id`` once it is the message's turn (see
    :func:`earlier_turn_waiting`); ``None`` while an earlier message still waits. One
    transaction for the usual case, a message nobody is ahead of."""
    if earlier_turn_waiting(
        session=session, conversation_id=conversation_id, message_id=message_id, since=since
    ):
        return None
    return conversation_history(
        session=session, conversation_id=conversation_id, up_to_message_id=message_id, limit=limit
    )


def record_incoming_in_turn(
    *,
    session: Session,
    message: IncomingMessage,
    claimed_by: str,
    lease_seconds: float | None,
    since: datetime,
    limit: int,
) -> tuple[MessageRecord | None, list[Turn] | None]:
    """:func:`bot.storage.records.record_incoming` (committed first, as alone), then for a
    message to answer :func:`history_in_turn`: one call where two would each queue for the
    store's thread, the second behind every message that arrived meanwhile. The history is
    ``None`` for a duplicate, a message not to answer, or while an earlier turn waits."""
    stored = record_incoming(
        session=session, message=message, claimed_by=claimed_by, lease_seconds=lease_seconds
    )
    if stored is None or stored.answer_state != AnswerState.PENDING.value:
        return stored, None
    assert stored.id is not None
    turns = history_in_turn(
        session=session,
        conversation_id=stored.conversation_id,
        message_id=stored.id,
        since=since,
        limit=limit,
    )
    return stored, turns


def bot_is_in_conversation(*, session: Session, message: IncomingMessage) -> bool:
    """Whether the bot has answered in ``message``'s conversation (a thread it is part of)."""
    conversation = session.exec(
        select(ConversationRecord.id).where(
            ConversationRecord.platform == message.platform,
            ConversationRecord.workspace == message.workspace,
            ConversationRecord.channel == message.channel,
            ConversationRecord.thread == message.thread,
        )
    ).first()
    if conversation is None:
        return False
    answered = session.exec(
        select(MessageRecord.id).where(
            MessageRecord.conversation_id == conversation,
            MessageRecord.role == Role.ASSISTANT.value,
        )
    ).first()
    return answered is not None


@dataclass(frozen=True, slots=True)
class Counts:
    conversations: int
    messages: int
    exchanges: int
    unanswered: int
    gave_up: int = 0  # still unanswered when too old to answer after a crash


def counts(*, session: Session) -> Counts:
    def count(model: type[SQLModel], *where: Any) -> int:
        query = select(func.count()).select_from(model)
        for clause in where:
            query = query.where(clause)
        return int(session.exec(query).one())

    return Counts(
        conversations=count(ConversationRecord),
        messages=count(MessageRecord),
        exchanges=count(ExchangeRecord),
        unanswered=count(MessageRecord, MessageRecord.answer_state == AnswerState.UNANSWERED.value),
        gave_up=count(MessageRecord, MessageRecord.answer_state == AnswerState.GAVE_UP.value),
    )


def last_export_summary(*, session: Session) -> str | None:
    """ "<shard> at <time> (<n> exchanges)" for the newest export shard, or ``None``."""
    shard = session.exec(
        select(ExportShardRecord).order_by(col(ExportShardRecord.id).desc())
    ).first()
    if shard is None:
        return None
    return (
        f"{shard.name} at {shard.created_at:%Y-%m-%d %H:%M} UTC ({shard.exchange_count} exchanges)"
    )


def conversation_thread_of(
    *, session: Session, platform: str, channel: str, platform_message_id: str
) -> str | None:
    """The thread (root) of the conversation a stored message belongs to; ``None`` when the
    message was never stored. A reply to a stored message joins its conversation."""
    return session.exec(
        select(ConversationRecord.thread)
        .join(MessageRecord, col(MessageRecord.conversation_id) == ConversationRecord.id)
        .where(
            MessageRecord.platform == platform,
            MessageRecord.channel == channel,
            MessageRecord.platform_message_id == platform_message_id,
        )
    ).first()
