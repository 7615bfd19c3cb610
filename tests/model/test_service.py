"""LocalModel: load errors, versions, plain (unbatched) answers, generation settings."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from model.bootstrap import TINY_EXCHANGES
from model.corpus import SEED_EXCHANGES
from model.loading import ModelLoadError, ensure_default_model, folder_version, hub_version
from model.prompt import format_prompt
from model.service import BatchSettings, GenerationSettings, LocalModel, ModelService, StopCutter


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path) -> Iterator[LocalModel]:
    yield LocalModel.load(tiny_model_dir, device="cpu")


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# --- loading -------------------------------------------------------------------------------


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LocalModel.load(tmp_path / "nowhere")


def test_load_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"not a model folder.*config\.json"):
        LocalModel.load(tmp_path)


def test_load_garbage_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match="could not load the model weights"):
        LocalModel.load(broken)


def test_load_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("hi")
    with pytest.raises(ModelLoadError, match="not a folder"):
        LocalModel.load(path)


def test_version_and_context_window(local_model: LocalModel, tiny_model_dir: Path) -> None:
    assert local_model.version.startswith(f"{tiny_model_dir.name}-")
    assert local_model.version == LocalModel.load(tiny_model_dir, device="cpu").version
    assert local_model.context_window == 256
    assert local_model.device == "cpu"


def test_ensure_default_model_keeps_existing(tiny_model_dir: Path) -> None:
    assert ensure_default_model(tiny_model_dir, progress=lambda _: None) == tiny_model_dir


def test_ensure_default_model_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="refusing to overwrite"):
        ensure_default_model(tmp_path, progress=lambda _: None)


# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "answer"), SEED_EXCHANGES)
def test_generate_sync_answers_seed_questions(
    local_model: LocalModel, question: str, answer: str
) -> None:
    assert local_model.generate_sync(messages=[user(question)]) == answer


# --- fitting the context window ------------------------------------------------------------


def long_history(turns: int) -> list[dict[str, str]]:
    history: list[dict[str, str]] = []
    for index in range(turns):
        question, answer = TINY_EXCHANGES[index % len(TINY_EXCHANGES)]
        history += [user(f"{index}: {question}"), assistant(answer)]
    return history


def test_fit_to_context_keeps_everything_when_it_fits(local_model: LocalModel) -> None:
    messages = [user("Hello"), assistant("Hi"), user("Thank you")]
    assert local_model.fit_to_context(messages) == messages


def test_fit_to_context_drops_oldest_whole_turns(local_model: LocalModel) -> None:
    system = {"role": "system", "content": "Be helpful."}
    question = SEED_EXCHANGES[0][0]
    messages = [system, *long_history(60), user(question)]
    fitted = local_model.fit_to_context(messages, max_new_tokens=64)

    assert fitted[0] == system
    assert fitted[-1] == user(question)
    assert len(fitted) % 2 == 0  # system + whole pairs + last user
    kept = fitted[1:-1]
    assert 0 < len(kept) < 120
    assert kept == messages[-1 - len(kept) : -1]  # the newest turns, unchanged
    tokens = local_model.tokenizer(format_prompt(fitted), add_special_tokens=False)["input_ids"]
    assert len(tokens) <= local_model.context_window - 64
    # One more pair would not have fitted.
    bigger = [system, *messages[-3 - len(kept) : -1], user(question)]
    more = local_model.tokenizer(format_prompt(bigger), add_special_tokens=False)["input_ids"]
    assert len(more) > local_model.context_window - 64


def test_generate_with_overflowing_history_still_answers(local_model: LocalModel) -> None:
    question, answer = SEED_EXCHANGES[1]
    messages = [*long_history(60), user(question)]
    assert local_model.generate_sync(messages=messages, max_new_tokens=64) == answer


def test_huge_user_message_keeps_its_question_and_is_answered(local_model: LocalModel) -> None:
    question = SEED_EXCHANGES[0][0]
    huge = "Hello there. " + "blah " * 20_000 + question  # ~100 KB, the question at the end
    fitted = local_model.fit_prompt([user(huge)], max_new_tokens=64)
    assert fitted.cut_newest and fitted.note
    content = fitted.messages[0]["content"]
    assert content.startswith("Hello there.") and content.endswith(question)
    assert len(fitted.token_ids) <= local_model.context_window - 64
    assert isinstance(local_model.generate_sync(messages=[user(huge)], max_new_tokens=64), str)


def test_max_new_tokens_must_leave_room(local_model: LocalModel) -> None:
    with pytest.raises(ValueError, match="no room"):
        local_model.fit_to_context([user("hi")], max_new_tokens=local_model.context_window)


def test_history_pairs_caps_the_history(local_model: LocalModel) -> None:
    capped = LocalModel(
        local_model.model,
        local_model.tokenizer,
        version="capped",
        device="cpu",
        history_pairs=1,
    )
    system = {"role": "system", "content": "Be helpful."}
    messages = [system, *long_history(3), user("Thank you")]
    assert capped.fit_to_context(messages) == [system, *messages[-3:]]
    capped.history_pairs = 0
    assert capped.fit_to_context(messages) == [system, user("Thank you")]
    # The tiny model never saw history or system prompts in this shape; capped, it answers.
    assert capped.generate_sync(messages=messages[1:]) == "You're welcome!"


def test_single_exchange_models_declare_no_history(tmp_path: Path, local_model: LocalModel) -> None:
    from model.bootstrap import TINY, build_default_model

    assert local_model.history_pairs is None  # the tiny model trains on dialogues too
    config = TINY.with_overrides(epochs=1, multi_turn_share=0.0, seed_check=False)
    folder = build_default_model(
        tmp_path / "m", exchanges=TINY_EXCHANGES[:2], config=config, progress=lambda _: None
    )
    assert json.loads((folder / "config.json").read_text())["chat_history_pairs"] == 0
    assert LocalModel.load(folder, device="cpu").history_pairs == 0


# --- the version names the weights ---------------------------------------------------------


def copy_model(source: Path, target: Path, *, mtime: float) -> Path:
    shutil.copytree(source, target)
    for file in target.iterdir():
        os.utime(file, (mtime, mtime))
    return target


def test_version_hashes_file_contents_not_mtimes(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = copy_model(tiny_model_dir, tmp_path / "a" / "model", mtime=1_000_000_000)
    second = copy_model(tiny_model_dir, tmp_path / "b" / "model", mtime=1_700_000_000)
    assert folder_version(first) == folder_version(second)

    weights = bytearray((second / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one byte of the last tensor
    (second / "model.safetensors").write_bytes(bytes(weights))
    os.utime(second / "model.safetensors", (1_700_000_000, 1_700_000_000))
    assert folder_version(first) != folder_version(second)


def test_version_covers_config_and_is_stable(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "model", mtime=1_000_000_000)
    before = folder_version(folder)
    assert before == folder_version(folder)
    config = json.loads((folder / "config.json").read_text())
    config["chat_history_pairs"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    assert folder_version(folder) != before


def test_hub_version_names_the_resolved_commit(local_model: LocalModel) -> None:
    config = local_model.model.config
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert hub_version("org/tiny", commit=commit, config=config) == "tiny-0123456789"
    # Commit unknown (offline, nothing cached): the loaded config's hash, stable.
    fallback = hub_version("org/tiny", commit=None, config=config)
    assert fallback.startswith("tiny-") and fallback != "tiny-0123456789"
    assert fallback == hub_version("org/tiny", commit=None, config=copy.deepcopy(config))


# --- generation settings -------------------------------------------------------------------


@pytest.fixture
def tuned(local_model: LocalModel) -> Callable[..., LocalModel]:
    """LocalModels sharing the tiny model's weights, with other generation settings."""

    def make(**settings: Any) -> LocalModel:
        return LocalModel(
            local_model.model,
            local_model.tokenizer,
            version="tuned",
            device="cpu",
            generation=GenerationSettings(**settings),
        )

    return make


