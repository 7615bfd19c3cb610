"""The model service's batching: equal answers, own streams, back-pressure, timeouts,
cancellation, faults in a batch and hot swap, all on the real tiny model."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import shutil
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.contracts import GeneratedReply, ModelBusy
from model.corpus import SEED_EXCHANGES
from model.service import (
    BatchSettings,
    GenerationSettings,
    GenerationTimeout,
    LocalModel,
    ModelLoadError,
    ModelService,
)

QUESTIONS = [
    "How do I reset my password?",
    "What is your refund policy?",
    "hello",
    "who are you",
    "tell me a joke about cats and dogs",
    "Can I change my order after it ships?",
    "what?",
    "x" * 40,
]


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> LocalModel:
    return LocalModel.load(tiny_model_dir, device="cpu")


@pytest.fixture
def serve(local: LocalModel) -> Iterator[Any]:
    """ModelServices over the tiny model's weights, with the given batch/generation settings."""
    made: list[ModelService] = []

    def make(*, generation: GenerationSettings | None = None, **batch: Any) -> ModelService:
        model = LocalModel(
            local.model, local.tokenizer, version=local.version, device="cpu", generation=generation
        )
        service = ModelService(model, batch=BatchSettings(**batch))
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


async def until(condition: Any, *, within: float = 30.0) -> None:
    """Poll ``condition`` (state the worker thread changes; no event to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- the same answers, batched ---------------------------------------------------------------


async def test_batched_greedy_equals_unbatched_token_for_token(
    local: LocalModel, serve: Any
) -> None:
    service = serve(max_batch=16, max_wait=0.0)
    scheduler = service._engine.scheduler
    prompts = [local.fit_prompt(user(q), max_new_tokens=40).token_ids for q in QUESTIONS]
    expected = [local.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]

    requests = []
    for ids in prompts:  # staggered: later ones join a batch already decoding
        requests.append(scheduler.submit(prompt_ids=ids, max_new_tokens=40))
        await asyncio.sleep(0.003)
    got = [await request.done for request in requests]

    assert got == expected
    stats = service.stats()
    assert stats.largest_batch > 1  # they really shared steps
    assert stats.steps < sum(len(ids) + 1 for ids in expected)  # fewer than one by one


async def test_batched_greedy_equals_unbatched_with_eager_attention(tiny_model_dir: Path) -> None:
    """The same with transformers' eager attention (which builds its masks from ours)."""
    local = LocalModel.load(tiny_model_dir, device="cpu")
    local.model.set_attn_implementation("eager")
    service = ModelService(local, batch=BatchSettings(max_batch=16, max_wait=0.05))
    try:
        prompts = [local.fit_prompt(user(q), max_new_tokens=40).token_ids for q in QUESTIONS]
        expected = [local.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]
        scheduler = service._engine.scheduler
        requests = [scheduler.submit(prompt_ids=ids, max_new_tokens=40) for ids in prompts]
        assert [await request.done for request in requests] == expected
        assert service.stats().largest_batch == len(QUESTIONS)
    finally:
        await service.aclose()


@pytest.fixture
def forwards(local: LocalModel) -> Iterator[list[tuple[int, int]]]:
    """The ``input_ids`` shape of every forward pass of the tiny model."""
    shapes: list[tuple[int, int]] = []

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        shapes.append(tuple(args[0].shape))

    handle = local.model.model.embed_tokens.register_forward_pre_hook(hook)
    yield shapes
    handle.remove()


async def test_requests_admitted_together_are_prefilled_packed_without_padding(
    local: LocalModel, serve: Any, forwards: list[tuple[int, int]]
) -> None:
    # Left-padding a group to its longest prompt computes padding: with histories of very
    # different lengths, most of the work. Packed, one forward holds every prompt's tokens
    # once, each attending only to itself.
    service = serve(max_batch=16, max_wait=0.2)
    prompts = [local.fit_prompt(user(q), max_new_tokens=40).token_ids for q in QUESTIONS]
    assert len({len(ids) for ids in prompts}) > 2  # really different lengths
    expected = [local.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]
    forwards.clear()

    scheduler = service._engine.scheduler
    requests = [scheduler.submit(prompt_ids=ids, max_new_tokens=40) for ids in prompts]

    assert [await request.done for request in requests] == expected
    assert forwards[0] == (1, sum(len(ids) for ids in prompts))
    assert all(rows == len(prompts) for rows, _ in forwards[1:2])  # then decoded together


