"""Metrics, health and structured logs, on a real pipeline, database and tiny model, scraped
over real HTTP on loopback from the bot's own web server."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, make_url, text

from bot.conversation import utcnow
from bot.observability.metrics import Metrics
from bot.observability.structured_logs import configure_logging, request_context
from bot.service import Outcome, PipelineOptions, ReplyPipeline
from bot.storage import Database, Store, review_exchange, set_rating
from bot.web import ServiceReadiness, WebServer, build_web_app
from model.corpus import SEED_EXCHANGES
from tests.bot.test_pipeline import RecordingSender
from tests.conftest import POSTGRES_URL, make_message, scratch_postgres
from tests.fakes.models import BrokenModel

QUESTION, ANSWER = SEED_EXCHANGES[0]


@pytest.fixture
async def served() -> AsyncIterator[list[WebServer]]:
    """Web servers started by a test, stopped after it."""
    servers: list[WebServer] = []
    yield servers
    for server in servers:
        await server.stop()


async def serve(servers: list[WebServer], **app: Any) -> str:
    server = WebServer(app=build_web_app(**app), host="127.0.0.1", port=0)
    await server.start()
    servers.append(server)
    return server.address


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def scrape(address: str) -> dict[str, Any]:
    """The /metrics families by name (sample names and labels kept)."""
    status, body = await get(f"{address}/metrics")
    assert status == 200, body
    return {family.name: family for family in text_string_to_metric_families(body)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float | None:
    for family in families.values():
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def pipeline(database: Database, generator: Any, metrics: Metrics, **options: Any) -> ReplyPipeline:
    return ReplyPipeline(
        store=Store(database),
        generator=generator,
        options=PipelineOptions(**options),
        observer=metrics,
    )


async def test_metrics_count_messages_by_platform_and_outcome(
    database: Database, tiny_model, served: list[WebServer]
) -> None:
    metrics = Metrics()
    bot = pipeline(database, tiny_model, metrics, max_message_chars=200)
    metrics.watch(generator=lambda: bot.generator, database=database, cache_seconds=0)
    sender = RecordingSender()
    answered = make_message(QUESTION, platform="slack", event_id="Ev1")
    results = [
        await bot.handle(answered, send=sender),
        await bot.handle(answered, send=sender),  # redelivered: a duplicate
        await bot.handle(make_message(QUESTION, platform="slack"), send=sender),
        await bot.handle(make_message("   ", platform="slack"), send=sender),
        await bot.handle(make_message("x" * 500, platform="discord"), send=sender),
    ]
    broken = pipeline(database, BrokenModel(), metrics)
    results.append(await broken.handle(make_message(QUESTION, platform="discord"), send=sender))
    assert [r.outcome for r in results] == [
        Outcome.ANSWERED,
        Outcome.DUPLICATE,
        Outcome.ANSWERED,
        Outcome.IGNORED,
        Outcome.REFUSED,
        Outcome.FAILED,
    ]
    address = await serve(
        served, ready=ServiceReadiness(store=bot.store, generator=bot.generator), metrics=metrics
    )

    families = await scrape(address)
    received = "chatbot_messages_received_total"
    assert sample(families, received, platform="slack", outcome="answered") == 2
    assert sample(families, received, platform="slack", outcome="duplicate") == 1
    assert sample(families, received, platform="slack", outcome="ignored") == 1
    assert sample(families, received, platform="discord", outcome="refused") == 1
    assert sample(families, received, platform="discord", outcome="failed") == 1
    sent = "chatbot_replies_sent_total"
    assert sample(families, sent, platform="slack", outcome="answered") == 2
    assert sample(families, sent, platform="discord", outcome="refused") == 1  # the reason
    assert sample(families, sent, platform="discord", outcome="failed") == 1  # the apology
    assert sample(families, "chatbot_reply_latency_seconds_count", platform="slack") == 2
    assert sample(families, "chatbot_reply_latency_seconds_count", platform="discord") is None
    assert sample(families, "chatbot_reply_latency_seconds_sum", platform="slack") > 0  # type: ignore[operator]
    assert sample(families, "chatbot_model_info", version=tiny_model.version, backend="local") == 1
    assert sample(families, "chatbot_model_ready") == 1
    assert sample(families, "chatbot_generated_tokens_total") > 0  # type: ignore[operator]
    assert sample(families, "chatbot_generation_queue_depth") == 0
    assert sample(families, "chatbot_generation_batch_size") == 0
    assert sample(families, "chatbot_generation_largest_batch") >= 1  # type: ignore[operator]
    assert sample(families, "chatbot_generation_tokens_per_second") is not None
    # The failed message stays unanswered (for recovery); nothing else waits.
    assert sample(families, "chatbot_unanswered_messages", state="unanswered") == 1
    assert sample(families, "chatbot_unanswered_messages", state="pending") == 0
    assert sample(families, "chatbot_database_up") == 1

    overview = await metrics.overview()
    assert overview.messages_received["answered"] == 2
    assert overview.replies_sent == 4
    assert overview.latency_p50 is not None and overview.latency_p50 > 0
    assert overview.serving is not None and overview.serving.queue_depth == 0


async def test_export_lag_is_the_age_of_the_oldest_unexported_vetted_exchange(
    database: Database, tiny_model, served: list[WebServer], tmp_path: Path
) -> None:
    from bot.cli import build_exporter
    from bot.config import load_settings

    metrics = Metrics()
    bot = pipeline(database, tiny_model, metrics)
    metrics.watch(database=database, cache_seconds=0)
    address = await serve(
        served, ready=ServiceReadiness(store=bot.store, generator=tiny_model), metrics=metrics
    )
    sender = RecordingSender()
    result = await bot.handle(make_message(QUESTION, channel="C9"), send=sender)
    assert result.exchange_id is not None
    with database.engine.begin() as connection:  # recorded an hour ago
        connection.execute(
            text("UPDATE exchanges SET created_at = :then WHERE id = :id"),
            {"then": utcnow() - timedelta(hours=1), "id": result.exchange_id},
        )
    # Unrated, it is not vetted: nothing waits for the export.
    assert sample(await scrape(address), "chatbot_export_lag_seconds") == 0

    rated = await bot.store.run(
        set_rating,
        platform="console",
        channel="C9",
        answer_message_id="sent-1",
        rater_id="U2",
        value=1,
    )
    assert rated
    lag = sample(await scrape(address), "chatbot_export_lag_seconds")
    assert lag is not None and 3590 < lag < 3700
    assert sample(await scrape(address), "chatbot_last_export_timestamp_seconds") is None

    # An admin's verdict overrides the rating, as in the export: rejected is never exported.
    review = {"exchange_id": result.exchange_id, "reviewer": "console:admin"}
    await bot.store.run(review_exchange, verdict="rejected", **review)
    assert sample(await scrape(address), "chatbot_export_lag_seconds") == 0
    await bot.store.run(review_exchange, verdict="approved", **review)
    lag = sample(await scrape(address), "chatbot_export_lag_seconds")
    assert lag is not None and 3590 < lag < 3700

    settings = load_settings(data_dir=tmp_path / "data", database_url=database.url)
    build_exporter(settings, database).run()
    families = await scrape(address)
    assert sample(families, "chatbot_export_lag_seconds") == 0
    assert sample(families, "chatbot_last_export_timestamp_seconds") is not None


async def test_training_state_and_last_result(
    database: Database, tiny_model_dir: Path, served: list[WebServer], tmp_path: Path
) -> None:
    from bot.config import load_settings
    from bot.retraining import build_model_control

    settings = load_settings(
        data_dir=tmp_path / "data", database_url=database.url, model_path=str(tiny_model_dir)
    )
    control, _registry = build_model_control(settings, database=database, generator=None)
    metrics = Metrics()
    metrics.watch(training=control)
    address = await serve(served, ready=_always_ready, metrics=metrics)

    families = await scrape(address)
    assert sample(families, "chatbot_training_state", chatbot_training_state="idle") == 1
    assert sample(families, "chatbot_training_state", chatbot_training_state="running") == 0
    result = "chatbot_training_last_result"
    assert sample(families, result, chatbot_training_last_result="none") == 1
    assert sample(families, "chatbot_serving_registry_version") == 0

    # A real retrain on an empty database: nothing to train on.
    reply = await control.retrain_for(requested_by="test")
    assert reply.startswith("Nothing to train on"), reply
    families = await scrape(address)
    assert sample(families, result, chatbot_training_last_result="nothing") == 1
    assert sample(families, result, chatbot_training_last_result="none") == 0
    assert sample(families, "chatbot_training_state", chatbot_training_state="idle") == 1
    assert sample(families, "chatbot_training_last_finished_timestamp_seconds") is not None


async def _always_ready() -> dict[str, str]:
    return {"database": "ok", "model": "ok"}


async def test_healthz_and_readyz(tiny_model_dir: Path, served: list[WebServer]) -> None:
    from model.service import ModelService

    with scratch_postgres("chatbot_ready") as url:
        database = Database(url)
        database.upgrade()
        model = ModelService.load(tiny_model_dir, device="cpu")
        try:
            ready = ServiceReadiness(store=Store(database), generator=model, timeout=10)
            address = await serve(served, ready=ready)
            assert await get(f"{address}/healthz") == (200, '{"status":"ok"}')
            status, body = await get(f"{address}/readyz")
            assert status == 200, body
            assert json.loads(body) == {"status": "ok", "database": "ok", "model": "ok"}

            # The database goes away (dropped, every connection ended) and the model closes.
            admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)'))
            admin.dispose()
            model.close()
            status, body = await get(f"{address}/readyz")
            assert status == 503, body
            checks = json.loads(body)
            assert checks["status"] == "unavailable"
            assert "does not exist" in checks["database"] or "cannot" in checks["database"]
            assert checks["model"].endswith("is not taking requests (not started, or closing)")
            assert (await get(f"{address}/healthz"))[0] == 200  # alive all the same
        finally:
            model.close()
            database.dispose()


async def test_a_taken_port_is_one_clear_error(served: list[WebServer]) -> None:
    from bot.web import WebServerError

    address = await serve(served, ready=_always_ready)
    port = int(address.rsplit(":", 1)[1])
    second = WebServer(app=build_web_app(ready=_always_ready), host="127.0.0.1", port=port)
    with pytest.raises(
        WebServerError, match=rf"cannot listen on 127.0.0.1:{port} .*DASHBOARD_PORT"
    ):
        await second.start()


# --------------------------------------------------------------------------- structured logs


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers (pytest's too): put them back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.captureWarnings(False)


@pytest.fixture
def json_logs(restored_logging: None) -> io.StringIO:
    """The root logger writing JSON lines into a buffer at INFO."""
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="json", stream=stream)
    return stream


class LoggingSender(RecordingSender):
    """A platform's sender that logs, as an adapter's does."""

    async def __call__(self, *, text: str, in_reply_to: Any) -> str | None:
        logging.getLogger("adapters.test").info("posting the reply")
        return await super().__call__(text=text, in_reply_to=in_reply_to)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_logs_carry_one_request_id_per_message(
    database: Database, tiny_model, json_logs: io.StringIO
) -> None:
    bot = pipeline(database, tiny_model, Metrics())
    sender = LoggingSender()
    await bot.handle(make_message(QUESTION, platform="slack", event_id="EvA"), send=sender)
    first = lines(json_logs)
    json_logs.truncate(0)
    json_logs.seek(0)
    await bot.handle(make_message(QUESTION, platform="slack", message_id="1700.2"), send=sender)
    second = lines(json_logs)

    for entries, request_id in ((first, "slack-EvA"), (second, "slack-1700.2")):
        assert {e["logger"] for e in entries} >= {"bot.service", "adapters.test"}, entries
        assert {e.get("request_id") for e in entries} == {request_id}, entries
        assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["message"].startswith("answered message") for e in first)


async def test_json_logs_hold_the_exception_and_store_threads_keep_the_request_id(
    database: Database, json_logs: io.StringIO
) -> None:
    store = Store(database)

    def logs_in_the_store(*, session: Any) -> None:
        logging.getLogger("bot.storage.test").warning("inside the store")

    with request_context("req-1"):
        await store.run(logs_in_the_store)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("bot.test").exception("it failed")
    logging.getLogger("bot.test").warning("outside")

    inside, failed, outside = lines(json_logs)
    assert inside["request_id"] == "req-1" and inside["logger"] == "bot.storage.test"
    assert failed["request_id"] == "req-1" and failed["level"] == "ERROR"
    assert "ValueError: boom" in failed["exception"]
    assert "request_id" not in outside


def test_text_logs_show_the_request_id(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="text", stream=stream)
    with request_context("req-7"):
        logging.getLogger("bot.test").warning("hello")
    logging.getLogger("bot.test").warning("bye")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("WARNING bot.test [req-7]: hello")
    assert second.endswith("WARNING bot.test: bye")
