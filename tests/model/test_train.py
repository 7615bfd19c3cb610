"""Fine-tuning (model/train.py, model/train_examples.py): the loss mask at the token level, the
replay mix, a real training run on the tiny model, and the training process's JSON protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from model.local_model import LocalModel
from model.train import Progress, Recipe, TrainingJob, fine_tune, training_examples
from model.train_examples import (
    IGNORE_INDEX,
    Example,
    PackedCollator,
    PaddingCollator,
    encode_exchange,
    packing_is_exact,
)

TAUGHT = [
    ("What colour is the office door?", "The office door is green."),
    ("Who waters the plants?", "Sam waters the plants on Fridays."),
    ("Where is the spare key?", "The spare key is under the blue mat."),
]


def exchange(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> LocalModel:
    return LocalModel.load(tiny_model_dir, device="cpu")


def test_the_loss_falls_on_the_answer_and_its_eos_only(local: LocalModel) -> None:
    question, answer = TAUGHT[0]
    example = encode_exchange(local, exchange(question, answer))
    assert example is not None
    served = local.fit_prompt([{"role": "user", "content": question}], max_new_tokens=32)
    prompt_length = len(served.token_ids)
    # The prompt is exactly what serving feeds the model, and none of it is learned.
    assert example.input_ids[:prompt_length] == served.token_ids
    assert example.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    # Everything after it is learned: the answer's tokens, then eos, so the model learns to stop.
    learned = example.labels[prompt_length:]
    assert learned == example.input_ids[prompt_length:]
    assert IGNORE_INDEX not in learned
    assert learned[-1] == local.tokenizer.eos_token_id
    assert local.tokenizer.decode(learned, skip_special_tokens=True).strip() == answer


def test_examples_follow_the_served_history_setting(local: LocalModel) -> None:
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": TAUGHT[1][0]},
        {"role": "assistant", "content": TAUGHT[1][1]},
    ]
    example = encode_exchange(local, conversation)
    assert example is not None
    served = local.fit_prompt(conversation[:-1], max_new_tokens=32)
    assert example.input_ids[: len(served.token_ids)] == served.token_ids
    # The tiny model declares no history pairs? Then the earlier turn is not in the example.
    if local.history_pairs == 0:
        assert "Hello" not in local.tokenizer.decode(example.input_ids)


def test_unusable_exchanges_are_skipped(local: LocalModel) -> None:
    assert encode_exchange(local, [{"role": "user", "content": "hi"}]) is None  # no answer
    assert encode_exchange(local, exchange("hi", "   ")) is None  # empty answer
    assert encode_exchange(local, [{"role": "assistant", "content": "x"}] * 2) is None
    huge = "word " * (local.context_window * 2)
    assert encode_exchange(local, exchange(huge, "ok")) is None  # cut question: not learned


def fake(n: int) -> Example:
    return Example(input_ids=[n], labels=[n])


def test_each_pass_shows_every_new_example_and_fresh_replay() -> None:
    new = [fake(i) for i in range(4)]
    replay = [fake(100 + i) for i in range(10)]
    order = training_examples(new, replay, Recipe(epochs=5, replay_ratio=2.0, seed=3))
    counts = Counter(example.input_ids[0] for example in order)
    assert all(counts[i] == 5 for i in range(4))  # every new example, once a pass
    assert sum(counts[100 + i] for i in range(10)) == 5 * 4 * 2  # the ratio, each pass
    # Drawn without repeats until the pool is used up: 40 draws of 10 are 4 of each.
    assert {counts[100 + i] for i in range(10)} == {4}
    assert len(training_examples(new, [], Recipe(epochs=3))) == 12  # no replay pool


def features(examples: list[Example | None]) -> list[dict[str, list[int]]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples if e is not None]


def test_packed_batches_compute_what_padded_batches_compute(local: LocalModel) -> None:
    import torch

    from model.bootstrap import TINY_EXCHANGES

    # Lengths that differ, so the padded batch really pads.
    batch = features([encode_exchange(local, exchange(q, a)) for q, a in TINY_EXCHANGES[:6]])
    assert len({len(f["input_ids"]) for f in batch}) > 1
    packed = PackedCollator()(batch)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in batch))  # no pad
    local.model.train()  # as the Trainer runs it (a KV cache there would undo the packing)
    try:
        with torch.no_grad():
            padded_loss = local.model(**PaddingCollator(local.tokenizer.pad_token_id)(batch)).loss
            packed_loss = local.model(**packed).loss
    finally:
        local.model.eval()
    # Each example attends to itself only: the same loss as separate rows.
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=1e-5)
    assert packing_is_exact(local.model, batch)


def test_a_model_that_cannot_keep_packed_examples_apart_is_found_out(local: LocalModel) -> None:
    import torch

    from model.bootstrap import TINY_EXCHANGES

    class IgnoresPositions(torch.nn.Module):
        """A model that attends across the whole row, as one without packed-sequence masks."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, **inputs: object) -> object:
            inputs.pop("position_ids", None)
            return self.model(**inputs)

    batch = features([encode_exchange(local, exchange(q, a)) for q, a in TINY_EXCHANGES[:3]])
    assert not packing_is_exact(IgnoresPositions(local.model), batch)


