"""Storage: SQLModel tables and the functions that read and write them.

SQLite (a file under the data directory, WAL mode, foreign keys on) is the embedded default;
any SQLAlchemy URL works. The schema is managed by Alembic (``bot/migrations``).

The functions take a keyword-only ``session`` and are synchronous; :class:`Store` runs them in
worker threads so the event loop never waits on the database. By concern:

- :mod:`bot.storage.tables`: the tables, their states, the near-duplicate text key;
- :mod:`bot.storage.database`: engine, sessions, migrations, the async :class:`Store`;
- :mod:`bot.storage.records`: recording messages, answers, edits, deletions, ratings;
- :mod:`bot.storage.claims`: which instance answers a message (crash recovery, replicas);
- :mod:`bot.storage.history`: reading conversations back;
- :mod:`bot.storage.delivery`: the queue of replies on their way to the platform;
- :mod:`bot.storage.privacy`: forget-me and per-channel training opt-out;
- :mod:`bot.storage.commands`: command deliveries already run (dedupe);
- :mod:`bot.storage.review`: corrections, the review queue and its verdicts;
- :mod:`bot.storage.browse`: what the dashboard reads (search, threads, activity, latency).
"""

from bot.storage.commands import claim_command
from bot.storage.database import (
    Database,
    StorageError,
    Store,
    StoreTime,
    create_database_engine,
)
from bot.storage.delivery import (
    RETRY_CLAIM_SECONDS,
    UndeliveredReply,
    set_delivery,
    undelivered_replies,
)
from bot.storage.history import (
    Counts,
    bot_is_in_conversation,
    conversation_history,
    conversation_thread_of,
    counts,
    last_export_summary,
)
from bot.storage.privacy import Forgotten, forget_user, set_training_opt_out, training_allowed
from bot.storage.records import (
    conversation_id_for,
    mark_message_deleted,
    record_agent_answer,
    record_answer,
    record_incoming,
    remove_rating,
    set_answer_state,
    set_rating,
    update_message_text,
)
from bot.storage.review import (
    ChannelSetting,
    ConversationHit,
    DeletionEntry,
    HourlyActivity,
    LatencySummary,
    ReviewItem,
    ReviewOutcome,
    ReviewStatus,
    ShardSummary,
    ThreadMessage,
    activity_by_hour,
    channel_settings,
    conversation_thread,
    correct_exchange,
    deletion_log,
    export_shards,
    pending_review_count,
    record_correction,
    reply_latency,
    review_exchange,
    review_queue,
    search_conversations,
)
from bot.storage.tables import (
    AnsweredBy,
    AnswerState,
    ChannelSettingRecord,
    ConversationRecord,
    DeletionRecord,
    DeliveryState,
    ExchangeRecord,
    ExchangeReviewRecord,
    ExportShardRecord,
    HandledCommandRecord,
    LeaseRecord,
    MessageRecord,
    RatingRecord,
    ReviewVerdict,
    export_marks,
    text_key,
)

__all__ = [
    "RETRY_CLAIM_SECONDS",
    "AnswerState",
    "AnsweredBy",
    "ChannelSetting",
    "ChannelSettingRecord",
    "ConversationHit",
    "ConversationRecord",
    "Counts",
    "Database",
    "DeletionEntry",
    "DeletionRecord",
    "DeliveryState",
    "ExchangeRecord",
    "ExchangeReviewRecord",
    "ExportShardRecord",
    "Forgotten",
    "HandledCommandRecord",
    "HourlyActivity",
    "LatencySummary",
    "LeaseRecord",
    "MessageRecord",
    "RatingRecord",
    "ReviewItem",
    "ReviewOutcome",
    "ReviewStatus",
    "ReviewVerdict",
    "ShardSummary",
    "StorageError",
    "Store",
    "StoreTime",
    "ThreadMessage",
    "UndeliveredReply",
    "activity_by_hour",
    "bot_is_in_conversation",
    "channel_settings",
    "claim_command",
    "conversation_history",
    "conversation_id_for",
    "conversation_thread",
    "conversation_thread_of",
    "correct_exchange",
    "counts",
    "create_database_engine",
    "deletion_log",
    "export_marks",
    "export_shards",
    "forget_user",
    "last_export_summary",
    "mark_message_deleted",
    "pending_review_count",
    "record_agent_answer",
    "record_answer",
    "record_correction",
    "record_incoming",
    "remove_rating",
    "reply_latency",
    "review_exchange",
    "review_queue",
    "search_conversations",
    "set_answer_state",
    "set_delivery",
    "set_rating",
    "set_training_opt_out",
    "text_key",
    "training_allowed",
    "undelivered_replies",
    "update_message_text",
]
