"""Recording what happens on a platform: messages, answers, edits, deletions, ratings.

A user message is stored claimed by the instance answering it (see :mod:`bot.storage.claims`).
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import and_, bindparam
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Session, SQLModel, col, select

from bot.conversation import IncomingMessage, Role, storable_text, utcnow
from bot.storage.claims import WAITING_STATES, renew_lease
from bot.storage.database import StorageError, run_statement
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


def _row_values(record: SQLModel) -> dict[str, Any]:
    table: Any = type(record).__table__  # type: ignore[attr-defined]
    return {
        column.name: getattr(record, column.name) for column in table.columns if column.name != "id"
    }


@functools.cache
def _plain_insert(table: Any) -> Any:
    """One INSERT per table, built once: the values go in as parameters."""
    return sql_insert(table)


@functools.cache
def _insert_unless_duplicate(table: Any, dialect: str) -> Any:
    """One ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` per table and dialect."""
    insert: Any = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    return insert(table).on_conflict_do_nothing().returning(table.c.id)


def insert_row(*, session: Session, record: SQLModel) -> int:
    """Insert ``record`` (its table's columns) as a plain INSERT and return its new id; the
    record stays out of the session. The hot path's writes go this way: the ORM's unit of work
    (flush, identity map, savepoints) and building each statement anew cost more than the
    statements themselves."""
    table: Any = type(record).__table__  # type: ignore[attr-defined]
    result: Any = run_statement(session, _plain_insert(table), _row_values(record))
    key = result.inserted_primary_key
    assert key is not None
    return _stored_as(record, int(key[0]))


def _stored_as(record: SQLModel, new_id: int) -> int:
    """Give ``record`` its id and make it a detached row, as if loaded: added to a session
    later, a change to it is an UPDATE of that row, not a second INSERT."""
    record.id = new_id
    make_transient_to_detached(record)
    return new_id


def insert_unless_duplicate(*, session: Session, record: SQLModel) -> int | None:
    """Insert ``record`` unless a unique constraint already holds its key (``INSERT ... ON
    CONFLICT DO NOTHING``, on SQLite and PostgreSQL alike); its new id, or ``None``."""
    table: Any = type(record).__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):  # another database: a savepoint instead
        try:
            with session.begin_nested():
                return insert_row(session=session, record=record)
        except IntegrityError:
            return None
    statement = _insert_unless_duplicate(table, dialect)
    new_id = run_statement(session, statement, _row_values(record)).scalar()
    return None if new_id is None else _stored_as(record, int(new_id))


_CONVERSATION_ID = select(ConversationRecord.id).where(
    col(ConversationRecord.platform) == bindparam("platform"),
    col(ConversationRecord.workspace) == bindparam("workspace"),
    col(ConversationRecord.channel) == bindparam("channel"),
    col(ConversationRecord.thread) == bindparam("thread"),
)


def _conversation_key(message: IncomingMessage) -> dict[str, str]:
    return {
        "platform": message.platform,
        "workspace": message.workspace,
        "channel": message.channel,
        "thread": message.thread,
    }


def conversation_id_for(*, session: Session, message: IncomingMessage) -> int:
    """The id of the conversation ``message`` belongs to, created when new (safe against
    races), loading no record."""
    key = _conversation_key(message)
    found = run_statement(session, _CONVERSATION_ID, key).scalar()
    if found is None:
        created = insert_unless_duplicate(session=session, record=_new_conversation(message))
        # None: another instance created it between our select and insert.
        found = (
            created
            if created is not None
            else run_statement(session, _CONVERSATION_ID, key).scalar_one()
        )
    return int(found)


def _new_conversation(message: IncomingMessage) -> ConversationRecord:
    return ConversationRecord(
        platform=message.platform,
        workspace=message.workspace,
        channel=message.channel,
        thread=message.thread,
        parent_channel=message.parent_channel,
        created_at=utcnow(),
    )


def record_incoming(
    *,
    session: Session,
    message: IncomingMessage,
    claimed_by: str | None = None,
    state: AnswerState | None = None,
    lease_seconds: float | None = None,
) -> MessageRecord | None:
    """Store ``message`` and commit; return ``None`` when it is a duplicate delivery.

    ``claimed_by``: the instance that is going to answer it (stored with it, in the same
    commit, so a crash right after leaves a claim that recovery can take over); with
    ``lease_seconds`` its lease is renewed in the same commit, so the claim is never seen
    without a live holder. ``state`` overrides the answer state of a user message
    (``IGNORED`` for context, ``REFUSED``).
    """
    if claimed_by is not None and lease_seconds is not None:
        renew_lease(session=session, holder=claimed_by, seconds=lease_seconds)
    record = _insert_incoming(session=session, message=message, claimed_by=claimed_by, state=state)
    session.commit()
    return record


def _insert_incoming(
    *,
    session: Session,
    message: IncomingMessage,
    claimed_by: str | None = None,
    state: AnswerState | None = None,
    savepoint: bool = True,
) -> MessageRecord | None:
    """Add ``message`` without committing; ``None`` for a duplicate.

    In a savepoint by default. ``savepoint=False`` for a caller that commits more with it:
    on SQLite a savepoint opened outside a transaction is one, and its release commits it;
    a duplicate then rolls the whole transaction back.
    """
    text = storable_text(message.text)
    if message.role != Role.USER:
        answer_state = None
    elif state is not None:
        answer_state = state.value
    else:
        answer_state = (AnswerState.PENDING if text.strip() else AnswerState.IGNORED).value
    waiting = answer_state == AnswerState.PENDING.value
    now = utcnow()
    record = MessageRecord(
        conversation_id=conversation_id_for(session=session, message=message),
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
        answer_state=answer_state,
        sent_at=message.timestamp,
        stored_at=now,
        answer_claimed_by=claimed_by if waiting else None,
        answer_claimed_at=now if waiting and claimed_by is not None else None,
    )
    if not savepoint:
        if _already_stored(session=session, message=message):
            return None
        session.add(record)
        try:
            session.flush()
        except IntegrityError:  # stored by another instance since the check
            session.rollback()
            return None
        return record
    # A duplicate leaves what came before it (nothing, or the conversation) in place.
    return None if insert_unless_duplicate(session=session, record=record) is None else record


def _already_stored(*, session: Session, message: IncomingMessage) -> bool:
    same_event = and_(
        col(MessageRecord.platform) == message.platform,
        col(MessageRecord.event_id) == message.event_id,
    )
    same_message = and_(
        col(MessageRecord.platform) == message.platform,
        col(MessageRecord.channel) == message.channel,
        col(MessageRecord.platform_message_id) == message.message_id,
    )
    keys = [
        key
        for key, present in ((same_event, message.event_id), (same_message, message.message_id))
        if present is not None
    ]
    if not keys:
        return False
    condition = keys[0] if len(keys) == 1 else keys[0] | keys[1]
    return session.exec(select(MessageRecord.id).where(condition).limit(1)).first() is not None


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
    delivery: DeliveryState | None = None,
) -> tuple[MessageRecord, ExchangeRecord]:
    """Store an answer to a user message and the exchange they form, in one transaction.

    A bot answer is stored ``PENDING`` (the caller sends it now; the retry queue takes it
    over after a grace period if the caller dies), or with ``delivery=FAILED`` to hand it
    straight to the retry queue (recovery). Other answers are already on the platform.
    """
    question = run_statement(session, _QUESTION, {"message_id": user_message_id}).first()
    if question is None:
        raise StorageError(f"message {user_message_id} no longer exists")
    now = utcnow()
    is_bot = answered_by == AnsweredBy.BOT
    if delivery is None:
        delivery = DeliveryState.PENDING if is_bot else DeliveryState.SENT
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
        delivery_state=delivery.value,
        # The sender's own claim on the send: the retry queue leaves a PENDING reply alone
        # for a grace period after this.
        delivery_claimed_at=now if delivery == DeliveryState.PENDING else None,
        sent_at=now,
        stored_at=now,
    )
    insert_row(session=session, record=answer)
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
    insert_row(session=session, record=exchange)
    run_statement(session, _MARK_ANSWERED, {"message_id": user_message_id})
    session.commit()
    return answer, exchange


_QUESTION = select(
    MessageRecord.conversation_id, MessageRecord.platform, MessageRecord.channel
).where(col(MessageRecord.id) == bindparam("message_id"))
_MARK_ANSWERED = (
    sql_update(MessageRecord)
    .where(col(MessageRecord.id) == bindparam("message_id"))
    .values(answer_state=AnswerState.ANSWERED.value)
)


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
    The message and the exchange are committed together: a failure in between leaves
    neither, so the platform's redelivery records the answer instead of being a duplicate.
    """
    stored = _insert_incoming(session=session, message=message, savepoint=False)
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
        session.commit()  # the agent's message is still context
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
    if question.answer_state in WAITING_STATES:
        question.answer_state = AnswerState.ANSWERED.value
        session.add(question)
    session.commit()
    return exchange
