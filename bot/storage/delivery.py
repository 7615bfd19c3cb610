"""The delivery queue: stored bot replies on their way to the platform."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update as sql_update
from sqlmodel import Session, col, select

from bot.conversation import utcnow
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
    record = session.get(MessageRecord, answer_message_id)
    if record is None:
        return
    record.delivery_state = state.value
    if platform_message_id is not None:
        record.platform_message_id = platform_message_id
    session.add(record)
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


RETRY_CLAIM_SECONDS = 600


def undelivered_replies(
    *, session: Session, platform: str, limit: int = 100
) -> list[UndeliveredReply]:
    """Claim bot replies of ``platform`` whose sending failed, oldest first (the retry queue).

    Each reply is claimed with a conditional update, so when several instances share the
    database only one of them gets (and sends) it. The claimant reports back with
    ``set_delivery``: ``SENT``, or ``FAILED`` to put it back in the queue.
    """
    now = utcnow()
    claimable = (col(MessageRecord.delivery_state) == DeliveryState.FAILED.value) | (
        (col(MessageRecord.delivery_state) == DeliveryState.RETRYING.value)
        & (col(MessageRecord.delivery_claimed_at) < now - timedelta(seconds=RETRY_CLAIM_SECONDS))
    )
    rows = session.exec(
        select(MessageRecord, ConversationRecord, ExchangeRecord)
        .join(ConversationRecord, col(ConversationRecord.id) == MessageRecord.conversation_id)
        .join(ExchangeRecord, col(ExchangeRecord.answer_message_id) == MessageRecord.id)
        .where(
            MessageRecord.platform == platform,
            col(MessageRecord.deleted_at).is_(None),
            claimable,
        )
        .order_by(col(MessageRecord.id))
        .limit(limit)
    ).all()
    replies = []
    for answer, conversation, exchange in rows:
        claimed = session.execute(
            sql_update(MessageRecord)
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
            )
        )
    return replies