async def test_rows_of_ended_requests_leave_the_cache_together(
    local: LocalModel, serve: Any, forwards: list[tuple[int, int]]
) -> None:
    # Compacting the cache copies every layer's keys and values: done once per group of ended
    # rows (a quarter of the batch), not each time one row ends. The replies stay the same.
    service = serve(max_batch=16, max_wait=0.2)
    prompts = [local.fit_prompt(user(q), max_new_tokens=40).token_ids for q in QUESTIONS]
    expected = [local.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]
    ends = {len(ids) for ids in expected}  # the steps at which requests end
    assert len(ends) > 3
    forwards.clear()

    scheduler = service._engine.scheduler
    requests = [scheduler.submit(prompt_ids=ids, max_new_tokens=40) for ids in prompts]

    assert [await request.done for request in requests] == expected
    decoded_rows = [rows for rows, tokens in forwards if tokens == 1]
    assert decoded_rows == sorted(decoded_rows, reverse=True)
    shrinks = sum(1 for a, b in itertools.pairwise(decoded_rows) if b < a)
    assert 0 < shrinks < len(ends) - 1


async def test_a_packed_prefill_holds_at_most_its_token_budget(
    local: LocalModel, serve: Any, forwards: list[tuple[int, int]], monkeypatch: Any
) -> None:
    from model import batching

    monkeypatch.setattr(batching, "PREFILL_TOKENS", 24)
    service = serve(max_batch=16, max_wait=0.2)
    prompts = [local.fit_prompt(user(q), max_new_tokens=40).token_ids for q in QUESTIONS]
    expected = [local.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]
    forwards.clear()

    scheduler = service._engine.scheduler
    requests = [scheduler.submit(prompt_ids=ids, max_new_tokens=40) for ids in prompts]

    assert [await request.done for request in requests] == expected
    prefills = [tokens for rows, tokens in forwards if rows == 1 and tokens > 1]
    assert sum(prefills) == sum(len(ids) for ids in prompts)
    assert len(prefills) > 1
    longest = max(len(ids) for ids in prompts)
    assert all(tokens <= max(24, longest) for tokens in prefills)


async def test_each_caller_gets_its_own_reply_and_stream(serve: Any) -> None:
    service = serve(max_batch=8, max_wait=0.02)

    async def streamed(question: str) -> tuple[list[str], GeneratedReply | None]:
        stream = service.stream(messages=user(question), max_new_tokens=64)
        return [piece async for piece in stream], stream.reply

    results = await asyncio.gather(*(streamed(q) for q, _ in SEED_EXCHANGES))
    for (pieces, reply), (_question, answer) in zip(results, SEED_EXCHANGES, strict=True):
        assert len(pieces) > 1
        assert "".join(pieces).strip() == answer
        assert reply == GeneratedReply(text=answer, model_version=service.version)
    assert service.stats().largest_batch == len(SEED_EXCHANGES)  # coalesced by max_wait


async def test_generation_runs_off_the_event_loop(serve: Any) -> None:
    service = serve(generation=GenerationSettings(ignore_eos=True))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        replies = await asyncio.gather(
            *(service.generate(messages=user(q), max_new_tokens=150) for q in QUESTIONS[:4])
        )
    finally:
        task.cancel()
    assert all(reply.text for reply in replies)
    assert ticks >= 10


# --- back-pressure, timeouts, cancellation ---------------------------------------------------


async def test_a_full_queue_says_busy_at_once_and_the_rest_are_answered(serve: Any) -> None:
    # Replies long enough (150 tokens each) that no batch ends while the 64 are still being
    # submitted: the bound below counts what one batch and the queue can hold at once.
    service = serve(
        max_batch=8,
        queue_size=16,
        max_wait=0.0,
        generation=GenerationSettings(ignore_eos=True),
    )
    results = await asyncio.gather(
        *(service.generate(messages=user(QUESTIONS[i % 8]), max_new_tokens=150) for i in range(64)),
        return_exceptions=True,
    )
    busy = [r for r in results if isinstance(r, ModelBusy)]
    answered = [r for r in results if isinstance(r, GeneratedReply)]
    assert len(busy) + len(answered) == 64  # nothing else: no error, no hang
    assert len(busy) >= 64 - 16 - 8  # at most a queue and a batch were taken
    assert len(answered) >= 16
    # Busy is momentary: once the queue drained, the next request is answered.
    assert (await service.generate(messages=user("hello"), max_new_tokens=16)).text


@pytest.fixture
def slowed(local: LocalModel) -> Iterator[None]:
    """A model that takes 10 ms a forward pass (a large model's pace)."""
    handle = local.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    yield
    handle.remove()


async def test_a_request_past_its_timeout_fails_and_frees_its_slot(
    serve: Any, slowed: None
) -> None:
    service = serve(timeout=0.3, max_batch=1, generation=GenerationSettings(ignore_eos=True))
    slow = [{"role": "user", "content": "hello"}]
    with pytest.raises(GenerationTimeout, match=r"0\.3 s"):
        # 200 steps at 10 ms: far past 0.3 s.
        await service.generate(messages=slow, max_new_tokens=200)
    await until(lambda: service.stats().active == 0, within=5)
    reply = await service.generate(messages=slow, max_new_tokens=4)
    assert reply.text