def test_a_training_takes_every_core_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert Recipe().thread_count() == 6  # niced: the bot's replies come first (see retrain.py)
    assert Recipe(threads=2).thread_count() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert Recipe().thread_count() == 1


def test_the_method_follows_the_size() -> None:
    recipe = Recipe(lora_from_parameters=1000)
    assert recipe.chosen_method(999) == "full"
    assert recipe.chosen_method(1000) == "lora"
    assert Recipe(method="full", lora_from_parameters=1).chosen_method(10**9) == "full"
    with pytest.raises(ValueError, match="epochs"):
        Recipe(epochs=0)


def test_a_fine_tuned_model_answers_what_it_was_taught(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from model.bootstrap import TINY_EXCHANGES

    before = LocalModel.load(tiny_model_dir, device="cpu")
    ask = [{"role": "user", "content": TAUGHT[0][0]}]
    assert before.generate_sync(messages=ask, max_new_tokens=24) != TAUGHT[0][1]
    progress: list[Progress] = []
    report = fine_tune(
        base=tiny_model_dir,
        output=tmp_path / "candidate",
        new=[exchange(*pair) for pair in TAUGHT],
        replay=[exchange(*pair) for pair in TINY_EXCHANGES],
        recipe=Recipe(epochs=100, replay_ratio=1.0, learning_rate=5e-3, batch_size=8),
        progress=progress.append,
    )
    assert report.method == "full"
    assert report.new_examples == 3
    assert report.examples == 100 * 3 * 2
    assert progress and progress[-1].step <= report.steps
    assert report.losses[-1][1] < report.losses[0][1]  # it learned something
    assert report.batches == "packed"  # padding-free, each example in its own attention
    after = LocalModel.load(tmp_path / "candidate", device="cpu")  # a plain model folder
    answers = [
        after.generate_sync(messages=[{"role": "user", "content": q}], max_new_tokens=24)
        for q, _ in TAUGHT
    ]
    assert answers == [a for _, a in TAUGHT]
    assert (tmp_path / "candidate" / "chat_template.jinja").is_file()


def test_the_training_process_reports_in_json_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    TrainingJob(
        base=str(tiny_model_dir),
        output=str(tmp_path / "out"),
        new=[exchange(*TAUGHT[0])],
        replay=[],
        recipe={"epochs": 2, "batch_size": 1},
    ).write(job)
    done = subprocess.run(
        [sys.executable, "-m", "model.train", str(job)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]  # nothing but JSON
    assert events[-1]["event"] == "done"
    assert events[-1]["report"]["steps"] == 2
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "loss.png").read_bytes().startswith(b"\x89PNG")  # the curve


def test_a_training_that_cannot_run_says_why(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    TrainingJob(
        base=str(tmp_path / "missing"), output=str(tmp_path / "out"), new=[], replay=[]
    ).write(job)
    done = subprocess.run(
        [sys.executable, "-m", "model.train", str(job)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["event"] == "failed"
    assert "missing" in last["error"]


def test_private_training_clips_noises_and_stays_within_its_epsilon(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    from model.bootstrap import TINY_EXCHANGES
    from model.train import train_privately

    local = LocalModel.load(tiny_model_dir, device="cpu")
    examples = [encode_exchange(local, exchange(q, a)) for q, a in TINY_EXCHANGES] * 4
    recipe = Recipe(epochs=3, batch_size=8, dp_epsilon=4.0, dp_delta=1e-4, dp_max_grad_norm=0.01)
    seen: list[dict[str, float]] = []

    def inspect(optimizer: object) -> None:
        parameters = [p for p in local.model.parameters() if p.requires_grad]
        # Per-sample gradients were computed for every trained weight...
        assert all(getattr(p, "grad_sample", None) is not None for p in parameters)
        batch = parameters[0].grad_sample.shape[0]
        per_sample = torch.stack(
            [p.grad_sample.reshape(batch, -1).norm(dim=1) for p in parameters]
        ).norm(dim=0)
        # ...each sample's gradient was clipped to the bound before summing...
        clipped = torch.stack([p.summed_grad.norm() for p in parameters]).norm()
        assert float(clipped) <= 0.01 * batch + 1e-6
        # ...and the gradient stepped on is not the clipped sum alone: noise was added.
        averaged = [p.summed_grad / optimizer.expected_batch_size for p in parameters]  # type: ignore[attr-defined]
        noise = sum(float((p.grad - a).norm()) for p, a in zip(parameters, averaged, strict=True))
        seen.append({"unclipped": float(per_sample.max()), "noise": noise})

    local.model.train()
    logged: list[tuple[int, int, float]] = []
    steps, dp = train_privately(
        local.model,
        [e for e in examples if e is not None],
        recipe,
        PaddingCollator(local.tokenizer.pad_token_id),
        lambda *entry: logged.append(entry),
        inspect=inspect,
    )
    assert steps == len(seen) > 0
    assert all(entry["noise"] > 0 for entry in seen)
    assert any(entry["unclipped"] > 0.01 for entry in seen)  # the bound really bit
    assert 0 < dp["epsilon"] <= 4.0 + 1e-6
    assert dp["noise_multiplier"] > 0 and dp["delta"] == 1e-4


def test_a_private_fine_tune_records_its_privacy(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = fine_tune(
        base=tiny_model_dir,
        output=tmp_path / "private",
        new=[exchange(*pair) for pair in TAUGHT],
        replay=[],
        recipe=Recipe(epochs=2, batch_size=2, dp_epsilon=8.0),
    )
    assert report.dp is not None and 0 < report.dp["epsilon"] <= 8.0 + 1e-6
    assert report.batches == "padded"  # one row per sample: Opacus clips per row
    assert LocalModel.load(tmp_path / "private", device="cpu").version


def test_lora_adapters_are_merged_into_a_plain_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = fine_tune(
        base=tiny_model_dir,
        output=tmp_path / "lora",
        new=[exchange(*pair) for pair in TAUGHT],
        replay=[],
        recipe=Recipe(epochs=2, batch_size=2, lora_from_parameters=1),  # every model is "large"
    )
    assert report.method == "lora"
    folder = tmp_path / "lora"
    assert not (folder / "adapter_config.json").exists()  # merged: no adapter left to load
    merged = LocalModel.load(folder, device="cpu")
    names = {name for name, _ in merged.model.named_parameters()}
    assert not any("lora" in name for name in names)
    base = LocalModel.load(tiny_model_dir, device="cpu")
    assert names == {name for name, _ in base.model.named_parameters()}
    trained = dict(merged.model.named_parameters())
    changed = [
        name
        for name, weight in base.model.named_parameters()
        if not bool((weight == trained[name]).all())
    ]
    assert any(name.endswith("q_proj.weight") for name in changed)  # the adapters' updates