def test_generation_settings_are_keyword_only_and_frozen() -> None:
    settings = GenerationSettings(temperature=0.7)
    assert (settings.top_p, settings.repetition_penalty, settings.stop_strings) == (1.0, 1.0, ())
    with pytest.raises(TypeError):
        GenerationSettings(0.7)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 0.0  # type: ignore[misc]
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


def test_greedy_is_the_default(local_model: LocalModel) -> None:
    assert local_model.generation == GenerationSettings()
    assert local_model.generation.temperature == 0.0


def test_sampling_with_a_fixed_seed_is_reproducible(tuned: Callable[..., LocalModel]) -> None:
    model = tuned(temperature=5.0, top_p=0.95)
    question = [user(SEED_EXCHANGES[0][0])]

    def sampled(seed: int) -> str:
        torch.manual_seed(seed)
        return model.generate_sync(messages=question, max_new_tokens=12)

    assert sampled(1) == sampled(1)
    # Sampling really is on: this hot, some seed strays from the greedy answer.
    greedy = SEED_EXCHANGES[0][1]
    assert any(not greedy.startswith(sampled(seed)) for seed in range(2, 6))


def test_a_stop_string_cuts_the_reply(tuned: Callable[..., LocalModel]) -> None:
    question, answer = SEED_EXCHANGES[0]  # "You can reset your password by clicking ..."
    model = tuned(stop_strings=("password",))
    expected = answer[: answer.index("password")].strip()
    assert model.generate_sync(messages=[user(question)]) == expected


