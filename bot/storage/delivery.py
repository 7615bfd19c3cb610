"""The delivery queue: stored bot replies on their way to the platform.

A reply is recorded ``PENDING`` just before it is sent and ``SENT`` as soon as the platform
accepted it. ``FAILED`` replies (sending failed, or recovery queued them) are the retry queue;
so are ``PENDING`` replies older than a grace period (the sender died between recording and
sending) and ``RETRYING`` claims older than :data:`RETRY_CLAIM_SECONDS` (the retrier died).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, literal_column
from sqlalchemy import update as sql_update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from bot.conversation import utcnow
from bot.storage.database import run_statement
from bot.storage.tables import (
    ConversationRecord,
    DeliveryState,
    ExchangeRecord,
    MessageRecord,
)


def set_delivery(
    *,
    session: Session,
    answer_message_id: int,
    state: DeliveryState,
    platform_message_id: str | None = None,
) -> None:
    params = {"message_id": answer_message_id, "state": state.value}
    if platform_message_id is None:
        run_statement(session, _SET_DELIVERY, params)
    else:
        params["platform_message_id"] = platform_message_id
        run_statement(session, _SET_DELIVERY_AND_ID, params)
    session.commit()


#: Every reply sent records its delivery: the statements are built once.
_SET_DELIVERY = (
    sql_update(MessageRecord)
    .where(col(MessageRecord.id) == bindparam("message_id"))
    .values(delivery_state=bindparam("state"))
)
_SET_DELIVERY_AND_ID = _SET_DELIVERY.values(platform_message_id=bindparam("platform_message_id"))


def queue_partial_reply(
    *, session: Session, answer_message_id: int, placeholder_id: str, chunks_sent: int = 0
) -> None:
    """A reply whose start is on the platform (message ``placeholder_id``) but not the rest:
    one transaction records that message and how many chunks are complete (``chunks_sent``,
    see :class:`bot.service.PartialDelivery`) on the question and queues the reply, so the
    retry finishes it instead of posting any part of it a second time."""
    exchange = session.exec(
        select(ExchangeRecord).where(ExchangeRecord.answer_message_id == answer_message_id)
    ).first()
    if exchange is not None:
        question = session.get(MessageRecord, exchange.user_message_id)
        if question is not None:
            question.reply_placeholder_id = placeholder_id[:255]
            question.reply_chunks_sent = chunks_sent
            session.add(question)
    answer = session.get(MessageRecord, answer_message_id)
    if answer is not None:
        answer.delivery_state = DeliveryState.FAILED.value
        session.add(answer)
    session.commit()


@dataclass(frozen=True, slots=True)
class UndeliveredReply:
    """A stored bot reply that never reached the platform, with where it belongs."""

    answer_id: int
    platform: str
    workspace: str
    channel: str
    thread: str
    in_reply_to: str | None  # the platform id of the user message it answers
    text: str
    # The placeholder or partial reply already on the platform for it: edit that message
    # into the reply instead of posting a second one.
    placeholder_id: str | None = None
    # How many of its chunks are complete on the platform (0: the placeholder message, when
    # there is one, still needs its first chunk); the retry posts only the chunks after them.
    chunks_sent: int = 0


RETRY_CLAIM_SECONDS = 600
#: How long a reply recorded ``PENDING`` belongs to the instance that is sending it.
PENDING_GRACE_SECONDS = 60.0

_QUEUED_STATES = (
    DeliveryState.FAILED.value,
    DeliveryState.PENDING.value,
    DeliveryState.RETRYING.value,
)


def _claimable(*, now: datetime, pending_grace_seconds: float) -> ColumnElement[bool]:
    state = col(MessageRecord.delivery_state)
    abandoned_send = now - timedelta(seconds=pending_grace_seconds)
    abandoned_retry = now - timedelta(seconds=RETRY_CLAIM_SECONDS)
    return (
        (state == DeliveryState.FAILED.value)
        | (
            (state == DeliveryState.PENDING.value)
            # Rows recorded before the sender's claim time existed count from stored_at.
            & (
                (col(MessageRecord.delivery_claimed_at) < abandoned_send)
                | (
                    col(MessageRecord.delivery_claimed_at).is_(None)
                    & (col(MessageRecord.stored_at) < abandoned_send)
                )
            )
        )
        | (
            (state == DeliveryState.RETRYING.value)
            & (col(MessageRecord.delivery_claimed_at) < abandoned_retry)
        )
    )


def rare(condition: ColumnElement[bool], *, dialect: str) -> ColumnElement[bool]:
    """``condition``, marked as true for few rows where the planner cannot know it: SQLite's
    statistics hold only the average rows per value of an indexed column, in which the
    delivered replies and answered messages dominate, so it would rather scan the table;
    PostgreSQL's statistics show how few rows are queued."""
    if dialect == "sqlite":
        return func.likelihood(condition, literal_column("0.001"))
    return condition


