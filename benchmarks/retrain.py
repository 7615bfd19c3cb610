"""Retrain benchmark (issue #11): the default model retrained on 1,000 new exchanges plus replay.

Rows, measured in one run on the same model, examples, batches and steps:

- ``retrain``: the bot's own training process (``python -m model.train``: transformers'
  Trainer, then the evaluation of both models through the batched service), under ``nice`` on
  ``RETRAIN_THREADS`` threads, as a retrain runs it: wall time with the evaluation, and the
  training's tokens/s;
- ``plain loop``: the same examples in the same batches and steps through a plain PyTorch loop
  (forward, loss on the answers, backward, AdamW, the same cosine schedule), in a process of
  its own on as many threads: the ceiling the Trainer is held to (ratio target ≥ 0.8);
- ``retrain, DP``: the training process with DP-SGD (Opacus) at ``--dp-epsilon``: wall time and
  the ε the accountant reached;
- reply latency of the serving model (the batched service in this process, a question every
  quarter second) idle and while the ``retrain`` row trains (target: at most 2× idle).

Usage::

    python benchmarks/retrain.py --default-model data/model         # 1,000 exchanges
    python benchmarks/retrain.py --default-model DIR --exchanges 40 --quick

New exchanges are made up (``What is the code of item N?`` → a made-up code), so the model
cannot know them; replay draws on the starter corpus as a retrain does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = [
    "amber",
    "birch",
    "cobalt",
    "dune",
    "ember",
    "fjord",
    "garnet",
    "heron",
    "indigo",
    "jasper",
    "kelp",
    "lumen",
    "marble",
    "nectar",
    "onyx",
    "pine",
    "quill",
    "russet",
    "sable",
    "tundra",
    "umber",
    "velvet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


def made_up_exchanges(count: int, *, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    exchanges = []
    for n in range(count):
        code = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(10, 99)}"
        exchanges.append(
            [
                {"role": "user", "content": f"What is the code of item {n}?"},
                {"role": "assistant", "content": f"Item {n} has the code {code}."},
            ]
        )
    return exchanges


def plain_loop_main(job_path: str, out_path: str) -> None:
    """The ``plain loop`` row, in its own process: the Trainer's examples, batches and steps."""
    import math

    import torch

    from model.local_model import LocalModel
    from model.train import Recipe, TrainingJob, _encoded, _pad_id, collator_for, training_examples

    job = TrainingJob.read(Path(job_path))
    recipe = Recipe(**job.recipe)
    torch.set_num_threads(recipe.thread_count())
    torch.manual_seed(recipe.seed)
    local = LocalModel.load(job.base, device="cpu")
    examples = training_examples(
        _encoded(local, job.new, recipe), _encoded(local, job.replay, recipe), recipe
    )
    random.Random(recipe.seed).shuffle(examples)
    model = local.model
    collate = collator_for(model, examples, pad_id=_pad_id(local.tokenizer))  # as the trainer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    steps = math.ceil(len(examples) / recipe.batch_size)
    warmup = max(1, steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    tokens = sum(len(example.input_ids) for example in examples)
    started = time.monotonic()
    for step in range(steps):
        batch = collate(
            [
                example.features()
                for example in examples[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            ]
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the Trainer does
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.monotonic() - started
    Path(out_path).write_text(
        json.dumps(
            {"seconds": seconds, "tokens": tokens, "steps": steps, "loss": float(loss.detach())}
        )
    )


def run_trainer(job: Any, *, threads: int, workdir: Path) -> dict[str, Any]:
    """The bot's training process, as a retrain starts it; its events and wall time."""
    path = workdir / f"job-{time.monotonic_ns()}.json"
    job.write(path)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    done = subprocess.run(
        ["nice", "-n", "10", sys.executable, "-m", "model.train", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        check=False,
    )
    wall = time.monotonic() - started
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        raise RuntimeError(f"the trainer failed: {events[-1:] or done.stderr[-2000:]}")
    result = {"wall": wall}
    for event in events:
        result[event["event"]] = event
    return result


#: Seconds between two latency probes: a bot that answers now and then, not one flooded.
PROBE_EVERY = 0.25


async def latencies(service: Any, questions: Sequence[str], *, until: Any) -> list[float]:
    """One question every :data:`PROBE_EVERY` seconds until ``until()`` is true (at least
    one); each one's reply latency."""
    times = []
    index = 0
    while True:
        await asyncio.sleep(PROBE_EVERY)
        started = time.monotonic()
        await service.generate(
            messages=[{"role": "user", "content": questions[index % len(questions)]}],
            max_new_tokens=48,
        )
        times.append(time.monotonic() - started)
        index += 1
        if until():
            return times


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from model.corpus import load_starter_corpus
    from model.retrain import serving_beside_training
    from model.service import ModelService
    from model.train import Recipe, TrainingJob

    base = args.default_model.resolve()
    corpus = load_starter_corpus()
    recipe = Recipe(
        epochs=args.epochs,
        replay_ratio=Recipe().replay_ratio if args.replay_ratio is None else args.replay_ratio,
        threads=args.threads,
    )
    threads = recipe.thread_count()
    new = made_up_exchanges(args.exchanges)
    replay = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in corpus
    ]
    regression = [([{"role": "user", "content": q}], a) for q, a in corpus[:50]]
    taught = [(exchange[:1], exchange[1]["content"]) for exchange in new[:200]]
    workdir = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    figures: dict[str, Any] = {"exchanges": args.exchanges, "recipe": asdict(recipe)}

    def job(name: str, **changes: Any) -> TrainingJob:
        return TrainingJob(
            base=str(base),
            output=str(workdir / name),
            new=new,
            replay=replay,
            recipe={**asdict(recipe), **changes},
            serving=str(base),
            evaluation={"new": taught, "regression": regression},
        )

    service = ModelService.load(base, device="cpu")
    questions = [q for q, _ in corpus[:20]]
    for question in questions[:3]:  # warm-up: the first replies pay for set-up
        await service.generate(messages=[{"role": "user", "content": question}], max_new_tokens=48)
    idle_end = time.monotonic() + args.latency_seconds
    idle = await latencies(service, questions, until=lambda: time.monotonic() > idle_end)

    training = asyncio.ensure_future(
        asyncio.to_thread(run_trainer, job("candidate"), threads=threads, workdir=workdir)
    )
    with serving_beside_training(service, threads):  # as the bot's retrain does
        busy = await latencies(service, questions, until=training.done)
    trained = await training
    report = trained["done"]["report"]
    figures["retrain"] = {
        "wall": trained["wall"],
        "train_seconds": report["seconds"],
        "tokens": report["tokens"],
        "tokens_per_second": report["tokens_per_second"],
        "steps": report["steps"],
        "comparison": trained.get("evaluated", {}).get("comparison"),
    }
    figures["latency"] = {
        "idle_p50": statistics.median(idle),
        "busy_p50": statistics.median(busy),
        "idle_n": len(idle),
        "busy_n": len(busy),
    }
    await service.aclose()

    plain_job = workdir / "plain.json"
    job("plain").write(plain_job)
    out = workdir / "plain-result.json"
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, __file__, "--plain-loop", str(plain_job), str(out)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        check=True,
    )
    plain = json.loads(out.read_text())
    figures["plain"] = {**plain, "tokens_per_second": plain["tokens"] / plain["seconds"]}

    if not args.no_dp:
        private = run_trainer(
            job("private", dp_epsilon=args.dp_epsilon, epochs=max(1, args.epochs)),
            threads=threads,
            workdir=workdir,
        )
        figures["dp"] = {
            "wall": private["wall"],
            "epsilon": private["done"]["report"]["dp"]["epsilon"],
            "target_epsilon": args.dp_epsilon,
            "comparison": private.get("evaluated", {}).get("comparison"),
        }
    return figures


def learned(comparison: dict[str, Any] | None, name: str) -> str:
    if not comparison:
        return "-"
    before, after = comparison["before"][name], comparison["after"][name]
    return f"{before['normalised']}/{before['total']} → {after['normalised']}/{after['total']}"


def table(figures: dict[str, Any]) -> str:
    retrain, plain, latency = figures["retrain"], figures["plain"], figures["latency"]
    rows = [
        "| row | wall s | training s | tokens/s | vs plain loop | new exchanges answered "
        "| starter regression set | ε |",
        "|---|---:|---:|---:|---:|---|---|---:|",
        f"| retrain (Trainer + evaluation) | {retrain['wall']:.1f} "
        f"| {retrain['train_seconds']:.1f} "
        f"| {retrain['tokens_per_second']:,.0f} "
        f"| {retrain['tokens_per_second'] / plain['tokens_per_second']:.2f}× "
        f"| {learned(retrain['comparison'], 'new')} "
        f"| {learned(retrain['comparison'], 'regression')} | — |",
        f"| plain PyTorch loop, same batches | — | {plain['seconds']:.1f} "
        f"| {plain['tokens_per_second']:,.0f} | 1.00× | — | — | — |",
    ]
    if "dp" in figures:
        dp = figures["dp"]
        rows.append(
            f"| retrain with DP (Opacus) | {dp['wall']:.1f} | — | — | — "
            f"| {learned(dp['comparison'], 'new')} | {learned(dp['comparison'], 'regression')} "
            f"| {dp['epsilon']:.2f} (target {dp['target_epsilon']:g}) |"
        )
    ratio = latency["busy_p50"] / latency["idle_p50"]
    fast_enough = retrain["tokens_per_second"] >= 0.8 * plain["tokens_per_second"]
    rows += [
        "",
        f"Reply latency p50: idle {latency['idle_p50'] * 1000:.0f} ms ({latency['idle_n']} "
        f"replies), while training {latency['busy_p50'] * 1000:.0f} ms ({latency['busy_n']}): "
        f"{ratio:.2f}× (target ≤ 2×).",
        f"Wall time target under 60 s: {'met' if retrain['wall'] < 60 else 'missed'}; "
        f"tokens/s target ≥ 0.8× the plain loop: "
        f"{'met' if fast_enough else 'missed'}.",
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--plain-loop":
        plain_loop_main(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-model", type=Path, default=Path("data/model"))
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the new exchanges")
    parser.add_argument(
        "--replay-ratio",
        type=float,
        default=None,
        help="default: the recipe's (RETRAIN_REPLAY_RATIO)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="the trainer's (RETRAIN_THREADS; 0: every core)"
    )
    parser.add_argument("--dp-epsilon", type=float, default=8.0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s of idle latency")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_seconds = 1.0
    figures = asyncio.run(run(args))
    print(table(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
