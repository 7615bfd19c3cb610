"""End-to-end serving throughput through a real ``chatbot run`` (issue #10).

For each platform and model, one bot process (SQLite in a temporary ``DATA_DIR``, ``MODEL_PATH``
at the model folder, ``LOG_LEVEL=INFO``) serves the test suite's fakes: Slack in HTTP mode
against the fake Web API (signed Events API ``app_mention`` requests posted to the bot), Discord
against the fake REST API and gateway (guild-channel mentions as MESSAGE_CREATE dispatches).
After a warm-up (a mention, then one round of 32 at once: the first round of each kind pays
one-off costs, such as the connection pools growing) it measures, 5 times over, alternating

- ``one by one``: 8 mentions, each sent when the previous reply is posted;
- ``at once``: 32 mentions sent together, each from another user in another channel, so they
  are separate conversations rather than one conversation's ordered turns.

Both phases ask the same starter-corpus questions (the first phase's 8, four times over in the
second), so a reply costs the same in both. Each phase's time is the median of its runs (the
table lists each run: this machine's neighbours move single runs by a third).
``ratio`` = ``(32 / t_at_once) / (8 / t_one_by_one)``; the target is at least 8 on every
platform and model.

Timing: a reply is done when the bot's database records it delivered (polled every 10 ms, once
the fake saw a post in every channel); its time is that of the bot's last post or edit of it on
the fake, so the polling does not count.
``one by one`` sums each mention's send-to-posted time; ``at once`` runs from the first mention
sent to the last reply posted.

Pipeline split: the pipeline logs, on ``bot.service`` at INFO, one line per answered message,
``answered message <id>: pipeline <x> ms (work <w> ms), model <y> ms`` (pipeline: database,
dedupe, history, formatting, from the message's arrival, waiting for the store's thread and the
event loop included; work: the same without the waiting, the store calls' own run time and the
formatting; model: generation). The table gives p50 of work, p50/p99 of pipeline and model; the
target is a work p50 under 10 ms.

Usage::

    python benchmarks/serving_end_to_end.py                       # default + random 200M model
    python benchmarks/serving_end_to_end.py --quick --models default --platforms slack
    python benchmarks/serving_end_to_end.py --models default --repeats 5
    python benchmarks/serving_end_to_end.py --models /path/to/model-folder --keep-logs logs/

The platforms' fakes and drivers are in benchmarks/end_to_end_platforms.py.

Models: ``default`` (built once into ``--cache-dir``, about 2 minutes), ``random-200m`` (the
~200M-parameter random-weight Llama of benchmarks/random_llama.py, a fixed 32 new tokens per
reply), or a model folder. The exit status is 1 when a target is missed (not with ``--quick``,
whose smaller phases are for trying the set-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.end_to_end_platforms import Discord, Platform, Slack, database_url  # noqa: E402
from bot.storage import Database, DeliveryState, MessageRecord  # noqa: E402
from model.corpus import load_starter_corpus  # noqa: E402
from tests.process.harness import BotProcess  # noqa: E402

PLATFORMS = ("slack", "discord")
TARGET_RATIO = 8.0
TARGET_PIPELINE_MS = 10.0  # p50
POLL_SECONDS = 0.01
ANSWERED = re.compile(
    # The text log format tags a line with its request id: "bot.service [slack:Ev1]: ...".
    r"bot\.service(?: \[[^\]]*\])?: answered message (?P<id>\S+): "
    r"pipeline (?P<pipeline>[\d.]+) ms \(work (?P<work>[\d.]+) ms\), model (?P<model>[\d.]+) ms"
)
#: The bot's settings for the runs; ``--bot-env`` adds to and overrides them.
BOT_ENV = {
    "LOG_LEVEL": "INFO",
    "BATCH_MAX_SIZE": "32",
    "BATCH_MAX_WAIT_MS": "5",
    "MODEL_QUEUE_SIZE": "256",
    "GENERATION_TIMEOUT_SECONDS": "600",
    # Recovery and the retry queue stay out of the way: nothing crashes here, and a reply
    # slow to go out under load must not be posted a second time.
    "RECOVERY_INTERVAL_SECONDS": "30",
    "DELIVERY_GRACE_SECONDS": "900",
    "DELIVERY_RETRY_SECONDS": "30",
}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Phase:
    """One measured phase: its wall time and the pipeline's split of each answered message."""

    platform: str
    model: str
    mode: str  # "one by one" or "at once"
    messages: int
    seconds: float
    pipeline_ms: tuple[float, ...]
    model_ms: tuple[float, ...]
    work_ms: tuple[float, ...]
    ratio: float | None = None  # at once: its replies/s over those of one by one (medians)
    #: CPU seconds one run of the phase cost the bot process, its model process
    #: (MODEL_PROCESS=separate) and this one (the fakes and the driver), on average.
    bot_cpu: float | None = None
    driver_cpu: float | None = None
    model_cpu: float | None = None
    rounds: tuple[float, ...] = ()  # each repeat's seconds (``seconds`` is their median)

    @property
    def replies_per_second(self) -> float:
        return self.messages / self.seconds


