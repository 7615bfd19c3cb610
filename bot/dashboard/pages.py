"""What each page shows, read from the store, the model registry and the model service.

Every read runs off the event loop (:meth:`bot.storage.Store.run` for the database,
``asyncio.to_thread`` for the registry's files). The registry and the model service are seen
through small protocols: ``bot`` does not import ``model``; the composition root wires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from markupsafe import Markup

from bot.dashboard.charts import HourBars, activity_chart
from bot.storage import (
    ConversationHit,
    DeletionEntry,
    ReviewItem,
    ShardSummary,
    Store,
    ThreadMessage,
    activity_by_hour,
    channel_settings,
    conversation_thread,
    counts,
    deletion_log,
    export_shards,
    last_export_summary,
    pending_review_count,
    reply_latency,
    review_queue,
    search_conversations,
)

#: The Data page lists the channels of this many of the newest conversations.
CHANNELS_FROM_CONVERSATIONS = 200


class ModelVersionInfo(Protocol):
    """A registry version (:class:`model.registry.ModelVersion`)."""

    @property
    def number(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def metadata(self) -> dict[str, Any]: ...


class ModelRegistry(Protocol):
    """What the pages read of :class:`model.registry.Registry`."""

    def versions(self) -> Sequence[ModelVersionInfo]: ...

    def pointer(self) -> tuple[int, list[int]]: ...


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """The model service's scheduler now: rows decoding, requests waiting for a place."""

    active: int
    waiting: int


@dataclass(frozen=True, kw_only=True)
class DashboardSources:
    """Where the pages read from."""

    store: Store
    registry: ModelRegistry
    #: The serving model's version string (the one stored with each reply).
    serving_version: Callable[[], str]
    #: The local model service's queue; ``None`` for a remote model.
    queue_depth: Callable[[], QueueDepth | None]
    #: Who is training now (any replica), from the registry's status file; ``None`` if nobody.
    training_running: Callable[[], Mapping[str, Any] | None]
    #: ``pseudonymize(platform, user_id)``: the export's pseudonyms, to search users by.
    pseudonymize: Callable[[str, str], str]
    export_dir: Path


# --- model versions -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MetricRow:
    name: str
    before: str
    after: str


@dataclass(frozen=True, kw_only=True)
class VersionView:
    """One model version as the Training page shows it."""

    number: int
    label: str
    serving: bool
    created_at: str
    triggered_by: str
    promoted: bool
    decision: str
    exchanges_trained: int | None
    exchanges_held_out: int | None
    shards: tuple[str, ...]
    metrics: tuple[MetricRow, ...]
    has_loss_curve: bool
    model_version: str
    seconds: float | None
    method: str
    holds_forgotten: int  # forgotten users whose data this version learned

    @property
    def kept_candidate(self) -> bool:
        return self.number > 0 and not self.promoted


def _score(score: Mapping[str, Any]) -> str:
    total = score.get("total", 0)
    if not total:
        return "–"
    loss = score.get("loss")
    text = f"{score.get('normalised', 0)}/{total} ({score.get('exact', 0)} exact)"
    return f"{text}, loss {loss:.3f}" if isinstance(loss, int | float) else text


def _version_view(
    version: ModelVersionInfo, *, serving: int, forgotten: Mapping[str, datetime]
) -> VersionView:
    meta = version.metadata
    metrics = meta.get("metrics") or {}
    before, after = metrics.get("before", {}), metrics.get("after", {})
    exchanges = meta.get("exchanges") or {}
    created = _parse_time(meta.get("created_at"))
    learned = set(meta.get("pseudonyms", ()))
    holding = sum(
        1
        for pseudonym, asked in forgotten.items()
        if pseudonym in learned and (created is None or asked > created)
    )
    training = meta.get("training") or {}
    return VersionView(
        number=version.number,
        label="base model" if version.number == 0 else f"version {version.number}",
        serving=version.number == serving,
        created_at=f"{created:%Y-%m-%d %H:%M} UTC" if created else "",
        triggered_by=str(meta.get("triggered_by", "")),
        promoted=bool(meta.get("promoted")) or version.number == 0,
        decision=str(meta.get("decision", "")),
        exchanges_trained=exchanges.get("train"),
        exchanges_held_out=exchanges.get("held_out"),
        shards=tuple(str(shard) for shard in meta.get("shards", ())),
        metrics=tuple(
            MetricRow(name=name, before=_score(before.get(name, {})), after=_score(score))
            for name, score in after.items()
        ),
        has_loss_curve=bool(meta.get("loss_curve")),
        model_version=str(meta.get("model_version", "")),
        seconds=meta.get("seconds"),
        method=str(training.get("method", "")),
        holds_forgotten=holding,
    )


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def versions(
    sources: DashboardSources, forgotten: Mapping[str, datetime] | None = None
) -> list[VersionView]:
    """Every version, newest first."""

    def read() -> list[VersionView]:
        serving = sources.registry.pointer()[0]
        found = sources.registry.versions()
        return [
            _version_view(version, serving=serving, forgotten=forgotten or {})
            for version in sorted(found, key=lambda v: v.number, reverse=True)
        ]

    return await asyncio.to_thread(read)


