"""The model service in a process of its own: a real child process over a socket pair, killed
with a real signal where the test says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from benchmarks.random_llama import build_random_llama
from bot.contracts import ModelBusy
from model.batch_requests import BatchSettings
from model.corpus import SEED_EXCHANGES
from model.loading import ModelLoadError
from model.prompt import PromptFormatError
from model.service import ModelService
from model.worker_process import ModelProcess, ModelProcessError

QUESTIONS = [question for question, _ in SEED_EXCHANGES[:8]]


def asking(count: int) -> list[str]:
    return [QUESTIONS[n % len(QUESTIONS)] for n in range(count)]


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[ModelProcess]:
    process = ModelProcess(tiny_model_dir, device="cpu")
    yield process
    process.close()


LONG = 400  # tokens


@pytest.fixture(scope="module")
def rambling_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight one-layer Llama that, greedy, repeats a word to the token limit (seed
    1: "borrow borrow ..."): a reply long enough to be cut short or killed halfway."""
    return build_random_llama(
        tmp_path_factory.mktemp("rambling"),
        tokenizer_from=tiny_model_dir,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        context_window=512,
        seed=1,
    )


@pytest.fixture(scope="module")
def rambling(rambling_dir: Path) -> Iterator[ModelProcess]:
    process = ModelProcess(rambling_dir, device="cpu")
    yield process
    process.close()


async def test_replies_from_the_process_are_the_service_s_own(
    served: ModelProcess, tiny_model: ModelService
) -> None:
    assert served.version == tiny_model.version and served.ready
    for question in QUESTIONS[:3]:
        expected = await tiny_model.generate(messages=user(question), max_new_tokens=64)
        reply = await served.generate(messages=user(question), max_new_tokens=64)
        assert (reply.text, reply.model_version) == (expected.text, expected.model_version)

        stream = served.stream(messages=user(question), max_new_tokens=64)
        pieces = [piece async for piece in stream]
        assert "".join(pieces).strip() == expected.text
        assert stream.reply is not None and stream.reply.text == expected.text


async def test_requests_at_once_are_each_answered_their_own(
    served: ModelProcess, tiny_model: ModelService
) -> None:
    asked = QUESTIONS * 3
    expected = [
        (await tiny_model.generate(messages=user(q), max_new_tokens=48)).text for q in QUESTIONS
    ]
    replies = await asyncio.gather(
        *(served.generate(messages=user(q), max_new_tokens=48) for q in asked)
    )
    assert [r.text for r in replies] == expected * 3
    assert served.stats().largest_batch > 1  # decoded together in the child


async def test_the_child_s_errors_arrive_as_themselves(served: ModelProcess) -> None:
    with pytest.raises(PromptFormatError, match="role"):
        await served.generate(messages=[{"role": "robot", "content": "x"}], max_new_tokens=8)
    with pytest.raises(PromptFormatError):
        async for _ in served.stream(messages=[], max_new_tokens=8):
            pass
    reply = await served.generate(messages=user("Hello"), max_new_tokens=16)
    assert reply.text


async def drain(stream: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in stream]


async def settled(process: ModelProcess, *, finished: int) -> None:
    """Until the child reports ``finished`` requests ended and nothing in flight."""
    deadline = time.monotonic() + 10
    while (stats := process.stats()).finished < finished or stats.active or stats.waiting:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)


async def test_an_abandoned_stream_leaves_the_child_s_batch(rambling: ModelProcess) -> None:
    before = rambling.stats()
    whole = await rambling.generate(messages=user(QUESTIONS[0]), max_new_tokens=LONG)
    await settled(rambling, finished=before.finished + 1)
    assert whole.text and rambling.stats().generated_tokens - before.generated_tokens == LONG

    before = rambling.stats()
    stream = rambling.stream(messages=user(QUESTIONS[0]), max_new_tokens=LONG)
    reading = asyncio.ensure_future(drain(stream))
    await asyncio.sleep(0.05)  # a fifth of the way at most: the whole reply takes 0.25 s
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await stream.aclose()
    await settled(rambling, finished=before.finished + 1)
    assert rambling.stats().generated_tokens - before.generated_tokens < LONG // 2


async def test_a_hot_swap_changes_the_version_and_a_broken_folder_changes_nothing(
    served: ModelProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    old = served.version
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00not safetensors" * 100)
    with pytest.raises(ModelLoadError):
        await served.swap(broken)
    assert served.version == old

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    config["swap_test_marker"] = 1
    (changed / "config.json").write_text(json.dumps(config))
    new = await served.swap(changed)
    try:
        assert new != old and served.version == new and served.source == str(changed)
        reply = await served.generate(messages=user(QUESTIONS[0]), max_new_tokens=32)
        assert reply.model_version == new
    finally:
        await served.swap(tiny_model_dir)
    assert served.version == old


def test_a_missing_or_corrupt_folder_fails_at_start_with_one_clear_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelProcess(tmp_path / "nowhere", device="cpu")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        ModelProcess(corrupt, device="cpu")


async def test_a_full_queue_answers_busy_at_once_and_serves_the_rest(
    tiny_model_dir: Path,
) -> None:
    small = ModelProcess(
        tiny_model_dir, device="cpu", batch=BatchSettings(max_batch=4, queue_size=16)
    )
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(small.generate(messages=user(q), max_new_tokens=32) for q in asking(64)),
                return_exceptions=True,
            ),
            timeout=120,
        )
    finally:
        small.close()
    busy = [o for o in outcomes if isinstance(o, ModelBusy)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(busy) + len(answered) == 64, [o for o in outcomes if isinstance(o, Exception)]
    assert busy and len(answered) >= 16  # the queue's 16 at least


async def test_a_killed_child_fails_its_requests_and_is_started_again(
    rambling_dir: Path,
) -> None:
    process = ModelProcess(rambling_dir, device="cpu")
    try:
        child = process._child
        assert child is not None
        streamed = asyncio.ensure_future(
            drain(process.stream(messages=user(QUESTIONS[0]), max_new_tokens=LONG))
        )
        waiting = asyncio.ensure_future(
            process.generate(messages=user(QUESTIONS[1]), max_new_tokens=LONG)
        )
        await asyncio.sleep(0.05)  # both are decoding: each takes 0.25 s
        os.kill(child.process.pid, signal.SIGKILL)
        for request in (streamed, waiting):
            with pytest.raises(ModelProcessError, match="stopped"):
                await asyncio.wait_for(request, timeout=30)

        deadline = time.monotonic() + 60
        while not process.ready or process._child is child:
            assert time.monotonic() < deadline, "the model process was not started again"
            await asyncio.sleep(0.1)
        reply = await process.generate(messages=user(QUESTIONS[1]), max_new_tokens=32)
        assert reply.text
    finally:
        process.close()