async def test_a_stop_string_cuts_the_stream_and_the_batched_reply(
    tuned: Callable[..., LocalModel],
) -> None:
    question, answer = SEED_EXCHANGES[0]
    service = ModelService(tuned(stop_strings=("password",)))
    expected = answer[: answer.index("password")].strip()
    try:
        stream = service.stream(messages=[user(question)])
        pieces = [piece async for piece in stream]
        assert "".join(pieces).strip() == expected
        assert stream.reply is not None and stream.reply.text == expected
        assert (await service.generate(messages=[user(question)])).text == expected
    finally:
        service.close()


def test_stop_cutter_releases_a_partial_stop_string_at_the_end() -> None:
    cutter = StopCutter(("password",))
    assert cutter.feed("reset your pass") == "reset your "
    assert cutter.finish() == "pass"  # the reply ended: it was text, not a stop string
    cutter = StopCutter(("password",))
    assert cutter.feed("reset your pass") + cutter.feed("word now") == "reset your "
    assert cutter.finish() == ""


# --- device and dtype ----------------------------------------------------------------------


def test_dtype_can_be_chosen(tiny_model_dir: Path) -> None:
    model = LocalModel.load(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16
    assert model.device == "cpu"


def test_auto_picks_the_cpu_and_float32_without_cuda(local_model: LocalModel) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert LocalModel.resolve_device("auto") == "cpu"
    assert LocalModel.resolve_dtype("auto", device="cpu") == torch.float32
    assert LocalModel.resolve_dtype("auto", device="cuda:0") == torch.bfloat16
    assert LocalModel.resolve_dtype("float16", device="cpu") == torch.float16


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_an_unavailable_device_is_a_load_error(tiny_model_dir: Path, device: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match=rf"device {device}.*not available"):
        LocalModel.load(tiny_model_dir, device=device)


@pytest.mark.parametrize(
    ("device", "dtype"), [("tpu", "auto"), ("cpu", "int8"), ("cuda:x", "auto")]
)
def test_unknown_device_or_dtype_is_a_load_error(
    tiny_model_dir: Path, device: str, dtype: str
) -> None:
    with pytest.raises(ModelLoadError, match="unknown"):
        LocalModel.load(tiny_model_dir, device=device, dtype=dtype)


def test_passing_thread_work_runs_on_a_thread_that_ends() -> None:
    # Torch work on a live thread slows the batch worker for good; these helpers leave none.
    from model.service import on_passing_thread

    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 7

    assert on_passing_thread(work) == 7
    (thread,) = ran_on
    assert thread is not threading.current_thread() and not thread.is_alive()

    def fail() -> None:
        raise ValueError("broken folder")

    with pytest.raises(ValueError, match="broken folder"):
        on_passing_thread(fail)


async def test_awaited_passing_thread_work_runs_on_a_thread_that_ends() -> None:
    from model.service import in_passing_thread

    ran_on: list[threading.Thread] = []

    def work() -> str:
        ran_on.append(threading.current_thread())
        return "loaded"

    assert await in_passing_thread(work) == "loaded"
    (thread,) = ran_on
    thread.join(5)
    assert thread is not threading.current_thread() and not thread.is_alive()


async def test_a_small_model_decodes_on_one_thread_a_large_one_on_every_core(
    tiny_model_dir,
) -> None:
    # A small model's decoding step is Python overhead: a second torch thread only spins
    # against the event loop's. One under SMALL_MODEL_PARAMETERS decodes on one thread.
    import torch

    from model.batching import SMALL_MODEL_PARAMETERS, decoding_threads

    service = ModelService.load(tiny_model_dir, device="cpu")
    ask = [{"role": "user", "content": "Hello"}]
    try:
        model = service.local.model
        assert sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
        await service.generate(messages=ask, max_new_tokens=4)
        assert service.stats().threads == 1
    finally:
        await service.aclose()
    large = torch.nn.Linear(8_000, 8_000)  # 64M parameters
    assert decoding_threads(large, device="cpu", requested=0) is None  # torch's own count
    assert decoding_threads(model, device="cpu", requested=3) == 3  # MODEL_THREADS wins
    assert decoding_threads(model, device="cuda", requested=0) is None


def test_a_large_model_packed_for_serving_still_decodes_on_every_core(
    tiny_model_dir, monkeypatch
) -> None:
    # Packing moves the linear weights out of parameters(); the model is no smaller for it.
    import model.batching
    from model.fast_linear import model_parameters, pack_linear_layers

    local = LocalModel.load(tiny_model_dir, device="cpu")
    saved = model_parameters(local.model)
    pack_linear_layers(local.model, smallest=0)
    left = sum(p.numel() for p in local.model.parameters())
    monkeypatch.setattr(model.batching, "SMALL_MODEL_PARAMETERS", (left + saved) // 2)
    assert model.batching.decoding_threads(local.model, device="cpu", requested=0) is None


async def test_the_service_lends_cores_to_a_trainer_and_takes_them_back(tiny_model_dir) -> None:
    """torch's thread count is per thread: the batch worker itself switches, between steps."""

    from model.retrain import serving_beside_training

    # Two threads asked for (the tiny model alone would decode on one, see below).
    service = ModelService.load(tiny_model_dir, device="cpu", batch=BatchSettings(threads=2))
    ask = [{"role": "user", "content": "Hello"}]
    try:
        await service.generate(messages=ask, max_new_tokens=4)
        at_start = service.stats().threads
        assert at_start == 2
        with serving_beside_training(service, trainer_threads=max(1, (os.cpu_count() or 2) - 1)):
            await service.generate(messages=ask, max_new_tokens=4)
            assert service.stats().threads == 1
        await service.generate(messages=ask, max_new_tokens=4)
        assert service.stats().threads == at_start
    finally:
        await service.aclose()


async def test_a_model_served_after_one_on_a_single_thread_decodes_on_every_core(
    tiny_model_dir, monkeypatch
) -> None:
    # torch hands each new thread the count last set anywhere in the process: a scheduler
    # that ran on one thread must not leave the next one (a hot swap's) on one.
    import torch

    import model.batching

    every_core = torch.get_num_threads()
    if every_core < 2:
        pytest.skip("torch runs on one thread here: nothing to tell apart")
    ask = [{"role": "user", "content": "Hello"}]
    small = ModelService.load(tiny_model_dir, device="cpu", batch=BatchSettings(threads=1))
    try:
        await small.generate(messages=ask, max_new_tokens=4)
        assert small.stats().threads == 1
    finally:
        await small.aclose()
    monkeypatch.setattr(model.batching, "SMALL_MODEL_PARAMETERS", 0)  # the tiny one is large
    large = ModelService.load(tiny_model_dir, device="cpu")
    try:
        await large.generate(messages=ask, max_new_tokens=4)
        assert large.stats().threads == every_core
    finally:
        await large.aclose()
