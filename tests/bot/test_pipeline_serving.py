"""The pipeline with the batched model service: a busy model, the history note, the version
that really answered, on a real database and the real tiny model."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from bot.service import BUSY_REPLY, Outcome, PipelineOptions, ReplyPipeline
from bot.storage import AnswerState, Database, ExchangeRecord, MessageRecord, Store
from model.corpus import SEED_EXCHANGES
from model.service import BatchSettings, GenerationSettings, LocalModel, ModelService
from tests.bot.test_pipeline import RecordingSender, stored_messages
from tests.conftest import make_message


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> LocalModel:
    return LocalModel.load(tiny_model_dir, device="cpu")


@pytest.fixture
def slow_service(local: LocalModel) -> Iterator[ModelService]:
    """One request at a time, one waiting, each reply 60 tokens at 10 ms a step."""
    model = LocalModel(
        local.model,
        local.tokenizer,
        version=local.version,
        device="cpu",
        generation=GenerationSettings(ignore_eos=True),
    )
    service = ModelService(model, batch=BatchSettings(max_batch=1, queue_size=1, max_wait=0))
    handle = local.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    yield service
    handle.remove()
    service.close()


def pipeline_for(database: Database, generator: Any, **options: Any) -> ReplyPipeline:
    return ReplyPipeline(
        store=Store(database), generator=generator, options=PipelineOptions(**options)
    )


async def test_a_busy_model_says_so_and_the_message_is_not_answered_later(
    database: Database, slow_service: ModelService
) -> None:
    pipeline = pipeline_for(database, slow_service, max_new_tokens=60)
    sender = RecordingSender()
    results = await asyncio.gather(
        *(
            pipeline.handle(
                make_message(f"question {i}", channel=f"C{i}", message_id=f"m{i}"), send=sender
            )
            for i in range(4)
        )
    )
    refused = [r for r in results if r.outcome == Outcome.REFUSED]
    answered = [r for r in results if r.outcome == Outcome.ANSWERED]
    assert refused and answered and len(refused) + len(answered) == 4
    assert all(r.reply == BUSY_REPLY and r.delivered for r in refused)
    assert sender.texts.count(BUSY_REPLY) == len(refused)
    busy_ids = {r.message_id for r in refused}
    states = {m.id: m.answer_state for m in stored_messages(database)}
    assert {states[i] for i in busy_ids} == {AnswerState.REFUSED}
    # Recovery leaves them alone: the user was told to ask again.
    report = await pipeline.recover(platforms=["slack"])
    assert report.answered == 0


class Canned:
    """Answers at once: only to lay down a long conversation before the real model speaks."""

    version = "canned"

    async def generate(self, *, messages: Any, max_new_tokens: int) -> str:
        return "Sunny, mostly."


async def test_the_history_note_is_sent_but_never_stored(database: Database, tiny_model) -> None:
    sender = RecordingSender()
    filler = "Tell me everything about the weather and the sea. " * 6
    earlier = pipeline_for(database, Canned())
    for index in range(40):  # a conversation far longer than the tiny model's 256 tokens
        await earlier.handle(make_message(filler, message_id=f"old-{index}"), send=sender)
    pipeline = pipeline_for(database, tiny_model, history_turns=1000, max_new_tokens=64)
    question = SEED_EXCHANGES[0][0]
    result = await pipeline.handle(make_message(question, message_id="new"), send=sender)

    assert result.outcome == Outcome.ANSWERED
    sent = sender.texts[-1]
    assert sent != result.reply and sent.startswith(result.reply or "?")
    note = sent[len(result.reply or "") :].strip()
    assert "left out" in note.lower()
    with database.session() as session:
        texts = [m.text for m in session.exec(select(MessageRecord)).all()]
    assert all(note not in text for text in texts)  # stored (and trained on) without it


async def test_each_reply_records_the_version_that_generated_it(
    database: Database, tmp_path: Path, tiny_model_dir: Path, slow_service: ModelService
) -> None:
    pipeline = pipeline_for(database, slow_service, max_new_tokens=60)
    old_version = slow_service.version
    sender = RecordingSender()
    first = asyncio.create_task(pipeline.handle(make_message("hello", channel="C1"), send=sender))
    async with asyncio.timeout(30):
        while slow_service.stats().active == 0:  # noqa: ASYNC110 (worker-thread state)
            await asyncio.sleep(0.005)
    copy = tmp_path / "next"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "generation_config.json").write_text('{"swap_marker": 1}')
    config = (copy / "config.json").read_text().replace("{", '{"swap_marker": 1, ', 1)
    (copy / "config.json").write_text(config)
    new_version = await slow_service.swap(copy)
    second = await pipeline.handle(make_message("hi", channel="C2"), send=sender)
    first_result = await first

    assert new_version != old_version
    assert first_result.outcome == second.outcome == Outcome.ANSWERED
    with database.session() as session:
        versions = {e.id: e.model_version for e in session.exec(select(ExchangeRecord)).all()}
    assert versions[first_result.exchange_id] == old_version  # generated by the old model
    assert versions[second.exchange_id] == new_version
