"""Fine-tuning a served model on the exchanges people taught it (issue #11).

The recipe, for a model that memorises what it is taught (the default model learns answers
word for word): every new exchange is shown :attr:`Recipe.epochs` times, mixed with
:attr:`Recipe.replay_ratio` times as many starter-corpus exchanges drawn afresh each pass, so
the model keeps what it knew. Measured on the default model with 20 new exchanges (2026-12-02,
one thread): replaying a fixed sample of 100 or 400 starter exchanges while the new ones are
learned keeps 4-9 of 60 starter answers (52 before); LoRA adapters of rank 8-16 keep 22-28;
drawing a fresh sample each pass, five per new exchange shown, keeps 47 of 48 and learns all 20.
That five was measured on one build of the default model; a build on another CPU (other kernels,
other weights: final loss 0.391 against 0.367) kept only 40-43 of the 47 it answered, over seeds
0-2, learning 18-19 of 20. Fifteen per new exchange kept 49-50 and learned 20 on every seed (10:
45-48, 12: 47-49), so that is the default (2026-12-02, 27 s of training for 20 new exchanges).

Every example is encoded the way the model is served: the prompt is :meth:`LocalModel.fit_prompt`
of the conversation before the answer (the same formatter, the same history setting, the same
context window), the answer is what follows it in the full conversation's ids, ending with eos.
The loss is on the answer tokens only (``labels`` is -100 on the prompt; see
:func:`encode_exchange`), so the model learns to answer and to stop.

Training is transformers' :class:`~transformers.Trainer` over those pre-tokenized examples. Not
TRL's ``SFTTrainer``: TRL 1.16 always replaces the LM head with a chunked log-prob kernel (made to
save memory on large vocabularies), which took 60% of each step on the default model: the same
run, same loss to five digits, took 81.5 s under ``SFTTrainer`` and 49.9 s under ``Trainer``.

Large models (:attr:`Recipe.method`, by default from :attr:`Recipe.lora_from_parameters`) train
LoRA adapters (PEFT) that are merged before saving, so the result is a plain model folder.
Nothing here assumes one device: under ``accelerate launch`` the Trainer spreads the work.

Run as its own process (what the bot and ``chatbot train`` do)::

    python -m model.train JOB.json

where the job file names the base model, the output folder, the data and the recipe; progress
and the result are printed as JSON lines on stdout (see :func:`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from model.train_examples import (
    Example,
    ExampleDataset,
    Messages,
    PackedCollator,
    PaddingCollator,
    collator_for,
    encode_exchange,
)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a retrain trains (settings RETRAIN_*)."""

    #: Times each new exchange is shown.
    epochs: int = 20
    #: Starter-corpus exchanges shown per new exchange shown (0: no replay).
    replay_ratio: float = 15.0
    learning_rate: float = 1e-3
    batch_size: int = 16
    #: ``full`` fine-tunes every weight, ``lora`` trains adapters and merges them, ``auto``
    #: chooses by size.
    method: Literal["auto", "full", "lora"] = "auto"
    lora_from_parameters: int = 100_000_000
    lora_rank: int = 16
    #: torch threads of the training process (0: every core). The trainer runs under ``nice``
    #: and the bot's service decodes on one thread meanwhile, so replies come first: on the
    #: retrain benchmark (2 cores, 2026-12-02) two trainer threads took 51 s against 68 s on one,
    #: and reply latency stayed at 0.93x idle.
    threads: int = 0
    seed: int = 0
    #: Prepended to every example when the bot serves with one (SYSTEM_PROMPT).
    system_prompt: str = ""
    #: Differential privacy (DP-SGD, Opacus): the ε to reach; None trains without.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, not {self.epochs}")
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must not be negative, not {self.replay_ratio}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")

    def chosen_method(self, parameters: int) -> Literal["full", "lora"]:
        if self.method != "auto":
            return self.method
        return "lora" if parameters >= self.lora_from_parameters else "full"

    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


