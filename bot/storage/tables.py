"""The tables (SQLModel), their states and the near-duplicate text key."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Table, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class AnswerState(StrEnum):
    """Where a user message stands."""

    PENDING = "pending"  # stored, reply not yet generated
    ANSWERED = "answered"
    UNANSWERED = "unanswered"  # generation or storage of the reply failed
    IGNORED = "ignored"  # nothing to answer (empty text)
    GAVE_UP = "gave_up"  # still unanswered when it grew too old to answer (recovery)
    REFUSED = "refused"  # refused with a reason (too long); stored once, for dedupe


class DeliveryState(StrEnum):
    """Where a bot reply stands on its way to the platform."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # kept for a later retry
    RETRYING = "retrying"  # claimed from the retry queue by one instance


class AnsweredBy(StrEnum):
    BOT = "bot"
    HUMAN_AGENT = "human_agent"
    CORRECTION = "correction"  # an admin's better answer to a bot reply (``!correct``)


def _timestamp(**kwargs: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kwargs))


class ConversationRecord(SQLModel, table=True):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("platform", "workspace", "channel", "thread", name="uq_conversation_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=32)
    workspace: str = Field(max_length=255)
    channel: str = Field(max_length=255)
    thread: str = Field(max_length=255)
    # The channel a thread lives in ("" when none): a channel's training opt-out covers them.
    parent_channel: str = Field(default="", max_length=255)
    created_at: datetime = _timestamp(nullable=False)


class MessageRecord(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        # Duplicate deliveries (platform retries, one message sent as two event types) are
        # refused by the database itself, so dedupe holds across restarts and instances.
        UniqueConstraint("platform", "event_id", name="uq_message_event"),
        UniqueConstraint(
            "platform", "channel", "platform_message_id", name="uq_message_platform_id"
        ),
        # The recovery pass and the delivery queue look rows up by state; without these they
        # would scan the whole table.
        Index("ix_messages_answer_queue", "answer_state", "stored_at"),
        Index("ix_messages_delivery_queue", "delivery_state", "platform"),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", index=True, ondelete="CASCADE")
    platform: str = Field(max_length=32)
    channel: str = Field(max_length=255)
    platform_message_id: str | None = Field(default=None, max_length=255)
    event_id: str | None = Field(default=None, max_length=255)
    author_id: str = Field(max_length=255, index=True)
    author_name: str = Field(default="", max_length=255)
    role: str = Field(max_length=32)
    text: str = Field(sa_column=Column(Text, nullable=False))
    is_direct: bool = False
    mentions_bot: bool = False
    # A 64-bit key of the normalised text (see ``text_key``): near-duplicate questions share it.
    text_key: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    answer_state: str | None = Field(default=None, max_length=16)  # user messages
    delivery_state: str | None = Field(default=None, max_length=16)  # bot replies
    sent_at: datetime = _timestamp(nullable=False)  # when the author sent it
    stored_at: datetime = _timestamp(nullable=False)
    edited_at: datetime | None = _timestamp(nullable=True)
    deleted_at: datetime | None = _timestamp(nullable=True)
    # When an instance claimed this reply from the retry queue; a claim older than
    # RETRY_CLAIM_SECONDS is taken to be from a crashed instance and can be claimed again.
    delivery_claimed_at: datetime | None = _timestamp(nullable=True)
    # User messages: which instance is answering it and since when (crash recovery claims a
    # message whose claimant is gone), and the platform id of the placeholder or partially
    # streamed reply shown for it, so a recovered reply replaces it instead of adding another.
    answer_claimed_by: str | None = Field(default=None, max_length=128)
    answer_claimed_at: datetime | None = _timestamp(nullable=True)
    reply_placeholder_id: str | None = Field(default=None, max_length=255)
    # How many chunks of its reply are complete on the platform when only part of the reply
    # got there: the retry posts only the rest (see bot.service.PartialDelivery).
    reply_chunks_sent: int | None = Field(default=None)


class ExchangeRecord(SQLModel, table=True):
    """A user turn and the answer to it, from the bot or a human agent."""

    __tablename__ = "exchanges"
    __table_args__ = (
        UniqueConstraint("user_message_id", "answer_message_id", name="uq_exchange_pair"),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", index=True, ondelete="CASCADE")
    user_message_id: int = Field(foreign_key="messages.id", index=True, ondelete="CASCADE")
    answer_message_id: int = Field(foreign_key="messages.id", index=True, ondelete="CASCADE")
    answered_by: str = Field(max_length=16)
    model_version: str | None = Field(default=None, max_length=255)
    created_at: datetime = _timestamp(nullable=False)
    # False when the channel had training turned off at the time: never exported.
    for_training: bool = True


class ReviewVerdict(StrEnum):
    """An admin's verdict on an exchange (the review queue, ``!review``)."""

    APPROVED = "approved"  # training data, exported like a 👍-rated reply
    REJECTED = "rejected"  # never exported, whatever its ratings
    CORRECTED = "corrected"  # replaced by a correction exchange; never exported itself


class ExchangeReviewRecord(SQLModel, table=True):
    """The latest verdict on an exchange: one row per exchange, a new review replaces it."""

    __tablename__ = "exchange_reviews"
    __table_args__ = (UniqueConstraint("exchange_id", name="uq_exchange_review"),)

    id: int | None = Field(default=None, primary_key=True)
    exchange_id: int = Field(foreign_key="exchanges.id", ondelete="CASCADE")
    verdict: str = Field(max_length=16)
    reviewer: str = Field(max_length=255)
    reviewed_at: datetime = _timestamp(nullable=False)


class RatingRecord(SQLModel, table=True):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("exchange_id", "rater_id", name="uq_rating_rater"),)

    id: int | None = Field(default=None, primary_key=True)
    exchange_id: int = Field(foreign_key="exchanges.id", index=True, ondelete="CASCADE")
    rater_id: str = Field(max_length=255)
    value: int  # +1 or -1
    created_at: datetime = _timestamp(nullable=False)


class ChannelSettingRecord(SQLModel, table=True):
    """Per-channel switches set by admins."""

    __tablename__ = "channel_settings"
    __table_args__ = (UniqueConstraint("platform", "channel", name="uq_channel_setting"),)

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=32)
    channel: str = Field(max_length=255)
    training_opt_out: bool = False
    updated_by: str = Field(default="", max_length=255)
    updated_at: datetime = _timestamp(nullable=False)


class ExportShardRecord(SQLModel, table=True):
    """One committed export shard; its files live in a folder named ``name``."""

    __tablename__ = "export_shards"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    created_at: datetime = _timestamp(nullable=False)
    exchange_count: int
    superseded_count: int
    first_exchange_at: datetime | None = _timestamp(nullable=True)
    last_exchange_at: datetime | None = _timestamp(nullable=True)
    schema_version: int
    content_hash: str = Field(max_length=64)


#: Which export shard consumed each exchange (written, or superseded by a newer near-duplicate):
#: one row per exchange, appended in the transaction that records the shard. A narrow table
#: with one index and no foreign key: marking a million exchanges is one insert (about a second
#: on PostgreSQL), where updating a column of ``exchanges`` took half a minute (a new version of
#: every row, six indexes, a foreign-key check per row). Rows of exchanges deleted later are
#: harmless: an id is never reused while a mark holds it, as marks only grow.
export_marks = Table(
    "export_marks",
    SQLModel.metadata,
    Column("exchange_id", BigInteger, nullable=False, index=True),
    Column("shard_id", BigInteger, nullable=False),
)


class HandledCommandRecord(SQLModel, table=True):
    """A command delivery already run: a redelivery or a replayed request never runs it twice.

    ``delivery_key`` identifies the delivery on its platform: the message for ``!word``
    commands, the trigger or interaction id for slash commands.
    """

    __tablename__ = "handled_commands"
    __table_args__ = (UniqueConstraint("platform", "delivery_key", name="uq_handled_command"),)

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=32)
    delivery_key: str = Field(max_length=255)
    command: str = Field(max_length=64)
    handled_at: datetime = _timestamp(nullable=False)


class DeletionRecord(SQLModel, table=True):
    """A forget-me request: kept so that training can drop earlier shards' lines of the user."""

    __tablename__ = "deletions"

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=32)
    user_pseudonym: str = Field(max_length=64, index=True)
    requested_at: datetime = _timestamp(nullable=False)
    messages_deleted: int
    exchanges_deleted: int


class LeaseRecord(SQLModel, table=True):
    """A named lease: one holder at a time across every instance sharing the database."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=128)
    expires_at: datetime = _timestamp(nullable=False)


_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def text_key(text: str) -> int:
    """A signed 64-bit key of ``text`` with case, punctuation and spacing ignored.

    "How do I reset my password?" and "how do i reset my password" share a key; the export
    uses it to send near-duplicate questions once.
    """
    normalised = " ".join(_NOT_WORD.sub(" ", text.casefold()).split())
    digest = hashlib.blake2b(normalised.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