async def forgotten_users(sources: DashboardSources) -> dict[str, datetime]:
    """Pseudonym -> when that user asked to be forgotten (the latest time)."""
    entries = await sources.store.run(deletion_log)
    forgotten: dict[str, datetime] = {}
    for entry in entries:
        asked = entry.requested_at
        if asked.tzinfo is None:
            asked = asked.replace(tzinfo=UTC)
        pseudonym = entry.user_pseudonym
        forgotten[pseudonym] = max(asked, forgotten.get(pseudonym, asked))
    return forgotten


# --- pages ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Overview:
    serving_version: str
    current: VersionView | None
    chart: Markup
    messages_24h: int
    replies_24h: int
    latency_p50: float | None
    latency_p99: float | None
    queue: QueueDepth | None
    unanswered: int
    gave_up: int
    pending_review: int
    last_export: str
    training_running: Mapping[str, Any] | None


async def overview(sources: DashboardSources, *, now: datetime | None = None) -> Overview:
    now = now or datetime.now(UTC)
    activity = await sources.store.run(activity_by_hour, hours=24, now=now)
    latency = await sources.store.run(reply_latency, since=now - timedelta(hours=24))
    numbers = await sources.store.run(counts)
    pending = await sources.store.run(pending_review_count)
    last_export = await sources.store.run(last_export_summary)
    all_versions = await versions(sources)
    bars = [HourBars(hour=h.hour, messages=h.messages_in, replies=h.replies_out) for h in activity]
    return Overview(
        serving_version=sources.serving_version(),
        current=next((v for v in all_versions if v.serving), None),
        chart=activity_chart(bars),
        messages_24h=sum(bar.messages for bar in bars),
        replies_24h=sum(bar.replies for bar in bars),
        latency_p50=latency.p50_seconds,
        latency_p99=latency.p99_seconds,
        queue=sources.queue_depth(),
        unanswered=numbers.unanswered,
        gave_up=numbers.gave_up,
        pending_review=pending,
        last_export=last_export or "never",
        training_running=await asyncio.to_thread(sources.training_running),
    )


@dataclass(frozen=True, kw_only=True)
class Search:
    """The Conversations page's query, as typed."""

    text: str = ""
    platform: str = ""
    channel: str = ""
    user: str = ""  # a pseudonym (``user-…``)

    @property
    def empty(self) -> bool:
        return not (self.text or self.platform or self.channel or self.user)


async def search(sources: DashboardSources, query: Search) -> list[ConversationHit]:
    """Conversations matching every field given (the newest first)."""
    return await sources.store.run(
        search_conversations,
        text=query.text.strip() or None,
        platform=query.platform.strip() or None,
        channel=query.channel.strip() or None,
        author_pseudonym=query.user.strip() or None,
        pseudonymize=sources.pseudonymize,
        limit=50,
    )


async def thread(sources: DashboardSources, conversation_id: int) -> list[ThreadMessage]:
    return await sources.store.run(
        conversation_thread, conversation_id=conversation_id, pseudonymize=sources.pseudonymize
    )


async def review(sources: DashboardSources, *, limit: int = 50) -> tuple[list[ReviewItem], int]:
    """The exchanges awaiting review (oldest first) and how many there are in all."""
    items = await sources.store.run(review_queue, limit=limit)
    return items, await sources.store.run(pending_review_count)


@dataclass(frozen=True, kw_only=True)
class Training:
    versions: list[VersionView]
    serving: int
    can_roll_back: bool
    running: Mapping[str, Any] | None


async def training(sources: DashboardSources) -> Training:
    forgotten = await forgotten_users(sources)
    found = await versions(sources, forgotten)
    serving, history = await asyncio.to_thread(sources.registry.pointer)
    return Training(
        versions=found,
        serving=serving,
        can_roll_back=bool(history),
        running=await asyncio.to_thread(sources.training_running),
    )


@dataclass(frozen=True, kw_only=True)
class ChannelRow:
    platform: str
    channel: str
    training_opt_out: bool
    updated_by: str


@dataclass(frozen=True, kw_only=True)
class Privacy:
    shards: list[ShardSummary]
    channels: list[ChannelRow]
    deletions: list[DeletionEntry]
    holding: list[VersionView]  # versions that learned from users forgotten since


async def privacy(sources: DashboardSources) -> Privacy:
    forgotten = await forgotten_users(sources)
    found = await versions(sources, forgotten)
    settings = await sources.store.run(channel_settings)
    # Channels with a switch, and the channels of the newest conversations (training on).
    rows = {
        (s.platform, s.channel): ChannelRow(
            platform=s.platform,
            channel=s.channel,
            training_opt_out=s.training_opt_out,
            updated_by=s.updated_by,
        )
        for s in settings
    }
    for hit in await sources.store.run(search_conversations, limit=CHANNELS_FROM_CONVERSATIONS):
        key = (hit.platform, hit.parent_channel or hit.channel)
        rows.setdefault(
            key,
            ChannelRow(platform=key[0], channel=key[1], training_opt_out=False, updated_by=""),
        )
    return Privacy(
        shards=await sources.store.run(export_shards),
        channels=sorted(rows.values(), key=lambda row: (row.platform, row.channel)),
        deletions=await sources.store.run(deletion_log),
        holding=[version for version in found if version.holds_forgotten],
    )
