"""Reading conversations back: history for prompts, thread membership, counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, SQLModel, col, select

from bot.conversation import IncomingMessage, Role, Turn
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
    """The newest ``limit`` live messages up to and including one, oldest first."""
    query = (
        select(MessageRecord.role, MessageRecord.text)
        .where(
            MessageRecord.conversation_id == conversation_id,
            col(MessageRecord.id) <= up_to_message_id,
            col(MessageRecord.deleted_at).is_(None),
        )
        .order_by(col(MessageRecord.id).desc())
        .limit(limit)
    )
    rows = session.exec(query).all()
    return [Turn(role=Role(role), text=text) for role, text in reversed(rows)]


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