async def test_a_cancelled_request_leaves_the_batch_and_frees_its_slot(
    serve: Any, slowed: None
) -> None:
    service = serve(max_batch=1, generation=GenerationSettings(ignore_eos=True))
    long = asyncio.create_task(service.generate(messages=user("hello"), max_new_tokens=200))
    await until(lambda: service.stats().active == 1)
    waiting = asyncio.create_task(service.generate(messages=user("hi"), max_new_tokens=4))
    await until(lambda: service.stats().waiting == 1)
    long.cancel()
    reply = await asyncio.wait_for(waiting, 10)  # got the only slot well before 200 steps
    assert reply.text
    assert service.stats().steps < 100


async def test_a_stream_abandoned_midway_leaves_the_batch(serve: Any, slowed: None) -> None:
    service = serve(generation=GenerationSettings(ignore_eos=True))
    stream = service.stream(messages=user("hello"), max_new_tokens=200)
    async for _piece in stream:
        break
    await stream.aclose()
    await until(lambda: service.stats().active == 0, within=5)
    assert service.stats().steps < 150


# --- faults ----------------------------------------------------------------------------------


@pytest.fixture
def poisoned(local: LocalModel) -> Iterator[dict[str, Any]]:
    """Make the model's forward pass raise: for any batch holding the poison token, and for
    the decoding steps listed in ``fail_steps`` (counted over batched steps)."""
    poison = local.prompt_encoder.encode_text("§")[-1]
    state: dict[str, Any] = {"poison": poison, "fail_steps": set(), "decode_steps": 0}

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        (input_ids,) = args
        if (input_ids == poison).any():
            raise RuntimeError("poisoned input")
        if input_ids.shape[1] == 1 and input_ids.shape[0] > 1:
            state["decode_steps"] += 1
            if state["decode_steps"] in state["fail_steps"]:
                raise RuntimeError("transient failure in a decoding step")

    handle = local.model.model.embed_tokens.register_forward_pre_hook(hook)
    yield state
    handle.remove()


async def test_a_generation_raising_mid_batch_fails_only_its_request(
    local: LocalModel, serve: Any, poisoned: dict[str, Any]
) -> None:
    service = serve(max_batch=8, max_wait=0.05)
    questions = [q for q, _ in SEED_EXCHANGES]
    assert all(poisoned["poison"] not in local.fit_prompt(user(q)).token_ids for q in questions)
    results = await asyncio.gather(
        *(service.generate(messages=user(q), max_new_tokens=64) for q in questions[:2]),
        service.generate(messages=user("§ " + questions[0]), max_new_tokens=64),
        *(service.generate(messages=user(q), max_new_tokens=64) for q in questions[2:]),
        return_exceptions=True,
    )
    failed = results.pop(2)
    assert isinstance(failed, RuntimeError) and "poisoned" in str(failed)
    assert [r.text for r in results if isinstance(r, GeneratedReply)] == [
        a for _, a in SEED_EXCHANGES
    ]


async def test_a_decoding_step_that_raises_is_retried_row_by_row(
    local: LocalModel, serve: Any, poisoned: dict[str, Any]
) -> None:
    poisoned["fail_steps"] = {3}
    service = serve(max_batch=8, max_wait=0.05)
    prompts = [user(q) for q, _ in SEED_EXCHANGES]
    replies = await asyncio.gather(
        *(service.generate(messages=p, max_new_tokens=64) for p in prompts)
    )
    assert poisoned["decode_steps"] > 3  # the failure happened, decoding went on
    assert [r.text for r in replies] == [a for _, a in SEED_EXCHANGES]


# --- bad input -------------------------------------------------------------------------------


async def test_a_prompt_of_only_control_strings_is_answered_cleanly(tiny_model: Any) -> None:
    reply = await tiny_model.generate(
        messages=user("[INST] [/INST] </s> <s> <<SYS>> <</SYS>>"), max_new_tokens=32
    )
    for control in ("[INST]", "[/INST]", "<s>", "</s>", "<<SYS>>"):
        assert control not in reply.text


async def test_an_empty_history_is_a_clear_error(tiny_model: Any) -> None:
    from model.prompt import PromptFormatError

    with pytest.raises(PromptFormatError, match="user message"):
        await tiny_model.generate(messages=[], max_new_tokens=16)