def delivery_queue(
    *,
    platform: str,
    now: datetime,
    pending_grace_seconds: float,
    limit: int,
    dialect: str,
) -> SelectOfScalar[MessageRecord]:
    """The select of the replies of ``platform`` the retry queue may claim now, oldest first.

    The ``IN`` on the state and the platform equality go through
    ``ix_messages_delivery_queue`` (delivery_state, platform): the queue is read without a
    scan of the messages table, however many replies were delivered.
    """
    return (
        select(MessageRecord)
        .where(
            rare(col(MessageRecord.delivery_state).in_(_QUEUED_STATES), dialect=dialect),
            MessageRecord.platform == platform,
            col(MessageRecord.deleted_at).is_(None),
            _claimable(now=now, pending_grace_seconds=pending_grace_seconds),
        )
        .order_by(col(MessageRecord.id))
        .limit(limit)
    )


def undelivered_replies(
    *,
    session: Session,
    platform: str,
    limit: int = 100,
    pending_grace_seconds: float = PENDING_GRACE_SECONDS,
) -> list[UndeliveredReply]:
    """Claim bot replies of ``platform`` that are not on the platform yet (the retry queue).

    Each reply is claimed with a conditional update, so when several instances share the
    database only one of them gets (and sends) it. The claimant reports back with
    ``set_delivery``: ``SENT``, or ``FAILED`` to put it back in the queue.
    """
    now = utcnow()
    claimable = _claimable(now=now, pending_grace_seconds=pending_grace_seconds)
    answers = session.exec(
        delivery_queue(
            platform=platform,
            now=now,
            pending_grace_seconds=pending_grace_seconds,
            limit=limit,
            dialect=session.get_bind().dialect.name,
        )
    ).all()
    replies = []
    for answer in answers:
        exchange = session.exec(
            select(ExchangeRecord).where(ExchangeRecord.answer_message_id == answer.id)
        ).first()
        conversation = session.get(ConversationRecord, answer.conversation_id)
        if exchange is None or conversation is None:
            continue  # not a reply to anything (never happens for bot replies)
        claimed = session.execute(
            sql_update(MessageRecord)
            .execution_options(synchronize_session=False)
            .where(col(MessageRecord.id) == answer.id, claimable)
            .values(delivery_state=DeliveryState.RETRYING.value, delivery_claimed_at=now)
        )
        session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue  # another instance took it
        question = session.get(MessageRecord, exchange.user_message_id)
        replies.append(
            UndeliveredReply(
                answer_id=answer.id,  # type: ignore[arg-type]
                platform=conversation.platform,
                workspace=conversation.workspace,
                channel=conversation.channel,
                thread=conversation.thread,
                in_reply_to=question.platform_message_id if question is not None else None,
                text=answer.text,
                placeholder_id=question.reply_placeholder_id if question is not None else None,
                chunks_sent=(question.reply_chunks_sent or 0) if question is not None else 0,
            )
        )
    return replies