def training_examples(
    new: Sequence[Example],
    replay: Sequence[Example],
    recipe: Recipe,
    *,
    per_pass: int | None = None,
) -> list[Example]:
    """The examples of a whole run, in order: each pass shows every new example once and a fresh
    draw of ``replay_ratio`` replay examples per new one (cycling through the replay pool before
    repeating any), shuffled together."""
    rng = random.Random(recipe.seed)
    pool = list(replay)
    if per_pass is None:
        per_pass = len(new)
    per_pass = round(per_pass * recipe.replay_ratio) if pool else 0
    drawn: list[Example] = []
    order: list[Example] = []
    for _ in range(recipe.epochs):
        shown = list(new)
        while per_pass and len(drawn) < per_pass:
            rng.shuffle(pool)
            drawn.extend(pool)
        shown += drawn[:per_pass]
        del drawn[:per_pass]
        rng.shuffle(shown)
        order.extend(shown)
    return order


@dataclass(frozen=True, kw_only=True)
class Progress:
    """One progress report of a running training."""

    step: int
    steps: int
    loss: float
    tokens_per_second: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class TrainingReport:
    """What a finished training did."""

    method: str
    steps: int
    examples: int
    new_examples: int
    replay_examples: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    #: ``packed`` (padding-free rows, see :class:`PackedCollator`) or ``padded``.
    batches: str = "padded"
    #: (step, loss) at every logging step, for the loss curve.
    losses: list[tuple[int, float]] = field(default_factory=list)
    dp: dict[str, float] | None = None


def fine_tune(
    *,
    base: Path,
    output: Path,
    new: Sequence[Messages],
    replay: Sequence[Messages],
    recipe: Recipe,
    progress: Callable[[Progress], None] | None = None,
) -> TrainingReport:
    """Train the model folder ``base`` on ``new`` (with ``replay``) and save it to ``output``
    (a plain Hugging Face folder: tokenizer, config, weights, chat template). Blocking; run it
    in a process of its own.

    Raises:
        ValueError: none of ``new`` can be encoded (nothing to learn).
    """
    import torch

    from model.local_model import LocalModel

    torch.set_num_threads(recipe.thread_count())
    torch.manual_seed(recipe.seed)
    local = LocalModel.load(base, device="cpu" if not torch.cuda.is_available() else "auto")
    new_examples = _encoded(local, new, recipe)
    if not new_examples:
        raise ValueError("none of the new exchanges fits the model's context window")
    replay_examples = _encoded(local, replay, recipe)
    examples = training_examples(new_examples, replay_examples, recipe)
    model = local.model
    parameters = sum(p.numel() for p in model.parameters())
    method = recipe.chosen_method(parameters)
    model.train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=recipe.lora_rank,
                lora_alpha=2 * recipe.lora_rank,
                lora_dropout=0.0,
                target_modules="all-linear",
            ),
        )
    tokens = sum(len(example.input_ids) for example in examples)
    losses: list[tuple[int, float]] = []
    started = time.monotonic()

    def logged(step: int, steps: int, loss: float) -> None:
        losses.append((step, loss))
        if progress is not None:
            seconds = time.monotonic() - started
            done = tokens * step / max(steps, 1)
            progress(
                Progress(
                    step=step,
                    steps=steps,
                    loss=loss,
                    tokens_per_second=done / seconds if seconds > 0 else 0.0,
                    seconds=seconds,
                )
            )

    pad_id = _pad_id(local.tokenizer)
    dp: dict[str, float] | None = None
    if recipe.dp_epsilon is None:
        collate = collator_for(model, new_examples, pad_id=pad_id)
        steps = _train_with_trainer(model, examples, recipe, collate, output, logged)
    else:
        # Under DP every exchange is one record: shown once a pass, not laid out repeated.
        examples = new_examples + training_examples(
            [], replay_examples, replace(recipe, epochs=1), per_pass=len(new_examples)
        )
        tokens = sum(len(example.input_ids) for example in examples) * recipe.epochs
        # Opacus computes a gradient per row: one sample a row, padded.
        collate = PaddingCollator(pad_id)
        steps, dp = train_privately(model, examples, recipe, collate, logged)
    seconds = time.monotonic() - started
    if method == "lora":
        model = model.merge_and_unload()
    model.eval()
    _save(model, local.tokenizer, output)
    shown_new = len(new_examples) * recipe.epochs
    return TrainingReport(
        method=method,
        steps=steps,
        examples=len(examples) if dp is None else len(examples) * recipe.epochs,
        new_examples=len(new_examples),
        replay_examples=(len(examples) if dp is None else len(examples) * recipe.epochs)
        - shown_new,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        final_loss=losses[-1][1] if losses else float("nan"),
        batches="packed" if isinstance(collate, PackedCollator) else "padded",
        losses=losses,
        dp=dp,
    )