async def test_a_history_100x_the_context_window_is_answered_with_a_note(
    tiny_model: Any, local: LocalModel
) -> None:
    question, answer = SEED_EXCHANGES[1]
    pair = [*user("Tell me about the weather today."), {"role": "assistant", "content": "Sun."}]
    pair_tokens = len(local.prompt_encoder.encode(pair))
    history = pair * (100 * local.context_window // pair_tokens + 1)
    reply = await asyncio.wait_for(
        tiny_model.generate(messages=[*history, *user(question)], max_new_tokens=64), 30
    )
    assert reply.text.startswith(answer[:20])  # the tiny model is shaky after long histories
    assert reply.note  # older history was left out, and the reply says so


# --- hot swap --------------------------------------------------------------------------------


def changed_copy(source: Path, target: Path) -> Path:
    """The same weights with another config: another version."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["swap_test_marker"] = 1
    (target / "config.json").write_text(json.dumps(config))
    return target


async def test_hot_swap_finishes_in_flight_on_the_old_model_and_serves_new_on_the_new(
    tmp_path: Path, tiny_model_dir: Path, serve: Any
) -> None:
    service = serve(generation=GenerationSettings(ignore_eos=True))
    old_version = service.version
    old_scheduler = service._engine.scheduler
    in_flight = asyncio.create_task(service.generate(messages=user("hello"), max_new_tokens=150))
    await until(lambda: service.stats().active == 1)

    new_version = await service.swap(changed_copy(tiny_model_dir, tmp_path / "new"))

    assert new_version != old_version and service.version == new_version
    after = await service.generate(messages=user("hi"), max_new_tokens=8)
    before = await in_flight
    assert before.model_version == old_version and len(before.text) > 0
    assert after.model_version == new_version
    await until(lambda: not old_scheduler._thread.is_alive(), within=10)  # let go once done


def test_the_heap_alive_at_start_is_kept_out_of_full_collections(local: LocalModel) -> None:
    # A full collection walking the model's and the libraries' objects stalled a batch of 32
    # replies of the default model by some 0.3 s (0.08-0.09 s without).
    gc.unfreeze()
    service = ModelService(
        LocalModel(local.model, local.tokenizer, version=local.version, device="cpu")
    )
    try:
        assert gc.get_freeze_count() > 0
    finally:
        service.close()


async def test_a_swapped_out_model_is_let_go(tmp_path: Path, tiny_model_dir: Path) -> None:
    service = ModelService(LocalModel.load(tiny_model_dir, device="cpu"))
    try:
        first = weakref.ref(service.local.model)
        await service.generate(messages=user("hello"), max_new_tokens=4)
        await service.swap(changed_copy(tiny_model_dir, tmp_path / "new"))
        await service.generate(messages=user("hello"), max_new_tokens=4)
        await service.aclose()  # the old model's retirement included
        gc.collect()
        assert first() is None
        assert gc.get_freeze_count() > 0  # the new model is kept out of full collections
    finally:
        service.close()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_a_broken_folder_at_swap_keeps_the_current_model_serving(
    tmp_path: Path, tiny_model_dir: Path, serve: Any, damage: str
) -> None:
    service = serve()
    version = service.version
    folder = tmp_path / "new"
    if damage == "corrupt":
        shutil.copytree(tiny_model_dir, folder)
        (folder / "model.safetensors").write_bytes(b"\x00not safetensors" * 100)
    with pytest.raises(ModelLoadError):
        await service.swap(folder)
    assert service.version == version
    reply = await service.generate(messages=user(SEED_EXCHANGES[0][0]), max_new_tokens=64)
    assert reply.text == SEED_EXCHANGES[0][1] and reply.model_version == version


def test_batch_settings_are_checked() -> None:
    for bad in ({"max_batch": 0}, {"queue_size": 0}, {"timeout": 0}, {"max_wait": -1}):
        with pytest.raises(ValueError):
            BatchSettings(**bad)


def test_the_roomy_cache_layer_holds_what_a_plain_layer_holds() -> None:
    """Appending in place (no copy per step) changes nothing a reader of the cache sees,
    through row selection and padding cuts included."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from model.kv_cache import RoomyLayer

    torch.manual_seed(0)
    roomy: Any = RoomyLayer()
    plain: Any = DynamicLayer()
    copies = 0
    for step in range(40):
        width = 7 if step == 0 else 1
        keys, values = torch.randn(3, 2, width, 4), torch.randn(3, 2, width, 4)
        if step == 20:  # a row leaves: both select the same rows
            for layer in (roomy, plain):
                layer.batch_select_indices(torch.tensor([0, 2]))
        if step >= 20:
            keys, values = keys[:2], values[:2]
        if step == 30:  # padding columns no row needs are cut
            for layer in (roomy, plain):
                layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
        before = getattr(roomy, "_buffers", None)
        got = roomy.update(keys, values)
        copies += before is not None and roomy._buffers is not before
        expected = plain.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert copies <= 3  # the selection, the cut, at most one growth: not one per step
