"""Linear layers packed for oneDNN (model.fast_linear): the same logits and greedy replies, no
second copy of the weights, and the service converting only where it helps."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model import fast_linear
from model.corpus import SEED_EXCHANGES, load_starter_corpus
from model.fast_linear import (
    PACKED_LAYER_MIN_WEIGHTS,
    PackedLinear,
    model_parameters,
    pack_linear_layers,
    packed_weights,
    packing_available,
    speeds_up,
)
from model.kv_cache import roomy_cache
from model.service import BatchSettings, LocalModel, ModelService
from tests.model.test_batching import QUESTIONS, changed_copy, user


@pytest.fixture(scope="module")
def original(tiny_model_dir: Path) -> LocalModel:
    return LocalModel.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path) -> LocalModel:
    local = LocalModel.load(tiny_model_dir, device="cpu")
    pack_linear_layers(local.model, smallest=0)  # every layer, however small
    return local


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | PackedLinear)]


def storage_bytes(model: nn.Module) -> int:
    """The bytes of the distinct storages behind the model's parameters and buffers."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    return sum(storages.values())


def prefill_and_step(model: Any, ids: torch.Tensor, last: torch.Tensor) -> list[torch.Tensor]:
    """The logits of a prefill of ``ids``, then of one decoding step (``last``, a position per
    row: the fewest rows a product gets)."""
    cache = roomy_cache()
    with torch.inference_mode():
        prefill = model(input_ids=ids, cache=cache, use_cache=True).logits
        step = model(input_ids=last, cache=cache, use_cache=True).logits
    return [prefill, step]


def test_every_linear_layer_is_converted(original: LocalModel, converted: LocalModel) -> None:
    before = linears(original.model)
    after = linears(converted.model)
    assert len(after) == len(before) > 0
    assert all(type(m) is PackedLinear for m in after)
    for old, new in zip(before, after, strict=True):
        assert isinstance(old, nn.Linear) and isinstance(new, PackedLinear)
        assert new.packed.layout == torch._mkldnn  # type: ignore[attr-defined]
        assert (new.out_features, new.in_features) == tuple(old.weight.shape)
        assert torch.equal(new.weight, old.weight)  # packing keeps every weight as it was
    # The embedding stays as it was; the (tied) head has a packed copy of its own.
    embedding = converted.model.get_input_embeddings().weight
    assert torch.equal(embedding, original.model.get_input_embeddings().weight)
    assert isinstance(converted.model.lm_head, PackedLinear)


def test_layers_too_small_to_gain_stay_nn_linear() -> None:
    # oneDNN's call costs more than MKL's; below PACKED_LAYER_MIN_WEIGHTS it gains nothing.
    side = int(PACKED_LAYER_MIN_WEIGHTS**0.5)
    layers = [nn.Linear(side, side), nn.Linear(side, side - 1), nn.Linear(8, 8)]
    assert layers[0].weight.numel() == PACKED_LAYER_MIN_WEIGHTS
    model = nn.Sequential(*layers)

    assert pack_linear_layers(model) == 1

    assert [type(m) for m in model] == [PackedLinear, nn.Linear, nn.Linear]
    assert pack_linear_layers(model, smallest=0) == 2
    assert all(type(m) is PackedLinear for m in model)


def test_a_packed_layer_takes_what_nn_linear_takes() -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 20, bias=True)
    packed = PackedLinear.from_linear(linear)
    inputs = [
        torch.randn(5, 48, generator=generator),  # rows
        torch.randn(3, 7, 48, generator=generator),  # a batch of sequences
        torch.randn(48, 6, generator=generator).t(),  # not contiguous
        torch.randn(1, 48, generator=generator),
    ]
    with torch.inference_mode():
        for x in inputs:
            got, want = packed(x), linear(x)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rows", [32, 1])
