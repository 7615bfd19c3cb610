"""Prometheus metrics of one bot process, in a registry of its own (not the global one, so that
two apps in one process, or two tests, never share counts).

What the pipeline does is counted as it happens (:meth:`Metrics.handled`, the pipeline's
observer); the rest is read when scraped: the scheduler's stats, the database's backlog
(cached a few seconds: a scrape must not load the database) and the training status.

Metric names (every one prefixed ``chatbot_``):

- ``messages_received_total{platform,outcome}``: messages handled, by pipeline outcome
  (answered, refused, failed, ignored, duplicate);
- ``replies_sent_total{platform,outcome}``: replies that reached the platform (answers,
  refusals, apologies), by the outcome of the message answered;
- ``reply_latency_seconds{platform}``: histogram, arrival to answer delivered;
- ``generation_batch_size``, ``generation_largest_batch``, ``generation_queue_depth``,
  ``generation_steps_total``, ``generation_requests_total``, ``generated_tokens_total``,
  ``generation_tokens_per_second`` (local backend only);
- ``unanswered_messages{state}``, ``export_lag_seconds``, ``last_export_timestamp_seconds``,
  ``database_up``;
- ``training_state{chatbot_training_state}``, ``training_last_result{...}``,
  ``training_last_finished_timestamp_seconds``, ``serving_registry_version``;
- ``model_info{version,backend}``, ``model_ready``.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from bot.contracts import Outcome, PipelineResult
from bot.observability.status import (
    TRAINING_RESULTS,
    WAITING_STATES,
    BacklogSnapshot,
    ServingSnapshot,
    TrainingSnapshot,
    TrainingStatusSource,
    backlog_snapshot,
    serving_snapshot,
    training_snapshot,
)
from bot.storage import Database

logger = logging.getLogger(__name__)

#: Reply latency buckets (seconds): a fast CPU reply is a tenth of a second, a slow one with a
#: queue tens of seconds, the generation timeout two minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: How many recent reply latencies the overview's p50/p99 are taken over.
RECENT_LATENCIES = 1000
#: Seconds of token counts the tokens/s gauge averages over.
RATE_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Overview:
    """The current numbers, for the dashboard's overview page (:meth:`Metrics.overview`)."""

    serving: ServingSnapshot | None
    tokens_per_second: float
    messages_received: dict[str, int]  # by outcome, all platforms, since start
    replies_sent: int
    latency_p50: float | None  # seconds, over the recent answers of this process
    latency_p99: float | None
    backlog: BacklogSnapshot | None  # None: the database did not answer
    training: TrainingSnapshot | None


class TokenRate:
    """Tokens a second over the last :data:`RATE_WINDOW` seconds, from a growing count read
    now and then (a scrape, a page view). A count that goes down (a hot swap started a new
    scheduler) starts the window afresh."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def observe(self, tokens: int, *, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._samples and tokens < self._samples[-1][1]:
                self._samples.clear()
            self._samples.append((now, tokens))
            # Keep one sample at least a window old, so the rate spans the whole window.
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()
            first_time, first_tokens = self._samples[0]
            if now - first_time <= 0:
                return 0.0
            return (tokens - first_tokens) / (now - first_time)


class _Cached:
    """The backlog snapshot, computed at most every ``seconds`` (None when the query failed)."""

    def __init__(self, database: Database, seconds: float) -> None:
        self.database = database
        self.seconds = seconds
        self._value: BacklogSnapshot | None = None
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> BacklogSnapshot | None:
        with self._lock:
            if time.monotonic() - self._at < self.seconds:
                return self._value
            try:
                with self.database.session() as session:
                    self._value = backlog_snapshot(session)
            except Exception as error:
                reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
                logger.warning("metrics: the database did not answer: %s", reason)
                self._value = None
            self._at = time.monotonic()
            return self._value


class Metrics:
    """The metrics of one bot process. Give it to the pipeline as its observer, and
    :meth:`watch` the model, database and training; :meth:`render` is the ``/metrics`` body.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.received = Counter(
            "chatbot_messages_received",
            "Messages the pipeline handled, by platform and outcome.",
            ["platform", "outcome"],
            registry=self.registry,
        )
        self.sent = Counter(
            "chatbot_replies_sent",
            "Replies that reached the platform, by platform and the outcome of the message.",
            ["platform", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "chatbot_reply_latency_seconds",
            "Seconds from a message's arrival to its answer delivered.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._recent: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self.token_rate = TokenRate()
        self._generator: Callable[[], Any] | None = None
        self._backlog: _Cached | None = None
        self._training: TrainingStatusSource | None = None
        self._watched = False

    # --- the pipeline's observer ------------------------------------------------------------

    def handled(self, *, platform: str, result: PipelineResult, seconds: float) -> None:
        """Count one handled message (:class:`bot.contracts.PipelineObserver`)."""
        outcome = result.outcome.value
        self.received.labels(platform=platform, outcome=outcome).inc()
        if result.delivered:
            self.sent.labels(platform=platform, outcome=outcome).inc()
            if result.outcome is Outcome.ANSWERED:
                self.latency.labels(platform=platform).observe(seconds)
                self._recent.append(seconds)

    # --- what is read at scrape time --------------------------------------------------------

    def watch(
        self,
        *,
        generator: Callable[[], Any] | None = None,
        database: Database | None = None,
        training: TrainingStatusSource | None = None,
        cache_seconds: float = 5.0,
    ) -> None:
        """Read these when scraped: ``generator()`` the serving model (a callable: a hot swap
        or a test may replace it), the database's backlog (cached ``cache_seconds``) and the
        training status. Once per :class:`Metrics`."""
        if self._watched:
            raise RuntimeError("Metrics.watch was called already")
        self._watched = True
        self._generator = generator
        self._backlog = _Cached(database, cache_seconds) if database is not None else None
        self._training = training
        self.registry.register(_ScrapeTime(self))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (blocking: the database may be read)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def overview(self) -> Overview:
        """The current numbers for the dashboard (its blocking reads off the event loop)."""
        return await asyncio.to_thread(self._overview)

    def _overview(self) -> Overview:
        serving = self.serving()
        received: dict[str, int] = {}
        sent = 0
        for family in (self.received, self.sent):
            for metric in family.collect():
                for sample in metric.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    if family is self.sent:
                        sent += int(sample.value)
                    else:
                        outcome = sample.labels["outcome"]
                        received[outcome] = received.get(outcome, 0) + int(sample.value)
        recent = sorted(self._recent)
        p50 = p99 = None
        if recent:
            p50 = statistics.median(recent)
            p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))]
        return Overview(
            serving=serving,
            tokens_per_second=self.tokens_per_second(serving),
            messages_received=received,
            replies_sent=sent,
            latency_p50=p50,
            latency_p99=p99,
            backlog=self.backlog(),
            training=self.training(),
        )

    def serving(self) -> ServingSnapshot | None:
        generator = self._generator() if self._generator is not None else None
        return None if generator is None else serving_snapshot(generator)

    def tokens_per_second(self, serving: ServingSnapshot | None) -> float:
        if serving is None or serving.generated_tokens is None:
            return 0.0
        return self.token_rate.observe(serving.generated_tokens)

    def backlog(self) -> BacklogSnapshot | None:
        return self._backlog.get() if self._backlog is not None else None

    def training(self) -> TrainingSnapshot | None:
        if self._training is None:
            return None
        try:
            return training_snapshot(self._training)
        except Exception as error:  # a half-written registry must not fail the scrape
            logger.warning("metrics: could not read the training status: %s", error)
            return None


