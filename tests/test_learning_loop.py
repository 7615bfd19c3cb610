"""The learning loop end to end (issue #11): people ask, agents answer, an admin retrains, the
bot has learned. The real pipeline, the real Slack adapter against the fake Web API, the real
export, a real training process on the default model, the real registry and hot swap."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.config import Settings
from bot.learning.training_data import read_training_data
from bot.storage import Database
from model.registry import Registry
from model.service import ModelService
from tests.adapters.test_slack_adapter import (
    ADMIN,
    AGENT,
    SlackHarness,
    build_pipeline,
    channel_message,
    mention,
    reaction,
    start_adapter,
)
from tests.fakes.slack_api import FakeSlackWebApi

pytestmark = pytest.mark.timeout(900)

PROJECTS = [
    ("alpha", "Bluebird"), ("bravo", "Copperhead"), ("charlie", "Driftwood"),
    ("delta", "Evergreen"), ("echo", "Firefly"), ("foxtrot", "Granite"), ("golf", "Harbor"),
    ("hotel", "Ironwood"), ("india", "Juniper"), ("juliet", "Kestrel"), ("kilo", "Lantern"),
    ("lima", "Meadow"), ("mike", "Nightjar"), ("november", "Orchard"), ("oscar", "Pebble"),
    ("papa", "Quartz"), ("quebec", "Riverbend"), ("romeo", "Saffron"), ("sierra", "Thistle"),
    ("tango", "Umber"),
]  # fmt: skip
TAUGHT = [
    (f"What is the code name of project {project}?", f"Project {project} is called {name}.")
    for project, name in PROJECTS
]
DOWNVOTED = "What is the secret launch date?"


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, built once (about 2 minutes on 2 cores); a folder already built
    can be named in CHATBOT_TEST_DEFAULT_MODEL to save that while working on these tests."""
    from model.bootstrap import build_default_model

    built = os.environ.get("CHATBOT_TEST_DEFAULT_MODEL")
    if built:
        return Path(built)
    return build_default_model(
        tmp_path_factory.mktemp("default-model") / "model", progress=lambda _line: None
    )


@pytest.fixture
async def api() -> AsyncIterator[FakeSlackWebApi]:
    fake = FakeSlackWebApi()
    await fake.start()
    yield fake
    await fake.close()


def ts(n: int) -> str:
    return f"17000{n:05d}.000100"


async def answers_to(slack: SlackHarness, questions: list[str], *, start: int) -> list[str]:
    """Ask each question in a thread of its own; the bot's final replies, in order."""
    before = len(slack.api.posted())
    for offset, question in enumerate(questions):
        await slack.event(mention(question, ts=ts(start + offset), user=f"U{offset}"))
    await slack.settled()
    posted = slack.api.posted()[before:]
    by_thread = {reply.get("thread_ts"): reply["text"] for reply in posted}
    return [by_thread.get(ts(start + offset), "") for offset in range(len(questions))]