def pct(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1); None without values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else None


def fmt(value: float | None, digits: int = 1, *, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def per_reply(cpu_seconds: float | None, messages: int) -> float | None:
    return None if cpu_seconds is None else cpu_seconds * 1000 / messages


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user and system, all threads) process ``pid`` has used; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid``'s children (the model process) have used; None off
    Linux."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return sum(cpu_seconds(int(child)) or 0.0 for child in children)


def table(phases: Sequence[Phase]) -> str:
    header = (
        "| platform | model | mode | messages | total s (median) | each run s | replies/s | ratio "
        "| work p50 ms | pipeline p50 ms | pipeline p99 ms | model p50 s | model p99 s "
        "| bot CPU ms/reply | model process CPU ms/reply | fakes CPU ms/reply |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in phases:
        ratio = "" if p.ratio is None else f"{p.ratio:.2f}"
        lines.append(
            f"| {p.platform} | {p.model} | {p.mode} | {p.messages} | {p.seconds:.2f} "
            f"| {' '.join(f'{r:.2f}' for r in p.rounds)} "
            f"| {p.replies_per_second:.2f} | {ratio} | {fmt(pct(p.work_ms, 0.5))} "
            f"| {fmt(pct(p.pipeline_ms, 0.5))} "
            f"| {fmt(pct(p.pipeline_ms, 0.99))} | {fmt(pct(p.model_ms, 0.5), 2, scale=1e-3)} "
            f"| {fmt(pct(p.model_ms, 0.99), 2, scale=1e-3)} "
            f"| {fmt(per_reply(p.bot_cpu, p.messages))} "
            f"| {fmt(per_reply(p.model_cpu, p.messages))} "
            f"| {fmt(per_reply(p.driver_cpu, p.messages))} |"
        )
    return "\n".join(lines)


def checks(phases: Sequence[Phase]) -> list[tuple[bool, str]]:
    """Each target, met or not, with what was measured."""
    found: list[tuple[bool, str]] = []
    for p in phases:
        where = f"{p.platform}, {p.model}, {p.mode}"
        if p.ratio is not None:
            found.append((p.ratio >= TARGET_RATIO, f"{where}: throughput ratio {p.ratio:.2f}"))
        p50 = pct(p.work_ms, 0.5)
        if p50 is None:
            found.append((False, f"{where}: no 'answered message' lines from bot.service"))
        else:
            found.append((p50 < TARGET_PIPELINE_MS, f"{where}: pipeline work p50 {p50:.1f} ms"))
    return found


# --------------------------------------------------------------------------- measuring


class Run:
    """Mentions to one bot process and its replies, as the bot's database records them."""

    def __init__(
        self, *, platform: Platform, bot: BotProcess, folder: Path, questions: Sequence[str]
    ) -> None:
        self.platform = platform
        self.bot = bot
        self.questions = questions
        self.database = Database(database_url(folder))
        self.next_index = 0
        # The bot's log, read as it grows (polled every 10 ms: never re-read whole).
        self._log = bot.log.open("rb")
        self.log = bytearray()
        self._checked = 0

    def read_log(self) -> int:
        """Take in what the bot logged since the last look; the log's length."""
        self.log += self._log.read()
        return len(self.log)

    def close(self) -> None:
        self._log.close()
        self.database.dispose()

    def sent_channels(self) -> set[str]:
        query = select(MessageRecord.channel).where(
            MessageRecord.delivery_state == DeliveryState.SENT
        )
        with self.database.engine.connect() as connection:
            return {str(channel) for channel in connection.execute(query).scalars()}

    async def wait_posted(self, channels: set[str], *, within: float) -> dict[str, float]:
        """Until every channel's reply is recorded delivered; when each was posted."""
        deadline = time.monotonic() + within
        # The database is asked only once the fake saw a post in every channel: a query each
        # poll took the bot's CPU (the driver runs on the same two cores).
        while not (
            all(self.platform.last_post_at(c) is not None for c in channels)
            and channels <= self.sent_channels()
        ):
            failed = b"failed to answer" in self.log[max(0, self._checked - 64) : self.read_log()]
            self._checked = len(self.log)
            if failed or self.bot.process.returncode is not None:
                raise RuntimeError(f"the bot failed:\n{self.bot.output()[-4000:]}")
            if time.monotonic() > deadline:
                missing = sorted(channels - self.sent_channels())
                raise RuntimeError(f"no reply in {missing} within {within:.0f} s")
            await asyncio.sleep(POLL_SECONDS)
        now = time.monotonic()
        return {c: self.platform.last_post_at(c) or now for c in channels}

    def _questions(self, count: int) -> list[tuple[int, str]]:
        first, self.next_index = self.next_index, self.next_index + count
        return [(first + n, self.questions[n % len(self.questions)]) for n in range(count)]

    async def one_by_one(self, count: int, *, within: float) -> float:
        """Seconds of ``count`` mentions answered one after the other (the sum of each
        one's send-to-posted time)."""
        total = 0.0
        for index, question in self._questions(count):
            sent = time.monotonic()
            channel = await self.platform.mention(index, question)
            total += (await self.wait_posted({channel}, within=within))[channel] - sent
        return total

    async def at_once(self, count: int, *, within: float) -> float:
        """Seconds from sending ``count`` mentions together to the last reply posted."""
        started = time.monotonic()
        mentions = (self.platform.mention(i, q) for i, q in self._questions(count))
        posted = await self.wait_posted(set(await asyncio.gather(*mentions)), within=within)
        return max(posted.values()) - started

    async def split_since(
        self, offset: int, count: int
    ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """The pipeline, model and work ms logged after ``offset``; waits a little for the
        last lines (the pipeline may log after the delivery)."""
        deadline = time.monotonic() + 2.0
        while True:
            self.read_log()
            found = list(ANSWERED.finditer(self.log[offset:].decode(errors="replace")))
            if len(found) >= count or time.monotonic() > deadline:
                pipeline = tuple(float(m["pipeline"]) for m in found)
                work = tuple(float(m["work"]) for m in found)
                return pipeline, tuple(float(m["model"]) for m in found), work
            await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Plan:
    """What to measure on each platform and model."""

    sequential: int
    concurrent: int
    warmup: int
    repeats: int  # runs of each phase (alternating); each phase's time is the median
    reply_within: float  # seconds a phase may take
    questions: Sequence[str]
    keep_logs: Path | None = None  # where the bots' logs are copied


async def measure(
    platform: Platform, *, model_name: str, model: Path, env: dict[str, str], plan: Plan
) -> list[Phase]:
    """Both phases on one platform with one model, in a bot process of its own."""
    with tempfile.TemporaryDirectory(prefix=f"e2e-{platform.name}-") as scratch:
        folder, started = Path(scratch), time.monotonic()
        try:
            bot = await platform.start(folder=folder, model=model, env=env)
            say(f"{platform.name}/{model_name}: bot ready in {time.monotonic() - started:.1f} s")
            run = Run(platform=platform, bot=bot, folder=folder, questions=plan.questions)
            try:
                return await phases_of(run, label=(platform.name, model_name), plan=plan)
            finally:
                run.close()
        finally:
            await platform.stop(keep_log=plan.keep_logs, as_name=f"{platform.name}-{model_name}")


async def phases_of(run: Run, *, label: tuple[str, str], plan: Plan) -> list[Phase]:
    """Warm up (``plan.warmup`` mentions one by one, then one round at once), then each phase
    ``plan.repeats`` times, alternating; each phase's time is its median."""
    if plan.warmup:
        await run.one_by_one(plan.warmup, within=plan.reply_within)
        await run.at_once(plan.concurrent, within=plan.reply_within)
    modes = (
        ("one by one", plan.sequential, run.one_by_one),
        ("at once", plan.concurrent, run.at_once),
    )
    samples: dict[str, list[Sample]] = {mode: [] for mode, _, _ in modes}
    for _ in range(plan.repeats):
        for mode, count, phase in modes:
            samples[mode].append(await sample(run, phase, count, plan=plan))
            say(f"{'/'.join(label)}: {count} {mode} in {samples[mode][-1].seconds:.2f} s")
    phases: list[Phase] = []
    for mode, count, _ in modes:
        taken = samples[mode]
        seconds = statistics.median(s.seconds for s in taken)
        ratio = (count / seconds) / phases[0].replies_per_second if phases else None
        phases.append(
            Phase(
                *label,
                mode,
                count,
                seconds,
                tuple(ms for s in taken for ms in s.pipeline_ms),
                tuple(ms for s in taken for ms in s.model_ms),
                tuple(ms for s in taken for ms in s.work_ms),
                ratio,
                bot_cpu=mean_of(s.bot_cpu for s in taken),
                driver_cpu=mean_of(s.driver_cpu for s in taken),
                model_cpu=mean_of(s.model_cpu for s in taken),
                rounds=tuple(s.seconds for s in taken),
            )
        )
    return phases


@dataclass(frozen=True)
class Sample:
    """One run of a phase."""

    seconds: float
    pipeline_ms: tuple[float, ...]
    model_ms: tuple[float, ...]
    work_ms: tuple[float, ...]
    bot_cpu: float | None
    driver_cpu: float | None
    model_cpu: float | None


async def sample(run: Run, phase: Any, count: int, *, plan: Plan) -> Sample:
    offset = run.read_log()
    pid = run.bot.process.pid
    bot_before, driver_before = cpu_seconds(pid), time.process_time()
    model_before = children_cpu_seconds(pid)
    seconds = await phase(count, within=plan.reply_within)
    bot_after, driver_after = cpu_seconds(pid), time.process_time()
    model_after = children_cpu_seconds(pid)
    pipeline_ms, model_ms, work_ms = await run.split_since(offset, count)
    return Sample(
        seconds,
        pipeline_ms,
        model_ms,
        work_ms,
        bot_cpu=None if bot_before is None or bot_after is None else bot_after - bot_before,
        driver_cpu=driver_after - driver_before,
        model_cpu=(
            None if model_before is None or model_after is None else model_after - model_before
        ),
    )


def mean_of(values: Iterable[float | None]) -> float | None:
    """The mean, or None when any is None."""
    taken = list(values)
    return (
        None
        if any(v is None for v in taken)
        else statistics.fmean(v for v in taken if v is not None)
    )


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    name: str
    folder: Path
    max_new_tokens: int | None  # None: the bot's own default


def resolve_model(spec: str, *, cache: Path, max_new_tokens: int | None) -> ModelChoice:
    """``default``, ``random-200m`` or a model folder, built into ``cache`` when needed."""
    if spec == "default":
        folder = cache / "default-model"
        if not (folder / "config.json").exists():
            say(f"building the default model into {folder} (about 2 minutes)")
            from model.bootstrap import build_default_model

            build_default_model(folder, progress=say)
        return ModelChoice("default", folder, max_new_tokens)
    if spec == "random-200m":
        folder = cache / "random-200m"
        from benchmarks.random_llama import RANDOM_MODEL_NEW_TOKENS, build_random_llama

        if not (folder / "config.json").exists():
            say(f"building the random 200M model into {folder}")
            default = cache / "default-model"
            tokenizer_from = default if (default / "tokenizer.json").exists() else None
            folder = build_random_llama(folder, tokenizer_from=tokenizer_from)
        return ModelChoice("random-200m", folder, max_new_tokens or RANDOM_MODEL_NEW_TOKENS)
    folder = Path(spec).expanduser().resolve()
    if not (folder / "config.json").exists():
        raise SystemExit(f"--models: {spec!r} is neither default, random-200m nor a model folder")
    return ModelChoice(folder.name, folder, max_new_tokens)


# --------------------------------------------------------------------------- main


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bot_env(pairs: Sequence[str]) -> dict[str, str]:
    env = dict(BOT_ENV)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--bot-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


async def run_all(args: argparse.Namespace) -> list[Phase]:
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown:
        raise SystemExit(f"--platforms: unknown {', '.join(unknown)} (use slack,discord)")
    models = [
        resolve_model(spec.strip(), cache=args.cache_dir, max_new_tokens=args.max_new_tokens)
        for spec in args.models.split(",")
        if spec.strip()
    ]
    plan = Plan(
        sequential=args.sequential,
        concurrent=args.concurrent,
        warmup=args.warmup,
        repeats=args.repeats,
        reply_within=args.timeout,
        questions=[question for question, _ in load_starter_corpus()[: args.sequential]],
        keep_logs=args.keep_logs,
    )
    phases: list[Phase] = []
    for choice in models:
        env = _bot_env(args.bot_env)
        if choice.max_new_tokens is not None:
            env.setdefault("MAX_NEW_TOKENS", str(choice.max_new_tokens))
        for name in platforms:
            channels = (
                plan.warmup
                + (plan.concurrent if plan.warmup else 0)
                + plan.repeats * (plan.sequential + plan.concurrent)
            )
            platform = Slack() if name == "slack" else Discord(channels=channels)
            phases += await measure(
                platform, model_name=choice.name, model=choice.folder, env=env, plan=plan
            )
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 one by one, 8 at once, once")
    parser.add_argument("--models", default="default,random-200m", help="comma-separated")
    parser.add_argument("--platforms", default="slack,discord", help="comma-separated")
    parser.add_argument("--sequential", type=int, default=None, help="mentions one by one (8)")
    parser.add_argument("--concurrent", type=int, default=None, help="mentions at once (32)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured mentions first (then one round at once)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each phase, medians (5; --quick 1)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="MAX_NEW_TOKENS")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / "data" / "benchmarks",
        help="where the default and random models are built once",
    )
    parser.add_argument(
        "--bot-env", action="append", default=[], metavar="KEY=VALUE", help="bot setting"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the bot logs here")
    args = parser.parse_args(argv)
    args.sequential = args.sequential or (2 if args.quick else 8)
    args.concurrent = args.concurrent or (8 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 5)

    phases = asyncio.run(run_all(args))
    print(table(phases))
    for p in phases:
        if len(p.pipeline_ms) != p.messages * len(p.rounds):
            print(f"{p.platform}, {p.model}, {p.mode}: {len(p.pipeline_ms)} split lines logged")
    results = checks(phases)
    print()
    for ok, text in results:
        print(f"{'PASS' if ok else 'MISS'} {text}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in phases], indent=2))
    return 0 if args.quick or all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