class _ScrapeTime(Collector):
    """The metrics read when scraped, from what :meth:`Metrics.watch` was given."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # nothing read at registration (it would query the database)

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        serving = metrics.serving()
        if serving is not None:
            yield from _serving_families(serving, metrics.tokens_per_second(serving))
        if metrics._backlog is not None:
            yield from _backlog_families(metrics.backlog())
        training = metrics.training()
        if training is not None:
            yield from _training_families(training)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _serving_families(serving: ServingSnapshot, tokens_per_second: float) -> Iterable[Metric]:
    info = InfoMetricFamily("chatbot_model", "The model serving new requests.")
    info.add_metric([], {"version": serving.model_version, "backend": serving.backend})
    yield info
    yield _gauge("chatbot_model_ready", "1 when the model takes requests.", float(serving.ready))
    if serving.batch_size is None:
        return
    yield _gauge(
        "chatbot_generation_batch_size", "Rows in the running batch.", serving.batch_size or 0
    )
    yield _gauge(
        "chatbot_generation_largest_batch",
        "The most rows one step decoded since the model was loaded.",
        serving.largest_batch or 0,
    )
    yield _gauge(
        "chatbot_generation_queue_depth",
        "Requests waiting for a place in the batch.",
        serving.queue_depth or 0,
    )
    for name, documentation, value in (
        ("chatbot_generation_steps", "Forward passes of the serving model.", serving.steps),
        (
            "chatbot_generation_requests",
            "Generation requests ended (answered, failed, cancelled or timed out).",
            serving.finished_requests,
        ),
        ("chatbot_generated_tokens", "Tokens generated.", serving.generated_tokens),
    ):
        yield CounterMetricFamily(name, documentation, value=value or 0)
    yield _gauge(
        "chatbot_generation_tokens_per_second",
        f"Tokens generated a second over the last {RATE_WINDOW:.0f} s.",
        tokens_per_second,
    )


def _backlog_families(backlog: BacklogSnapshot | None) -> Iterable[Metric]:
    yield _gauge("chatbot_database_up", "1 when the database answered.", float(backlog is not None))
    if backlog is None:
        return
    unanswered = GaugeMetricFamily(
        "chatbot_unanswered_messages",
        "User messages without a reply, by answer state (pending, unanswered, gave_up).",
        labels=["state"],
    )
    for state in WAITING_STATES:
        unanswered.add_metric([state], backlog.unanswered.get(state, 0))
    yield unanswered
    yield _gauge(
        "chatbot_export_lag_seconds",
        "Age of the oldest vetted exchange not yet exported (0: none waits).",
        backlog.export_lag_seconds,
    )
    if backlog.last_export_at is not None:
        yield _gauge(
            "chatbot_last_export_timestamp_seconds",
            "When the newest export shard was written (Unix time).",
            backlog.last_export_at.timestamp(),
        )


def _training_families(training: TrainingSnapshot) -> Iterable[Metric]:
    yield StateSetMetricFamily(
        "chatbot_training_state",
        "Whether a training runs (on any replica).",
        value={"idle": not training.running, "running": training.running},
    )
    yield StateSetMetricFamily(
        "chatbot_training_last_result",
        "How the last training ended.",
        value={result: training.last_result == result for result in TRAINING_RESULTS},
    )
    if training.finished_at is not None:
        yield _gauge(
            "chatbot_training_last_finished_timestamp_seconds",
            "When the last training ended (Unix time).",
            training.finished_at.timestamp(),
        )
    yield _gauge(
        "chatbot_serving_registry_version",
        "The registry's serving version number (0: the base model).",
        training.serving_number,
    )
