"""Recording what happens on a platform: messages, answers, edits, deletions, ratings."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from bot.conversation import IncomingMessage, Role, storable_text, utcnow
from bot.storage.database import StorageError
from bot.storage.privacy import training_allowed
from bot.storage.tables import (
    AnsweredBy,
    AnswerState,
    ConversationRecord,
    DeliveryState,
    ExchangeRecord,
    MessageRecord,
    RatingRecord,
    text_key,
)


def get_or_create_conversation(*, session: Session, message: IncomingMessage) -> ConversationRecord:
    """The conversation ``message`` belongs to, created when new (safe against races)."""
    query = select(ConversationRecord).where(
        ConversationRecord.platform == message.platform,
        ConversationRecord.workspace == message.workspace,
        ConversationRecord.channel == message.channel,
        ConversationRecord.thread == message.thread,
    )
    found = session.exec(query).first()
    if found is not None:
        return found
    record = ConversationRecord(
        platform=message.platform,
        workspace=message.workspace,
        channel=message.channel,
        thread=message.thread,
        parent_channel=message.parent_channel,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        # Another instance created it between our select and insert.
        return session.exec(query).one()
    return record


def record_incoming(*, session: Session, message: IncomingMessage) -> MessageRecord | None:
    """Store ``message`` and commit; return ``None`` when it is a duplicate delivery."""
    text = storable_text(message.text)
    conversation = get_or_create_conversation(session=session, message=message)
    record = MessageRecord(
        conversation_id=conversation.id,  # type: ignore[arg-type]
        platform=message.platform,
        channel=message.channel,
        platform_message_id=message.message_id,
        event_id=message.event_id,
        author_id=message.author_id,
        author_name=message.author_name,
        role=message.role.value,
        text=text,
        text_key=text_key(text),
        is_direct=message.is_direct,
        mentions_bot=message.mentions_bot,
        answer_state=(
            (AnswerState.PENDING if text.strip() else AnswerState.IGNORED).value
            if message.role == Role.USER
            else None
        ),
        sent_at=message.timestamp,
        stored_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        # The savepoint is rolled back; what came before it (nothing, or the conversation)
        # stays valid, and returned records are not expired.
        session.commit()
        return None
    session.commit()
    return record


def set_answer_state(*, session: Session, message_id: int, state: AnswerState) -> None:
    record = session.get(MessageRecord, message_id)
    if record is not None:
        record.answer_state = state.value
        session.add(record)
        session.commit()


def record_answer(
    *,
    session: Session,
    user_message_id: int,
    text: str,
    answered_by: AnsweredBy,
    author_id: str,
    author_name: str,
    model_version: str | None,
    platform_message_id: str | None = None,
) -> tuple[MessageRecord, ExchangeRecord]:
    """Store an answer to a user message and the exchange they form, in one transaction."""
    question = session.get(MessageRecord, user_message_id)
    if question is None:
        raise StorageError(f"message {user_message_id} no longer exists")
    now = utcnow()
    answer = MessageRecord(
        conversation_id=question.conversation_id,
        platform=question.platform,
        channel=question.channel,
        platform_message_id=platform_message_id,
        author_id=author_id,
        author_name=author_name,
        role=(Role.ASSISTANT if answered_by == AnsweredBy.BOT else Role.HUMAN_AGENT).value,
        text=storable_text(text),
        text_key=text_key(text),
        delivery_state=(
            DeliveryState.PENDING if answered_by == AnsweredBy.BOT else DeliveryState.SENT
        ).value,
        sent_at=now,
        stored_at=now,
    )
    session.add(answer)
    session.flush()
    exchange = ExchangeRecord(
        conversation_id=question.conversation_id,
        user_message_id=user_message_id,
        answer_message_id=answer.id,  # type: ignore[arg-type]
        answered_by=answered_by.value,
        model_version=model_version,
        created_at=now,
        for_training=training_allowed(
            session=session, platform=question.platform, channel=question.channel
        ),
    )
    session.add(exchange)
    question.answer_state = AnswerState.ANSWERED.value
    session.add(question)
    session.commit()
    return answer, exchange


def _find_message(
    *, session: Session, platform: str, channel: str, platform_message_id: str
) -> MessageRecord | None:
    return session.exec(
        select(MessageRecord).where(
            MessageRecord.platform == platform,
            MessageRecord.channel == channel,
            MessageRecord.platform_message_id == platform_message_id,
        )
    ).first()


def update_message_text(
    *, session: Session, platform: str, channel: str, platform_message_id: str, text: str
) -> bool:
    """Apply a platform edit to a stored message; ``False`` when we never stored it."""
    record = _find_message(
        session=session, platform=platform, channel=channel, platform_message_id=platform_message_id
    )
    if record is None or record.deleted_at is not None:
        return False
    record.text = storable_text(text)
    record.text_key = text_key(record.text)
    record.edited_at = utcnow()
    session.add(record)
    session.commit()
    return True


def mark_message_deleted(
    *, session: Session, platform: str, channel: str, platform_message_id: str
) -> bool:
    """A message deleted on the platform leaves the history and every future export.

    Its text is erased too: a person who deleted a message expects it gone.
    """
    record = _find_message(
        session=session, platform=platform, channel=channel, platform_message_id=platform_message_id
    )
    if record is None or record.deleted_at is not None:
        return False
    record.text = ""
    record.text_key = None
    record.deleted_at = utcnow()
    session.add(record)
    session.commit()
    return True


def set_rating(
    *,
    session: Session,
    platform: str,
    channel: str,
    answer_message_id: str,
    rater_id: str,
    value: int,
) -> bool:
    """Rate the exchange whose answer is the given platform message (+1 or -1).

    One rating per rater: a new value replaces the old. ``False`` when the message is not an
    answer we stored.
    """
    if value not in (1, -1):
        raise ValueError("a rating is +1 or -1")
    exchange = _exchange_for_answer(
        session=session, platform=platform, channel=channel, answer_message_id=answer_message_id
    )
    if exchange is None:
        return False
    existing = session.exec(
        select(RatingRecord).where(
            RatingRecord.exchange_id == exchange.id, RatingRecord.rater_id == rater_id
        )
    ).first()
    if existing is None:
        existing = RatingRecord(
            exchange_id=exchange.id,  # type: ignore[arg-type]
            rater_id=rater_id,
            value=value,
            created_at=utcnow(),
        )
    existing.value = value
    session.add(existing)
    session.commit()
    return True


def remove_rating(
    *,
    session: Session,
    platform: str,
    channel: str,
    answer_message_id: str,
    rater_id: str,
    value: int,
) -> bool:
    """Undo ``set_rating`` (a removed reaction); only removes a rating of that value."""
    exchange = _exchange_for_answer(
        session=session, platform=platform, channel=channel, answer_message_id=answer_message_id
    )
    if exchange is None:
        return False
    rating = session.exec(
        select(RatingRecord).where(
            RatingRecord.exchange_id == exchange.id,
            RatingRecord.rater_id == rater_id,
            RatingRecord.value == value,
        )
    ).first()
    if rating is None:
        return False
    session.delete(rating)
    session.commit()
    return True


def _exchange_for_answer(
    *, session: Session, platform: str, channel: str, answer_message_id: str
) -> ExchangeRecord | None:
    answer = _find_message(
        session=session, platform=platform, channel=channel, platform_message_id=answer_message_id
    )
    if answer is None:
        return None
    return session.exec(
        select(ExchangeRecord).where(ExchangeRecord.answer_message_id == answer.id)
    ).first()


def record_agent_answer(*, session: Session, message: IncomingMessage) -> ExchangeRecord | None:
    """Store a human agent's reply as the answer to the newest earlier user message.

    Returns ``None`` for a duplicate delivery or when there is no user message to answer.
    """
    stored = record_incoming(session=session, message=message)
    if stored is None or stored.id is None:
        return None
    question = session.exec(
        select(MessageRecord)
        .where(
            MessageRecord.conversation_id == stored.conversation_id,
            MessageRecord.role == Role.USER.value,
            col(MessageRecord.id) < stored.id,
            col(MessageRecord.deleted_at).is_(None),
        )
        .order_by(col(MessageRecord.id).desc())
    ).first()
    if question is None or question.id is None:
        return None
    exchange = ExchangeRecord(
        conversation_id=stored.conversation_id,
        user_message_id=question.id,
        answer_message_id=stored.id,
        answered_by=AnsweredBy.HUMAN_AGENT.value,
        created_at=utcnow(),
        for_training=training_allowed(
            session=session, platform=stored.platform, channel=stored.channel
        ),
    )
    session.add(exchange)
    if question.answer_state in {AnswerState.PENDING.value, AnswerState.UNANSWERED.value}:
        question.answer_state = AnswerState.ANSWERED.value
        session.add(question)
    session.commit()
    return exchange


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
    if original is None:
        return None
    _, exchange = record_answer(
        session=session,
        user_message_id=original.user_message_id,
        text=text,
        answered_by=AnsweredBy.CORRECTION,
        author_id=admin_id,
        author_name=admin_name,
        model_version=None,
    )
    return exchange