def test_logits_stay_equal(original: LocalModel, converted: LocalModel, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    vocab = original.model.config.vocab_size
    ids = torch.randint(5, vocab, (rows, 12), generator=generator)
    last = torch.randint(5, vocab, (rows, 1), generator=generator)
    want = prefill_and_step(original.model, ids, last)
    got = prefill_and_step(converted.model, ids, last)
    for wanted, gotten in zip(want, got, strict=True):
        assert gotten.shape == wanted.shape
        assert (wanted - gotten).abs().max().item() <= 1e-5


async def test_greedy_batched_replies_still_equal_plain_generate(
    original: LocalModel, converted: LocalModel
) -> None:
    questions = [*QUESTIONS, *(q for q, _ in load_starter_corpus()[: 32 - len(QUESTIONS)])]
    prompts = [original.fit_prompt(user(q), max_new_tokens=40).token_ids for q in questions]
    expected = [original.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts]
    assert [converted.generate_ids_sync(ids, max_new_tokens=40) for ids in prompts] == expected
    service = ModelService(
        LocalModel(converted.model, converted.tokenizer, version="converted", device="cpu"),
        batch=BatchSettings(max_batch=32, max_wait=0.05),
    )
    try:
        scheduler = service._engine.scheduler
        requests = [scheduler.submit(prompt_ids=ids, max_new_tokens=40) for ids in prompts]
        assert [await request.done for request in requests] == expected
        assert service.stats().largest_batch == 32
    finally:
        await service.aclose()


def test_no_second_copy_of_the_weights(tiny_model_dir: Path) -> None:
    local = LocalModel.load(tiny_model_dir, device="cpu")
    model: Any = local.model
    count = sum(p.numel() for p in model.parameters())
    size = storage_bytes(model)
    originals = [weakref.ref(m.weight) for m in linears(model)]
    embedding = model.get_input_embeddings().weight
    tied = model.lm_head.weight is embedding
    head_copy = embedding.numel() if tied else 0

    pack_linear_layers(model, smallest=0)
    gc.collect()

    # Each original weight is gone (the tied head's is the embedding, which stays).
    alive = [ref() for ref in originals if ref() is not None]
    assert all(weight is embedding for weight in alive)
    # The parameters left are the rest (embedding, norms); the packed layers hold the linear
    # weights once each, and only the tied head's is a second copy.
    assert all(isinstance(module, PackedLinear) for module in linears(model))
    linear_weights = packed_weights(model)
    left = sum(p.numel() for p in model.parameters())
    assert left + linear_weights == count + head_copy
    # What the parameters held of the linear weights is freed, the rest stays.
    assert storage_bytes(model) == size - (count - left) * embedding.element_size()


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_model_counts_the_parameters_it_was_saved_with(
    tiny_model_dir: Path, tied: bool
) -> None:
    local = LocalModel.load(tiny_model_dir, device="cpu")
    model: Any = local.model
    if not tied and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    saved = sum(p.numel() for p in model.parameters())
    assert model_parameters(model) == saved

    pack_linear_layers(model, smallest=0)

    # parameters() lost the linear weights; the count does not (the decoding threads and the
    # benchmark's roof read it).
    assert sum(p.numel() for p in model.parameters()) < saved
    assert model_parameters(model) == saved


@pytest.fixture
def pack_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service packs every layer of the tiny model (all under the threshold otherwise)."""
    monkeypatch.setattr(fast_linear, "PACKED_LAYER_MIN_WEIGHTS", 0)


def test_the_service_packs_the_layers_big_enough_to_gain(
    tiny_model_dir: Path, original: LocalModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def served() -> list[type]:
        service = ModelService.load(tiny_model_dir, device="cpu")
        try:
            return [type(m) for m in linears(service.local.model)]
        finally:
            service.close()

    sizes = [m.weight.numel() for m in original.model.modules() if isinstance(m, nn.Linear)]
    assert served() == [
        PackedLinear if size >= PACKED_LAYER_MIN_WEIGHTS else nn.Linear for size in sizes
    ]
    # A threshold at the largest layer (the head) packs that one and leaves the others.
    monkeypatch.setattr(fast_linear, "PACKED_LAYER_MIN_WEIGHTS", max(sizes))
    assert served() == [PackedLinear if size == max(sizes) else nn.Linear for size in sizes]
    assert served().count(PackedLinear) < len(sizes)


@pytest.mark.usefixtures("pack_every_layer")
def test_the_service_converts_on_the_cpu_in_float32_only(
    tiny_model_dir: Path, original: LocalModel
) -> None:
    def kinds(service: ModelService) -> set[type]:
        return {type(m) for m in linears(service.local.model)}

    cases: list[tuple[dict[str, Any], set[type]]] = [
        ({}, {PackedLinear}),
        ({"pack_linear": False}, {nn.Linear}),
        ({"dtype": "bfloat16"}, {nn.Linear}),
    ]
    for options, expected in cases:
        service = ModelService.load(tiny_model_dir, device="cpu", **options)
        try:
            assert kinds(service) == expected
        finally:
            service.close()
    assert speeds_up(original.model, "cpu") and not speeds_up(original.model, "cuda")


def test_without_onednn_nothing_is_packed(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not packing_available()
    service = ModelService.load(tiny_model_dir, device="cpu")
    try:
        assert {type(m) for m in linears(service.local.model)} == {nn.Linear}
    finally:
        service.close()


@pytest.mark.usefixtures("pack_every_layer")
async def test_models_swapped_in_are_converted_too(tmp_path: Path, tiny_model_dir: Path) -> None:
    service = ModelService(LocalModel.load(tiny_model_dir, device="cpu"))
    try:
        assert {type(m) for m in linears(service.local.model)} == {nn.Linear}  # served as given
        version = await service.swap(changed_copy(tiny_model_dir, tmp_path / "new"))
        assert {type(m) for m in linears(service.local.model)} == {PackedLinear}
        reply = await service.generate(messages=user(SEED_EXCHANGES[0][0]), max_new_tokens=64)
        assert reply.text == SEED_EXCHANGES[0][1] and reply.model_version == version
    finally:
        await service.aclose()