Logged = Callable[[int, int, float], None]  # (step, steps, loss)


def _train_with_trainer(
    model: Any,
    examples: Sequence[Example],
    recipe: Recipe,
    collate: Any,
    output: Path,
    logged: Logged,
) -> int:
    """transformers' Trainer over ``examples`` (one epoch: the passes are laid out already);
    the number of optimizer steps."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    steps = math.ceil(len(examples) / recipe.batch_size)

    class Reporter(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                logged(state.global_step, steps, float(logs["loss"]))

    arguments = TrainingArguments(
        output_dir=str(output.parent / f".trainer-{output.name}"),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to="none",
        num_train_epochs=1,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, min(20, steps // 20)),
        save_strategy="no",
        dataloader_num_workers=0,
        seed=recipe.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=ExampleDataset(examples),
        data_collator=collate,
        callbacks=[Reporter()],
    )
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON lines for the parent
    return int(trainer.train().global_step)


def train_privately(
    model: Any,
    examples: Sequence[Example],
    recipe: Recipe,
    collate: PaddingCollator,
    logged: Logged,
    *,
    inspect: Callable[[Any], None] | None = None,
) -> tuple[int, dict[str, float]]:
    """DP-SGD with Opacus: ``recipe.epochs`` passes of Poisson-sampled batches, per-sample
    gradients clipped to ``dp_max_grad_norm`` and noised to reach ``dp_epsilon`` at
    ``dp_delta``. The steps and the privacy spent (from Opacus's accountant).

    A loop of its own rather than the Trainer: Opacus must own the optimizer (it clips and
    noises) and the data loader (Poisson sampling is part of the guarantee), and the Trainer
    builds and wraps both through accelerate. The forward, the loss and AdamW are the
    Trainer's. ``inspect`` sees the DP optimizer after each step, before its gradients are
    cleared (tests check the clipping and the noise there).
    """
    import torch
    from opacus import PrivacyEngine

    assert recipe.dp_epsilon is not None
    loader: Any = torch.utils.data.DataLoader(
        ExampleDataset(examples),  # type: ignore[arg-type]
        batch_size=recipe.batch_size,
        collate_fn=collate,
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=recipe.learning_rate)
    engine = PrivacyEngine(accountant="rdp")
    private_model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=recipe.dp_epsilon,
        target_delta=recipe.dp_delta,
        epochs=recipe.epochs,
        max_grad_norm=recipe.dp_max_grad_norm,
    )
    steps = len(loader) * recipe.epochs
    step = 0
    every = max(1, min(20, steps // 20))
    for _ in range(recipe.epochs):
        for batch in loader:
            if batch["input_ids"].numel() == 0:
                # Poisson sampling drew nobody: the step still happens (noise alone), as the
                # accountant counts it.
                for parameter in trained:
                    parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
                optimizer.step()
                optimizer.zero_grad()
                continue
            loss = private_model(**batch).loss
            loss.backward()
            optimizer.step()
            step += 1
            if inspect is not None:
                inspect(optimizer)
            optimizer.zero_grad()
            if step % every == 0:
                logged(step, steps, float(loss.detach()))
    return step, {
        "epsilon": float(engine.get_epsilon(recipe.dp_delta)),
        "target_epsilon": recipe.dp_epsilon,
        "delta": recipe.dp_delta,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "max_grad_norm": recipe.dp_max_grad_norm,
    }


def _encoded(local: Any, conversations: Iterable[Messages], recipe: Recipe) -> list[Example]:
    examples = []
    for messages in conversations:
        example = encode_exchange(local, messages, system_prompt=recipe.system_prompt)
        if example is not None:
            examples.append(example)
    return examples


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _save(model: Any, tokenizer: Any, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


# --- the training process --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainingJob:
    """What one training process does (written as JSON by the bot, read by :func:`main`)."""

    base: str
    output: str
    new: list[list[dict[str, str]]]
    replay: list[list[dict[str, str]]]
    recipe: dict[str, Any] = field(default_factory=dict)
    #: After training, the serving model's folder and the evaluation sets, by name: each a
    #: list of ``[conversation before the answer, expected answer]`` (see model.evaluation).
    serving: str | None = None
    evaluation: dict[str, list[tuple[list[dict[str, str]], str]]] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> TrainingJob:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


_PR_SET_PDEATHSIG = 1

#: The loss curve's file name, in the trained model's folder.
LOSS_CURVE = "loss.png"


def plot_losses(losses: Sequence[tuple[int, float]], path: Path) -> Path:
    """The training loss by step, as a PNG (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    try:
        steps, values = zip(*losses, strict=True)
        axes.plot(steps, values, color="#1f77b4", linewidth=1.5)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.set_title("Retrain: loss on the answers")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)
    return path


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so a killed bot leaves
    no trainer behind; elsewhere nothing happens."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, for the parent."""
    print(json.dumps({"event": event, **fields}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a :class:`TrainingJob`: ``{"event": "progress", ...}`` lines while training, then
    ``{"event": "done", "report": {...}}``; or ``{"event": "failed", "error": "..."}``, exit 1."""
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__)
    parser.add_argument("job", type=Path)
    args = parser.parse_args(argv)
    die_with_parent()
    job = TrainingJob.read(args.job)
    try:
        report = fine_tune(
            base=Path(job.base),
            output=Path(job.output),
            new=job.new,
            replay=job.replay,
            recipe=Recipe(**job.recipe),
            progress=lambda p: emit("progress", **asdict(p)),
        )
    except Exception as error:  # reported to the parent, which tells the admin
        emit("failed", error=f"{type(error).__name__}: {error}")
        return 1
    if report.losses:
        plot_losses(report.losses, Path(job.output) / LOSS_CURVE)
    if job.serving is not None and job.evaluation:
        try:
            comparison = asyncio.run(compare(Path(job.serving), Path(job.output), job.evaluation))
        except Exception as error:
            emit("failed", error=f"evaluation failed: {type(error).__name__}: {error}")
            return 1
        emit("evaluated", comparison=comparison)
    emit("done", report=asdict(report))
    return 0


async def compare(
    serving: Path, candidate: Path, sets: Mapping[str, Sequence[tuple[Messages, str]]]
) -> dict[str, Any]:
    """Both models on every set, each through its own batched model service."""
    from model.evaluation import Comparison, evaluate
    from model.service import ModelService

    scores = {}
    for side, folder in (("before", serving), ("after", candidate)):
        service = ModelService.load(folder, device="cpu")
        try:
            scores[side] = await evaluate(service, sets, local=service.local)
        finally:
            await service.aclose()
    return Comparison(before=scores["before"], after=scores["after"]).as_json()


if __name__ == "__main__":
    sys.exit(main())
