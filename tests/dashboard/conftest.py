"""A running bot web server with the dashboard, wired the way ``chatbot run`` wires it
(bot.cli: pipeline, commands, model control, web_routers, build_web_app, WebServer), on a real
SQLite database seeded through the reply pipeline, a real tiny model and a model registry with
two versions trained (version 1 serving, version 2 kept)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from bot.cli import build_commands, build_pipeline, web_routers
from bot.config import Settings
from bot.conversation import IncomingMessage, Role
from bot.dashboard import Dashboard, DashboardRouter
from bot.learning import Pseudonymizer, load_pseudonym_key
from bot.retraining import build_model_control, build_registry, serving_path
from bot.service import ReplyPipeline
from bot.storage import (
    ChannelSettingRecord,
    Database,
    ExchangeRecord,
    ExchangeReviewRecord,
    MessageRecord,
)
from bot.web import ServiceReadiness, WebServer, build_web_app
from model.registry import Registry
from tests.conftest import make_message

TOKEN = "correct horse battery staple"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DOCS = Path(__file__).resolve().parents[2] / "docs"

QUESTIONS = [
    ("slack", "C-support", "T-reset", "U1", "How do I reset my password?"),
    ("slack", "C-support", "T-refund", "U2", "What is your refund policy?"),
    ("discord", "D-help", "T-hours", "U3", "What are your business hours?"),
    ("slack", "C-random", "T-ship", "U1", "How long does shipping take?"),
]


class Sender:
    """The platform's side of a reply: gives each sent reply a platform id."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        self.count += 1
        return f"reply-{in_reply_to.message_id}-{self.count}"


@dataclass
class Running:
    """The dashboard being served, and handles to check what its actions did."""

    address: str
    settings: Settings
    database: Database
    pipeline: ReplyPipeline
    registry: Registry
    dashboard: Dashboard
    pseudonymize: Pseudonymizer

    def exchanges(self) -> list[ExchangeRecord]:
        with self.database.session() as session:
            return list(session.exec(select(ExchangeRecord).order_by(col(ExchangeRecord.id))))

    def verdicts(self) -> dict[int, str]:
        with self.database.session() as session:
            rows = session.exec(select(ExchangeReviewRecord)).all()
            return {row.exchange_id: row.verdict for row in rows}

    def verdict(self, exchange: ExchangeRecord) -> str | None:
        return self.verdicts().get(exchange.id or 0)

    def answer_text(self, exchange: ExchangeRecord) -> str:
        with self.database.session() as session:
            message = session.get(MessageRecord, exchange.answer_message_id)
            assert message is not None
            return message.text

    def opted_out(self, platform: str, channel: str) -> bool | None:
        with self.database.session() as session:
            record = session.exec(
                select(ChannelSettingRecord).where(
                    ChannelSettingRecord.platform == platform,
                    ChannelSettingRecord.channel == channel,
                )
            ).first()
            return None if record is None else record.training_opt_out


def _add_version(registry: Registry, source: Path, **metadata: Any) -> int:
    """A version the way a retrain leaves one: a model folder, its metadata, a loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    number, folder = registry.new_folder()
    shutil.copytree(source, folder, dirs_exist_ok=True)
    figure, axes = pyplot.subplots(figsize=(4, 2.5), dpi=60)
    axes.plot([2.5, 1.7, 1.1, 0.8, 0.6], label="train")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(folder / "loss.png")
    pyplot.close(figure)
    score = {"total": 4, "exact": 3, "normalised": 4, "loss": 0.61}
    registry.add(
        number,
        folder,
        {
            "parent": 0,
            "trained_from": 0,
            "created_at": f"2026-11-2{number}T10:00:00+00:00",
            "triggered_by": "slack:UADMIN (admin)",
            "shards": ["shard-000001"],
            "exchanges": {"train": 4, "held_out": 0},
            "metrics": {
                "before": {"new": {**score, "normalised": 1}, "regression": score},
                "after": {"new": score, "regression": score},
            },
            "training": {"method": "full"},
            "seconds": 12.5,
            "loss_curve": "loss.png",
            **metadata,
        },
    )
    return number


async def seed(pipeline: ReplyPipeline) -> None:
    """Conversations through the pipeline's real paths: questions the tiny model answers, a
    rating, and a human agent's answer."""
    send = Sender()
    for platform, channel, thread, author, text in QUESTIONS:
        message = make_message(
            text, platform=platform, channel=channel, thread=thread, author_id=author
        )
        result = await pipeline.handle(message, send=send)
        assert result is not None
    # A thumbs-up on the first reply.
    with pipeline.store.database.session() as session:
        first = session.exec(select(ExchangeRecord).order_by(col(ExchangeRecord.id))).first()
        assert first is not None
        answer = session.get(MessageRecord, first.answer_message_id)
        assert answer is not None and answer.platform_message_id
    await pipeline.rating_added(
        platform="slack",
        channel="C-support",
        answer_message_id=answer.platform_message_id,
        rater_id="U9",
        value=1,
    )
    # A human agent answers a question in a conversation the bot is in.
    question = make_message(
        "Can I talk to a person?",
        platform="slack",
        channel="C-support",
        thread="T-refund",
        author_id="U2",
    )
    await pipeline.handle(question, send=send)
    agent = make_message(
        "Sure, this is Dana from support: how can I help?",
        platform="slack",
        channel="C-support",
        thread="T-refund",
        author_id="UAGENT",
        role=Role.HUMAN_AGENT,
    )
    assert await pipeline.agent_answered(agent)


@pytest.fixture
async def running(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Running]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        model_path=str(tiny_model_dir),
        model_device="cpu",
        dashboard_token=TOKEN,
        dashboard_port=0,
        max_new_tokens=32,
    )
    registry = build_registry(settings)
    _add_version(registry, tiny_model_dir, promoted=True, decision="learned 4/4 new")
    _add_version(
        registry, tiny_model_dir, promoted=False, decision="forgot 2 of 4 regression answers"
    )
    registry.use(1)
    from model.service import ModelService

    generator = ModelService.load(serving_path(settings), device="cpu")
    pipeline = build_pipeline(settings, generator=generator)
    database = pipeline.store.database
    control, _registry = build_model_control(settings, database=database, generator=generator)
    commands = build_commands(settings, pipeline, control=control)
    routers = web_routers(settings, pipeline, commands, control)
    app = build_web_app(
        ready=ServiceReadiness(store=pipeline.store, generator=generator), routers=routers
    )
    server = WebServer(app=app, host="127.0.0.1", port=0)
    await server.start()
    dashboard = next(r.dashboard for r in routers if isinstance(r, DashboardRouter))
    key = load_pseudonym_key(configured="", data_dir=settings.data_dir)
    try:
        await seed(pipeline)
        yield Running(
            address=server.address,
            settings=settings,
            database=database,
            pipeline=pipeline,
            registry=registry,
            dashboard=dashboard,
            pseudonymize=Pseudonymizer(key),
        )
    finally:
        await server.stop()
        await dashboard.actions.close()
        await generator.aclose()
        database.dispose()
