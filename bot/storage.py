"""Storage: SQLModel tables and the functions that read and write them.

SQLite (a file under the data directory, WAL mode, foreign keys on) is the embedded default;
any SQLAlchemy URL works. The schema is managed by Alembic (``bot/migrations``).

The functions take a keyword-only ``session`` and are synchronous; :class:`Store` runs them in
worker threads so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from bot.conversation import IncomingMessage, Role, Turn, storable_text, utcnow

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StorageError(Exception):
    """The database cannot be used; the message says why."""


class AnswerState(StrEnum):
    """Where a user message stands."""

    PENDING = "pending"  # stored, reply not yet generated
    ANSWERED = "answered"
    UNANSWERED = "unanswered"  # generation or storage of the reply failed
    IGNORED = "ignored"  # nothing to answer (empty text)


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


# --------------------------------------------------------------------------- engine


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def create_database_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite, creates the file's folder and turns on WAL and FKs."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"DATABASE_URL is not a valid SQLAlchemy URL: {url!r}") from None
    if _is_sqlite(url):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            # Text written by other tools may hold invalid UTF-8; read it with U+FFFD instead
            # of failing the whole query.
            dbapi_connection.text_factory = _decode_text

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as error:
        raise StorageError(
            f"cannot use DATABASE_URL {parsed.render_as_string()}: {error}"
        ) from None


def _describe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """Owns the engine; hands out sessions; upgrades the schema."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_database_engine(url)

    def check_connection(self) -> None:
        """Raise :class:`StorageError` with a one-line reason when the database is unreachable."""
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as error:
            reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
            raise StorageError(
                f"cannot reach the database at {_describe(self.url)}: {reason}"
            ) from None

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from bot.migrations import upgrade_to_head

        self.check_connection()
        upgrade_to_head(self.engine)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def dispose(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------- queries


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


def training_allowed(*, session: Session, platform: str, channel: str) -> bool:
    """Whether exchanges in this channel may become training data (no admin opt-out)."""
    opted_out = session.exec(
        select(ChannelSettingRecord.training_opt_out).where(
            ChannelSettingRecord.platform == platform, ChannelSettingRecord.channel == channel
        )
    ).first()
    return not opted_out


def set_training_opt_out(
    *, session: Session, platform: str, channel: str, opt_out: bool, updated_by: str
) -> None:
    """Turn training-data logging off (or back on) for a channel; the bot still answers."""
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
    session.commit()


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


# --------------------------------------------------------------------------- async facade


class Store:
    """Runs the storage functions in worker threads, one session per call."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def run(self, function: Callable[..., T], /, **kwargs: Any) -> T:
        """Call ``function(session=..., **kwargs)`` in a worker thread.

        Raises:
            StorageError: the database failed (unreachable, locked, schema missing).
        """
        return await asyncio.to_thread(self._call, function, kwargs)

    def _call(self, function: Callable[..., T], kwargs: dict[str, Any]) -> T:
        try:
            with self.database.session() as session:
                return function(session=session, **kwargs)
        except (OperationalError, SQLAlchemyError) as error:
            if isinstance(error, IntegrityError):
                raise
            reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
            raise StorageError(f"database error: {reason}") from error


# --------------------------------------------------------------------------- platform events


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
            )
        )
    return replies


# --------------------------------------------------------------------------- privacy


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