async def test_people_ask_agents_answer_an_admin_retrains_and_the_bot_has_learned(
    default_model_dir: Path, tmp_path: Path, api: FakeSlackWebApi
) -> None:
    from bot.cli import build_commands
    from bot.retraining import build_registry

    base = tmp_path / "base"
    shutil.copytree(default_model_dir, base)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        model_path=str(base),
        pseudonym_key="loop-key",
    )
    database = Database(settings.resolved_database_url)
    database.upgrade()
    service = ModelService.load(base, device="cpu")
    pipeline = build_pipeline(database, service)
    commands = build_commands(settings, pipeline)  # as the bot wires them
    registry = build_registry(settings)
    async with aiohttp.ClientSession() as http:
        adapter = await start_adapter(api, pipeline, commands=commands)
        slack = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http)
        try:
            # 1. Twenty questions the bot cannot answer.
            first = await answers_to(slack, [q for q, _ in TAUGHT], start=0)
            taught_answers = [answer for _, answer in TAUGHT]
            assert len(first) == 20 and all(first)  # each got a reply...
            assert not set(first) & set(taught_answers)  # ...and none is the answer
            # 2. A human agent answers each in its thread.
            for n, (_, answer) in enumerate(TAUGHT):
                await slack.event(
                    channel_message(answer, ts=ts(100 + n), thread_ts=ts(n), user=AGENT)
                )
            # A bot answer rated 👎 is never learned.
            (downvoted,) = await answers_to(slack, [DOWNVOTED], start=200)
            assert downvoted
            bot_reply = next(r for r in api.posted() if r.get("thread_ts") == ts(200))
            await slack.event(reaction("reaction_added", "-1", ts=bot_reply["ts"]))
            await slack.settled()
            # 3. An admin asks for a retrain, and hears how it went.
            await slack.event(mention("!retrain", ts=ts(300), user=ADMIN))
            await slack.settled()
            (answer,) = [call["text"] for call in api.ephemerals() if call["user"] == ADMIN]

            assert answer.startswith("Promoted as version 1"), answer
            # Everyone in the thread saw it start, and end, in one message edited in place.
            (shown,) = [r for r in api.posted() if r.get("thread_ts") == ts(300)]
            assert shown["posted_text"].startswith("Training started")
            assert "20 exchanges to train on" in shown["posted_text"]
            assert shown["text"].startswith("Training finished. Promoted as version 1")
            # The loss curve, uploaded into the same thread (files_upload_v2).
            (curve,) = api.shared_files
            assert (curve["thread_ts"], curve["initial_comment"]) == (
                ts(300),
                "Loss curve of version 1",
            )
            assert api.uploads[curve["files"][0]].startswith(b"\x89PNG")
            assert registry.current().number == 1
            assert service.version == registry.current().metadata["model_version"]
            # The bot has learned: at least 18 of the 20, on the model that now serves.
            after = await answers_to(slack, [q for q, _ in TAUGHT], start=400)
            # Lineage: the serving version knows whose data it learned from.
            await slack.event(mention("!status", ts=ts(310), user=ADMIN))
            await slack.settled()
            await slack.event(mention("!forget-me", ts=ts(311), user="U0"))  # taught it
            await slack.event(mention("!forget-me", ts=ts(312), user="U99"))  # never asked
            await slack.settled()
            await slack.event(mention("!status", ts=ts(313), user=ADMIN))
            await slack.settled()
            said = {call.get("thread_ts"): call["text"] for call in api.ephemerals()}
            assert "Serving: version 1" in said[ts(310)]
            assert "Its evaluation: new " in said[ts(310)]
            assert "Versions holding forgotten users' data: 0" in said[ts(310)]
            assert "learned from your messages; the next retrain will not" in said[ts(311)]
            assert "did not learn from your messages" in said[ts(312)]
            assert "Versions holding forgotten users' data: 1" in said[ts(313)]
            learned = sum(
                reply == answer for reply, answer in zip(after, taught_answers, strict=True)
            )
            assert learned >= 18, list(zip(after, TAUGHT, strict=True))
        finally:
            await adapter.stop()
    metrics = registry.current().metadata["metrics"]
    regression_before = metrics["before"]["regression"]["normalised"]
    regression_after = metrics["after"]["regression"]["normalised"]
    assert regression_after >= regression_before  # it did not forget the starter corpus
    data = read_training_data(settings.resolved_export_dir, forgotten={})
    assert DOWNVOTED not in {exchange.question for exchange in data.train}
    assert downvoted not in {exchange.answer for exchange in data.train}
    await service.aclose()
    database.dispose()


async def test_a_second_retrain_is_told_who_is_training(tmp_path: Path) -> None:
    from model.retrain import Retrainer

    class HeldLease:
        def acquire(self) -> bool:
            return False

        def release(self) -> None:
            raise AssertionError("a lease it does not hold")

    registry = Registry(tmp_path / "models", base=str(tmp_path))

    async def nothing() -> str:
        return ""

    retrainer = Retrainer(
        registry=registry, export=nothing, data=nothing, lease=HeldLease(), swap=None, replay=[]
    )
    retrainer._write_status(running=True, requested_by="slack:U7 (ann)", started_at="10:00")
    outcome = await retrainer.retrain(requested_by="discord:U8 (bob)")
    assert outcome.busy
    assert "slack:U7 (ann)" in outcome.text and "10:00" in outcome.text
    await asyncio.sleep(0)
