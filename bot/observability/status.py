"""The bot's current numbers, read where they live: the model service's scheduler, the
database and the training status beside the model registry.

Plain functions returning frozen dataclasses, shared by the Prometheus collectors
(:mod:`bot.observability.metrics`) and the dashboard's overview page. The model side is read
through small protocols (duck typing): ``bot`` does not import ``model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import text
from sqlmodel import Session

from bot.learning.selection import as_datetime


class SchedulerStatsLike(Protocol):
    """What :class:`model.batch_requests.SchedulerStats` holds that the metrics read."""

    active: int
    waiting: int
    finished: int
    steps: int
    largest_batch: int
    generated_tokens: int


class TrainingStatusSource(Protocol):
    """The model side's training status (:meth:`model.retrain.ModelControl.training_status`)."""

    def training_status(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ServingSnapshot:
    """The serving model now. The batch numbers are ``None`` for a model that is not batched
    here (the remote backend)."""

    model_version: str
    backend: str  # "local" or "remote"
    ready: bool
    batch_size: int | None = None  # rows in the running batch
    queue_depth: int | None = None  # requests waiting for a place in it
    largest_batch: int | None = None
    steps: int | None = None  # forward passes since the model was loaded
    finished_requests: int | None = None
    generated_tokens: int | None = None


def serving_snapshot(generator: Any) -> ServingSnapshot:
    """The serving numbers of ``generator`` (a model service, a remote model, a stand-in)."""
    version = str(getattr(generator, "version", "") or "")
    ready = bool(getattr(generator, "ready", True)) and bool(version)
    stats_of = getattr(generator, "stats", None)
    if not callable(stats_of):
        backend = "remote" if version.startswith("remote") else "local"
        return ServingSnapshot(model_version=version, backend=backend, ready=ready)
    stats: SchedulerStatsLike = stats_of()
    return ServingSnapshot(
        model_version=version,
        backend="local",
        ready=ready,
        batch_size=stats.active,
        queue_depth=stats.waiting,
        largest_batch=stats.largest_batch,
        steps=stats.steps,
        finished_requests=stats.finished,
        generated_tokens=getattr(stats, "generated_tokens", None),
    )


#: Answer states of user messages still waiting for, or denied, a reply.
WAITING_STATES = ("pending", "unanswered", "gave_up")


@dataclass(frozen=True, slots=True)
class BacklogSnapshot:
    """What waits in the database: messages without a reply, vetted exchanges not exported."""

    #: Per answer state (pending: being answered or waiting for it; unanswered: failed, for
    #: recovery; gave_up: too old to answer): how many user messages are in it.
    unanswered: dict[str, int] = field(default_factory=dict)
    #: When the oldest vetted exchange not yet exported was recorded (``None``: none waits).
    oldest_unexported_vetted: datetime | None = None
    last_export_at: datetime | None = None  # the newest export shard
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def export_lag_seconds(self) -> float:
        """The age of the oldest vetted exchange not yet exported (0 when none waits)."""
        if self.oldest_unexported_vetted is None:
            return 0.0
        return max(0.0, (self.at - self.oldest_unexported_vetted).total_seconds())


# Vetted as the export takes it: answered by a person (an agent or an admin's correction),
# rated up, or approved in the review queue; never one rejected or replaced by a correction.
# Left out as the export leaves them out: deleted messages, channels with training off.
_OLDEST_UNEXPORTED_VETTED = """
SELECT MIN(e.created_at) FROM exchanges e
JOIN messages q ON q.id = e.user_message_id
JOIN messages a ON a.id = e.answer_message_id
LEFT JOIN exchange_reviews v ON v.exchange_id = e.id
WHERE e.for_training = :yes
  AND q.deleted_at IS NULL AND a.deleted_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM export_marks x WHERE x.exchange_id = e.id)
  AND (v.verdict IS NULL OR v.verdict = 'approved')
  AND (v.verdict = 'approved'
       OR e.answered_by IN ('human_agent', 'correction')
       OR (SELECT COALESCE(SUM(r.value), 0) FROM ratings r WHERE r.exchange_id = e.id) > 0)
  AND e.conversation_id NOT IN (SELECT c.id FROM channel_settings s CROSS JOIN conversations c
                                WHERE s.training_opt_out = :yes AND c.platform = s.platform
                                  AND (c.channel = s.channel OR c.parent_channel = s.channel))
"""


def backlog_snapshot(session: Session, *, now: datetime | None = None) -> BacklogSnapshot:
    """Count the messages waiting for a reply and find the export lag (a few indexed
    queries; run it off the event loop: ``await store.run(backlog_snapshot)``)."""
    connection = session.connection()
    counts = dict.fromkeys(WAITING_STATES, 0)
    rows = connection.execute(
        text(
            "SELECT answer_state, COUNT(*) FROM messages "
            "WHERE answer_state IN ('pending', 'unanswered', 'gave_up') GROUP BY answer_state"
        )
    ).all()
    for state, count in rows:
        counts[str(state)] = int(count)
    oldest = connection.execute(text(_OLDEST_UNEXPORTED_VETTED), {"yes": True}).scalar_one()
    last_export = connection.execute(text("SELECT MAX(created_at) FROM export_shards")).scalar()
    return BacklogSnapshot(
        unanswered=counts,
        oldest_unexported_vetted=as_datetime(oldest) if oldest else None,
        last_export_at=as_datetime(last_export) if last_export else None,
        at=now or datetime.now(UTC),
    )


#: A training's last result: none (no training ended yet), promoted, kept (trained, not good
#: enough to serve), nothing (no data to train on), failed.
TRAINING_RESULTS = ("none", "promoted", "kept", "nothing", "failed")


@dataclass(frozen=True, slots=True)
class TrainingSnapshot:
    """Whether a training runs (on any replica), how the last one ended, what serves."""

    running: bool = False
    requested_by: str | None = None
    started_at: datetime | None = None
    last_result: str = "none"  # one of TRAINING_RESULTS
    finished_at: datetime | None = None
    last_version: int | None = None  # the version the last training produced
    serving_number: int = 0  # the registry's serving version (0: the base model)
    serving_label: str = "base model"


def training_snapshot(source: TrainingStatusSource | None) -> TrainingSnapshot:
    """The training status of ``source`` (none: nothing runs, nothing ran)."""
    if source is None:
        return TrainingSnapshot()
    status = source.training_status()
    result = str(status.get("last_result") or "none")
    last_version = status.get("last_version")
    return TrainingSnapshot(
        running=bool(status.get("running")),
        requested_by=status.get("requested_by"),
        started_at=_time(status.get("started_at")),
        last_result=result if result in TRAINING_RESULTS else "failed",
        finished_at=_time(status.get("finished_at")),
        last_version=last_version if isinstance(last_version, int) else None,
        serving_number=int(status.get("serving_number") or 0),
        serving_label=str(status.get("serving_label") or "base model"),
    )


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return as_datetime(value)
    except ValueError:
        return None
