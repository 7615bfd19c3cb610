"""Serving throughput of the model service against plain generate and ``transformers serve``.

In one run, on the same prompts (the first questions of the starter corpus, model/corpus.py,
each asked alone as a user message), for each model:

- ``1``: one request alone through the service (``ModelService``), a few times: the latency a
  lone user sees, the reference for (b)'s p99;
- ``a``: 32 replies one after another through plain ``model.generate`` (batch 1, a KV cache,
  the prompt ids of :class:`model.prompt_encoding.PromptEncoder`), as the bot answered before;
- ``b``: the same 32 sent at once through the service;
- ``c``: the same 32 at once through ``transformers serve`` (a subprocess on loopback,
  ``--device cpu``, float32), reached through the remote backend (``model.remote.RemoteModel``);
  ``c-cb`` the same with ``--continuous-batching``;
- ``d``: 128 at once through the service (the first 128 questions);
- ``e``: the same 32 through transformers' own in-process continuous-batching manager
  (``model.init_continuous_batching``, warmed up first), so that the choice between it and the
  service's scheduler is measured.

Models: ``default``, the default model (``--default-model``, built there first when missing,
about 2 minutes), and ``random200m``, a ~210M-parameter Llama with random weights and the
default tokenizer (benchmarks/random_llama.py) whose replies are a fixed 32 new tokens on
every path (``GenerationSettings(ignore_eos=True)`` in the service, ``min_new_tokens`` in plain
generate; its special tokens can never win greedy decoding anyway), standing in for a real
model's cost.

Columns. ``total s`` runs from sending the row's requests to the last reply; ``replies/s`` and
``tokens/s`` are per that. Latency runs from the row's start to each reply, so in (a) a request
waits for those before it, as 32 mentions in line do; in ``1`` each request is timed alone.
Generated tokens: the random model's replies are 32 tokens each by construction; the default
model's are counted by encoding each reply's text again (no row is credited for tokens it cut
or left out). ``× (a)`` is the row's replies/s over (a)'s. ``% roof`` is tokens/s as a share of
the compute roof: the best fp32 product of two 2048×2048 matrices on this machine (2·n³
FLOPs; MKL's ``torch.mm`` or oneDNN's, whichever is faster) over 2 FLOPs per parameter per
token. ``floor s`` is the least time the row's
arithmetic takes at that roof (benchmarks/serving_report.py). ``= (a)`` counts the replies
equal to (a)'s (greedy decoding: batching must not change a reply). A row that takes under
``FAST_ROW_SECONDS`` (2 s) runs ``REPEATS`` (5) times (once with ``--quick``) and the run of
median length is the one shown: every row of the default model, none of the 200M model's.

Targets (printed under the table, never the exit status): (b) at least 8× (a) with p99 at most
3× a lone request's latency; (b) ahead of both (c) rows; (d) at least 20% of the roof on the
200M model; a missed target that asks for less time than the row's compute floor is reported
as out of reach on this machine. A row that cannot run (a missing module, ``transformers
serve`` failing to start) is reported as not measured, with the reason.

Usage::

    python benchmarks/serving.py                          # both models, 32/128 requests
    python benchmarks/serving.py --quick                  # 8/16 requests: a smoke test
    python benchmarks/serving.py --models default --rows 1,a,b --default-model /tmp/model
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.random_llama import RANDOM_MODEL_NEW_TOKENS, build_random_llama  # noqa: E402
from benchmarks.serving_report import (  # noqa: E402
    ROWS,
    Measurement,
    ModelFigures,
    figures_json,
    floor_seconds,
    forward_positions,
    report,
)
from benchmarks.transformers_serve import transformers_serve  # noqa: E402
from model.corpus import load_starter_corpus  # noqa: E402
from model.fast_linear import model_parameters  # noqa: E402

MODELS = ("default", "random200m")
#: Seconds a row may take before it is reported as not measured.
ROW_TIMEOUT = 1800.0
#: A row faster than this runs REPEATS times (once with --quick), and the run of median
#: length is reported.
FAST_ROW_SECONDS = 2.0
REPEATS = 5


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the roof


def measure_roof(*, size: int = 2048, repeats: int = 8) -> float:
    """The machine's fp32 matmul rate in FLOP/s: the best of ``repeats`` products of two
    ``size``-square matrices, by MKL's ``torch.mm`` and by oneDNN with the right-hand side
    packed (model/fast_linear.py, which the service uses; on an AMD CPU MKL leaves AVX-512
    unused, so oneDNN's is the higher roof there)."""
    from model.fast_linear import PackedLinear, packing_available

    left = torch.randn(size, size)
    right = torch.randn(size, size)
    out = torch.empty(size, size)
    products: list[Callable[[], object]] = [lambda: torch.mm(left, right, out=out)]
    if packing_available():
        linear = torch.nn.Linear(size, size, bias=False)
        packed = PackedLinear.from_linear(linear)
        products.append(lambda: packed(left))
    best = math.inf
    with torch.inference_mode():
        for product in products:
            product()  # first call: thread pool, page faults, JIT kernels
            for _ in range(repeats):
                started = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


# --------------------------------------------------------------------------- one row's timing


@dataclass(frozen=True, kw_only=True)
class Timing:
    texts: list[str]
    latencies: list[float]
    seconds: float
    #: Exact generated token counts where the path reports them.
    token_counts: list[int] | None = None


def reply_text(reply: Any) -> str:
    """The text of a service or remote reply (a GeneratedReply, or a plain string)."""
    return reply if isinstance(reply, str) else str(reply.text)


async def repeated(run: Callable[[], Awaitable[Timing]], *, times: int) -> Timing:
    """``run`` once, or ``times`` times when it is faster than :data:`FAST_ROW_SECONDS`: then
    the run of median length (a sub-second row on this shared machine moves by half from one
    run to the next)."""
    first = await run()
    if first.seconds >= FAST_ROW_SECONDS or times <= 1:
        return first
    timings = [first, *[await run() for _ in range(times - 1)]]
    return sorted(timings, key=lambda timing: timing.seconds)[len(timings) // 2]


async def at_once(calls: Sequence[Callable[[], Awaitable[Any]]]) -> Timing:
    """Start every call together; each latency runs from the start to its own reply."""
    started = time.perf_counter()

    async def one(call: Callable[[], Awaitable[Any]]) -> tuple[str, float]:
        reply = await call()
        return reply_text(reply), time.perf_counter() - started

    results = await asyncio.gather(*(one(call) for call in calls))
    seconds = time.perf_counter() - started
    return Timing(
        texts=[text for text, _ in results],
        latencies=[latency for _, latency in results],
        seconds=seconds,
    )


async def one_at_a_time(calls: Sequence[Callable[[], Awaitable[Any]]]) -> Timing:
    """Each call alone, after the previous one; each latency is that call's own."""
    texts: list[str] = []
    latencies: list[float] = []
    for call in calls:
        started = time.perf_counter()
        texts.append(reply_text(await call()))
        latencies.append(time.perf_counter() - started)
    return Timing(texts=texts, latencies=latencies, seconds=sum(latencies))


# --------------------------------------------------------------------------- paths


def messages_for(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def run_alone(
    function: Callable[..., Timing],
    path: Path,
    questions: Sequence[str],
    *,
    max_new_tokens: int,
    ignore_eos: bool,
) -> Timing:
    """Load the model in this (child) process, warm ``function`` up on one question, then time
    it on ``questions``."""
    from model.generation import GenerationSettings
    from model.local_model import LocalModel

    local = LocalModel.load(
        path, device="cpu", dtype="float32", generation=GenerationSettings(ignore_eos=ignore_eos)
    )
    function(local, questions[:1], max_new_tokens=max_new_tokens)
    return function(local, questions, max_new_tokens=max_new_tokens)


def plain_generate(local: Any, questions: Sequence[str], *, max_new_tokens: int) -> Timing:
    """Path (a): LocalModel's plain ``model.generate``, one prompt after another (blocking).

    Latency runs from the start of the first, so a request's wait for those before it counts.
    """
    texts: list[str] = []
    counts: list[int] = []
    latencies: list[float] = []
    started = time.perf_counter()
    for question in questions:
        prompt = local.fit_prompt(messages_for(question), max_new_tokens=max_new_tokens)
        ids = local.generate_ids_sync(prompt.token_ids, max_new_tokens=max_new_tokens)
        texts.append(local.reply_text(ids))
        counts.append(len(ids))
        latencies.append(time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return Timing(texts=texts, latencies=latencies, seconds=seconds, token_counts=counts)


def transformers_batch_manager(
    local: Any, questions: Sequence[str], *, max_new_tokens: int
) -> Timing:
    """Path (e): transformers' ContinuousBatchingManager in this process, warmed up first."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    ignore_eos = local.generation.ignore_eos
    prompts = [
        local.fit_prompt(messages_for(q), max_new_tokens=max_new_tokens).token_ids
        for q in questions
    ]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=-1 if ignore_eos else list(local.stop_ids),  # -1: none
        pad_token_id=local.tokenizer.pad_token_id,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts),
        max_generated_length=max_new_tokens,
        num_requests=len(prompts),
    )
    manager = local.model.init_continuous_batching(generation_config=config, workload_hints=hints)
    manager.warmup()
    manager.start()
    try:
        started = time.perf_counter()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=max_new_tokens)
        done: dict[str, tuple[list[int], float]] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("the continuous-batching manager stopped")
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                tokens = list(result.generated_tokens)
                if tokens and tokens[-1] in local.stop_ids and not ignore_eos:
                    tokens.pop()  # as LocalModel.generate_ids_sync: the stop token is no reply
                done[result.request_id] = (tokens, time.perf_counter() - started)
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=10)
        manager.destroy()
    outputs = [done[request_id] for request_id in ids]
    return Timing(
        texts=[local.reply_text(tokens) for tokens, _ in outputs],
        latencies=[latency for _, latency in outputs],
        seconds=seconds,
        token_counts=[len(tokens) for tokens, _ in outputs],
    )


# --------------------------------------------------------------------------- transformers serve


async def serve_row(
    local: Any, path: Path, questions: Sequence[str], *, plan: Plan, batching: bool
) -> Timing:
    """Path (c): ``questions`` at once through RemoteModel against ``transformers serve``."""
    from model.remote import RemoteModel

    log_file = plan.workdir / f"serve-{'cb' if batching else 'plain'}.log"
    async with transformers_serve(path, continuous_batching=batching, log_file=log_file) as url:
        remote = RemoteModel(
            url=url,
            model_name=str(path),
            tokenizer=local.tokenizer,
            context_window=local.context_window,
            generation=local.generation,
            timeout=ROW_TIMEOUT,
            stall_timeout=ROW_TIMEOUT,  # a warm-up that compiles or sizes caches says nothing
        )
        await remote.start()
        try:
            calls = request_calls(remote, questions, max_new_tokens=plan.max_new_tokens)
            await calls[0]()  # warm-up: the first request pays for set-up
            return await at_once(calls)
        finally:
            await remote.close()


def request_calls(
    generator: Any, questions: Sequence[str], *, max_new_tokens: int
) -> list[Callable[[], Awaitable[Any]]]:
    """One ``generator.generate`` call per question, not yet started."""

    def call(question: str) -> Callable[[], Awaitable[Any]]:
        return lambda: generator.generate(
            messages=messages_for(question), max_new_tokens=max_new_tokens
        )

    return [call(question) for question in questions]


# --------------------------------------------------------------------------- one model


@dataclass(frozen=True, kw_only=True)
class Plan:
    rows: tuple[str, ...]
    requests: int
    many: int
    single_repeats: int
    max_new_tokens: int
    workdir: Path
    repeats: int = 1  # how often a fast row runs (see repeated)
    roof_flops: float = math.nan  # the machine's fp32 matmul rate (the compute floor)
    service_threads: int = 0  # the service's torch threads (MODEL_THREADS; 0: its own choice)


def measurement(
    figures: ModelFigures,
    key: str,
    timing: Timing,
    *,
    tokenizer: Any,
    max_new_tokens: int,
    prompts: Sequence[Sequence[int]],
    roof_flops: float,
) -> Measurement:
    """The row's figures; generated tokens as the module docstring says; the compute floor
    from the row's ``prompts`` (token ids) as benchmarks/serving_report.py says."""
    note = ""
    if figures.fixed_length:
        tokens = max_new_tokens * len(timing.texts)
        counts = timing.token_counts
        if counts is not None and (short := sum(1 for c in counts if c != max_new_tokens)):
            tokens = sum(counts)
            note = f"{short} replies not {max_new_tokens} tokens"
    else:
        tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in timing.texts)
    same = None
    reference = figures.row("a")
    if reference is not None and key not in ("a", "1"):
        pairs = list(zip(timing.texts, reference.texts, strict=False))
        same = (sum(1 for text, ref in pairs if text == ref), len(pairs))
    return Measurement(
        model=figures.name,
        row=key,
        requests=len(timing.texts),
        seconds=timing.seconds,
        tokens=tokens,
        latencies=tuple(timing.latencies),
        texts=tuple(timing.texts),
        same_as_a=same,
        floor_seconds=floor_seconds(
            forward_positions(prompts, generated=tokens),
            parameters=figures.parameters,
            roof_flops=roof_flops,
        ),
        note=note,
    )


def not_measured(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


async def bench_model(name: str, path: Path, *, plan: Plan) -> ModelFigures:
    """Every planned row for one model folder, on one loaded model."""
    from model.batch_requests import BatchSettings
    from model.service import GenerationSettings, ModelService

    fixed_length = name == "random200m"
    questions = starter_questions(max(plan.requests, plan.many))
    first = questions[: plan.requests]
    service = ModelService.load(
        path,
        batch=BatchSettings(
            max_batch=128,
            max_wait=0.005,
            queue_size=1024,
            timeout=900,
            threads=plan.service_threads,
        ),
        generation=GenerationSettings(ignore_eos=fixed_length),
        device="cpu",
        dtype="float32",
    )
    local = service.local
    figures = ModelFigures(
        name=name,
        path=path,
        parameters=model_parameters(local.model),
        fixed_length=fixed_length,
    )

    def prompt_ids(asked: Sequence[str]) -> list[list[int]]:
        return [
            list(local.fit_prompt(messages_for(q), max_new_tokens=plan.max_new_tokens).token_ids)
            for q in asked
        ]

    async def row(key: str, run: Callable[[], Awaitable[Timing]], asked: Sequence[str]) -> None:
        if key not in plan.rows:
            return
        log(f"  {name}: {ROWS[key]} ...")
        try:
            timing = await asyncio.wait_for(repeated(run, times=plan.repeats), ROW_TIMEOUT)
        except Exception as error:  # one failing row must not cost the others
            figures.rows.append(Measurement(model=name, row=key, skipped=not_measured(error)))
            log(f"  {name}: {key} not measured: {not_measured(error)}")
            return
        result = measurement(
            figures,
            key,
            timing,
            tokenizer=local.tokenizer,
            max_new_tokens=plan.max_new_tokens,
            prompts=prompt_ids(asked),
            roof_flops=plan.roof_flops,
        )
        figures.rows.append(result)
        log(
            f"  {name}: {key}: {result.requests} in {result.seconds:.2f}s "
            f"({result.replies_per_second:.2f} replies/s, p99 {result.p99:.2f}s)"
        )

    async def isolated(function: Callable[..., Timing], questions: Sequence[str]) -> Timing:
        # A process of its own: torch work from a second thread of this process measurably
        # slows the service's worker thread afterwards (oneDNN / OpenMP state per thread:
        # (b) on the default model took 0.21-0.35 s instead of 0.12-0.19 s after (a) ran
        # in a thread here), and the service's thread would slow these paths in turn.
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as child:
            return await loop.run_in_executor(
                child,
                partial(
                    run_alone,
                    function,
                    path,
                    questions,
                    max_new_tokens=plan.max_new_tokens,
                    ignore_eos=fixed_length,
                ),
            )

    try:
        await row("a", lambda: isolated(plain_generate, first), first)
        # Each path is warmed up once on its own shape, as (a) is on one question in its
        # process: the service on one batch of the same requests (the first batch of a size
        # allocates its caches' buffers).
        await at_once(request_calls(service, first, max_new_tokens=plan.max_new_tokens))
        alone = request_calls(
            service, first[:1] * plan.single_repeats, max_new_tokens=plan.max_new_tokens
        )
        await row("1", lambda: one_at_a_time(alone), first[:1] * plan.single_repeats)
        batch = request_calls(service, first, max_new_tokens=plan.max_new_tokens)
        await row("b", lambda: at_once(batch), first)
        many = request_calls(service, questions[: plan.many], max_new_tokens=plan.max_new_tokens)
        await row("d", lambda: at_once(many), questions[: plan.many])
    finally:
        await service.aclose()

    def served(batching: bool) -> Callable[[], Awaitable[Timing]]:
        return lambda: serve_row(local, path, first, plan=plan, batching=batching)

    await row("c", served(False), first)
    await row("c-cb", served(True), first)
    # Last: the manager may change the model's attention implementation.
    await row("e", lambda: isolated(transformers_batch_manager, first), first)
    return figures


def starter_questions(count: int) -> list[str]:
    """The first ``count`` questions of the starter corpus (repeated if it has fewer)."""
    questions = [question for question, _ in load_starter_corpus()]
    return [questions[i % len(questions)] for i in range(count)]


# --------------------------------------------------------------------------- main


def model_folder(
    name: str, *, default_model: Path, workdir: Path, args: argparse.Namespace
) -> Path:
    """The folder of ``name``, built first where needed."""
    from model.loading import ensure_default_model

    if name == "default":
        return ensure_default_model(default_model, progress=log)
    log(f"building the random model ({args.random_layers} layers, hidden {args.random_hidden})")
    tokenizer_from = default_model if (default_model / "config.json").is_file() else None
    return build_random_llama(
        workdir / "random200m",
        tokenizer_from=tokenizer_from,
        hidden_size=args.random_hidden,
        num_layers=args.random_layers,
        num_heads=max(1, args.random_hidden // 64),
        intermediate_size=args.random_hidden * 11 // 4,
        seed=args.seed,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--default-model", type=Path, default=Path("data/model"))
    parser.add_argument("--models", default=",".join(MODELS), help="default,random200m")
    parser.add_argument("--rows", default=",".join(ROWS), help=",".join(ROWS))
    parser.add_argument("--quick", action="store_true", help="8 and 16 requests (a smoke test)")
    parser.add_argument("--max-new-tokens", type=int, default=RANDOM_MODEL_NEW_TOKENS)
    parser.add_argument("--random-hidden", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--random-layers", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--service-threads", type=int, default=0, help="the service's MODEL_THREADS (0: auto)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    args.row_keys = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    if unknown := sorted(set(args.model_names) - set(MODELS)):
        parser.error(f"--models: unknown {', '.join(unknown)} (use {','.join(MODELS)})")
    if unknown := sorted(set(args.row_keys) - set(ROWS)):
        parser.error(f"--rows: unknown {', '.join(unknown)} (use {','.join(ROWS)})")
    return args


async def run(args: argparse.Namespace, workdir: Path) -> tuple[list[ModelFigures], float]:
    from model.service import on_passing_thread

    torch.manual_seed(args.seed)
    # In a thread that then ends: a live thread that ran large matrix products leaves the
    # service's worker thread about 2x slower for good (measured: (b) on the default model
    # 0.26-0.36 s instead of 0.10-0.16 s); a finished thread leaves nothing behind.
    roof = on_passing_thread(partial(measure_roof, repeats=3 if args.quick else 8))
    log(f"fp32 matmul roof: {roof / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    plan = Plan(
        rows=args.row_keys,
        requests=8 if args.quick else 32,
        many=16 if args.quick else 128,
        single_repeats=1 if args.quick else 3,
        max_new_tokens=args.max_new_tokens,
        workdir=workdir,
        repeats=1 if args.quick else REPEATS,
        roof_flops=roof,
        service_threads=args.service_threads,
    )
    models: list[ModelFigures] = []
    for name in args.model_names:
        path = model_folder(name, default_model=args.default_model, workdir=workdir, args=args)
        torch.manual_seed(args.seed)
        models.append(await bench_model(name, path, plan=plan))
    return models, roof


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chatbot-serving-bench-") as workdir:
        models, roof = asyncio.run(run(args, Path(workdir)))
    print()
    print(report(models, roof_flops=roof))
    if args.json:
        args.json.write_text(figures_json(models, roof_flops=roof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
