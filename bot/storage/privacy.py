"""Privacy operations: forget-me and per-channel training opt-out (a channel's opt-out covers
its threads: :attr:`ConversationRecord.parent_channel`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import bindparam, exists
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlmodel import Session, col, select

from bot.conversation import utcnow
from bot.storage.database import run_statement
from bot.storage.tables import (
    ChannelSettingRecord,
    ConversationRecord,
    DeletionRecord,
    ExchangeRecord,
    MessageRecord,
    RatingRecord,
    export_marks,
)


def training_allowed(
    *, session: Session, platform: str, channel: str, parent_channel: str | None = None
) -> bool:
    """Whether exchanges in this channel may become training data: no admin opt-out on the
    channel, nor on the channel it is a thread of (a Discord thread is a channel of its own).

    ``parent_channel``: that channel ("" when none); None looks it up in the conversations
    recorded in ``channel`` (:attr:`ConversationRecord.parent_channel`)."""
    if parent_channel is None:  # every answer asks this: one statement, built once
        params = {"platform": platform, "channel": channel}
        return run_statement(session, _OPTED_OUT_HERE_OR_ABOVE, params).first() is None
    parents = [parent_channel] if parent_channel else []
    opted_out = session.exec(
        select(ChannelSettingRecord.id).where(
            ChannelSettingRecord.platform == platform,
            col(ChannelSettingRecord.training_opt_out).is_(True),
            (col(ChannelSettingRecord.channel) == channel)
            | col(ChannelSettingRecord.channel).in_(parents),
        )
    ).first()
    return opted_out is None


_OPTED_OUT_HERE_OR_ABOVE = select(ChannelSettingRecord.id).where(
    col(ChannelSettingRecord.platform) == bindparam("platform"),
    col(ChannelSettingRecord.training_opt_out).is_(True),
    (col(ChannelSettingRecord.channel) == bindparam("channel"))
    | col(ChannelSettingRecord.channel).in_(
        select(ConversationRecord.parent_channel).where(
            col(ConversationRecord.platform) == bindparam("platform"),
            col(ConversationRecord.channel) == bindparam("channel"),
            col(ConversationRecord.parent_channel) != "",
        )
    ),
)


def set_training_opt_out(
    *, session: Session, platform: str, channel: str, opt_out: bool, updated_by: str
) -> None:
    """Turn training-data logging off (or back on) for a channel and its threads; the bot still
    answers.

    Off also withdraws the exchanges of the channel and its threads that no export has taken
    yet (``for_training`` becomes False, as for exchanges recorded while it is off): what was
    said there stays out of training, and turning training on again brings back only what is
    said from then on. Shards already written keep their lines. One transaction."""
    record = session.exec(
        select(ChannelSettingRecord).where(
            ChannelSettingRecord.platform == platform, ChannelSettingRecord.channel == channel
        )
    ).first()
    if record is None:
        record = ChannelSettingRecord(platform=platform, channel=channel, updated_at=utcnow())
    record.training_opt_out = opt_out
    record.updated_by = updated_by
    record.updated_at = utcnow()
    session.add(record)
    if opt_out:
        conversations = select(ConversationRecord.id).where(
            ConversationRecord.platform == platform,
            (col(ConversationRecord.channel) == channel)
            | (col(ConversationRecord.parent_channel) == channel),
        )
        session.execute(
            sql_update(ExchangeRecord)
            .where(
                col(ExchangeRecord.conversation_id).in_(conversations),
                col(ExchangeRecord.for_training).is_(True),
                ~exists().where(export_marks.c.exchange_id == ExchangeRecord.id),
            )
            .values(for_training=False)
        )
    session.commit()


@dataclass(frozen=True, slots=True)
class Forgotten:
    messages: int
    exchanges: int
    ratings: int


def _chunks(ids: list[int], size: int = 500) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def forget_user(*, session: Session, platform: str, user_id: str, user_pseudonym: str) -> Forgotten:
    """Delete a user's messages, the exchanges they are part of (with the bot's answers to
    them) and their ratings; record the deletion under the user's pseudonym. One transaction."""
    own = list(
        session.exec(
            select(MessageRecord.id).where(
                MessageRecord.platform == platform, MessageRecord.author_id == user_id
            )
        ).all()
    )
    exchange_ids: list[int] = []
    answers: list[int] = []
    for chunk in _chunks([i for i in own if i is not None]):
        rows = session.exec(
            select(ExchangeRecord.id, ExchangeRecord.answer_message_id).where(
                col(ExchangeRecord.user_message_id).in_(chunk)
                | col(ExchangeRecord.answer_message_id).in_(chunk)
            )
        ).all()
        exchange_ids.extend(row[0] for row in rows if row[0] is not None)
        answers.extend(row[1] for row in rows)
    doomed = sorted({*(i for i in own if i is not None), *answers})
    exchanges = len(set(exchange_ids))
    ratings = 0
    for chunk in _chunks(sorted(set(exchange_ids))):
        ratings += session.execute(
            sql_delete(RatingRecord).where(col(RatingRecord.exchange_id).in_(chunk))
        ).rowcount  # type: ignore[attr-defined]
        session.execute(sql_delete(ExchangeRecord).where(col(ExchangeRecord.id).in_(chunk)))
        # SQLite may hand a deleted exchange's id to the next new one, which a stale mark
        # would then pass off as exported.
        session.execute(sql_delete(export_marks).where(export_marks.c.exchange_id.in_(chunk)))
    ratings += session.execute(
        sql_delete(RatingRecord).where(
            col(RatingRecord.rater_id) == user_id,
            col(RatingRecord.exchange_id).in_(
                select(ExchangeRecord.id).where(
                    col(ExchangeRecord.conversation_id).in_(
                        select(ConversationRecord.id).where(ConversationRecord.platform == platform)
                    )
                )
            ),
        )
    ).rowcount  # type: ignore[attr-defined]
    for chunk in _chunks(doomed):
        session.execute(sql_delete(MessageRecord).where(col(MessageRecord.id).in_(chunk)))
    session.add(
        DeletionRecord(
            platform=platform,
            user_pseudonym=user_pseudonym,
            requested_at=utcnow(),
            messages_deleted=len(doomed),
            exchanges_deleted=exchanges,
        )
    )
    session.commit()
    return Forgotten(messages=len(doomed), exchanges=exchanges, ratings=ratings)
