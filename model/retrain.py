"""A retrain from start to finish: export, read the shards, train in a process of its own,
evaluate, then promote the candidate or keep the serving model (issue #11).

One training runs at a time across every replica on the database: the ``training`` lease
(:class:`bot.learning.lease.Lease`). Who started it and when is kept beside the registry, so a
second request is told. The trainer is ``python -m model.train`` under ``nice``, with a thread
count that leaves the bot a core, and it dies with the bot (``PR_SET_PDEATHSIG``); the bot keeps
answering on the serving model throughout.

Every candidate is trained from the base model (version 0) on all the exchanges there are, not
from the serving version on the newest ones: a tiny model forgets what it is not shown again,
and a user who asked to be forgotten is gone from the next version's weights, not only from its
newest data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.learning.training_data import parse_utc
from model.evaluation import Comparison, Gate
from model.loading import folder_version
from model.registry import Registry, write_atomically
from model.train import LOSS_CURVE, Recipe, TrainingJob

logger = logging.getLogger(__name__)

STATUS_FILE = "training.json"
#: Where ``python -m model.train`` finds this package (the trainer runs from here).
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
#: At most this many new exchanges are asked back in the evaluation (the rest are trained on).
NEW_SET_LIMIT = 200


@dataclass(frozen=True, kw_only=True)
class RetrainSettings:
    """How retrains run (settings RETRAIN_*)."""

    recipe: Recipe = field(default_factory=Recipe)
    gate: Gate = field(default_factory=Gate)
    holdout_from: int = 200
    holdout_percent: int = 10
    regression_size: int = 50
    nice: int = 10
    #: Seconds between two progress reports (edits of one message).
    progress_every: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RetrainOutcome:
    """How a retrain ended, in words for the admin, and what it produced."""

    text: str
    promoted: bool = False
    version: int | None = None
    busy: bool = False
    failed: bool = False


def read_status(root: Path) -> dict[str, Any]:
    """The training status kept in the registry folder ``root`` (see :meth:`Retrainer.status`)."""
    try:
        status = json.loads((root / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def last_result(outcome: RetrainOutcome | None) -> str:
    """A retrain's end in one word: promoted, kept, nothing (no data to train on) or failed
    (``None``: it never finished)."""
    if outcome is None or outcome.failed:
        return "failed"
    if outcome.promoted:
        return "promoted"
    return "kept" if outcome.version is not None else "nothing"


#: Reports progress to whoever asked: ``say`` posts a new message, ``update`` replaces the last.
Say = Callable[[str], Awaitable[None]]


@contextlib.contextmanager
def serving_beside_training(service: Any, trainer_threads: int) -> Iterator[None]:
    """While a trainer runs on ``trainer_threads`` cores, the bot's model service decodes on the
    cores left, at least one: torch threads that share a core with the trainer make every small
    op wait for the one that lost its core (the bootstrap measured 138-170 ms a step on 2
    threads with a core taken, against 54-58 ms on 1). ``service`` without ``use_threads`` (a
    remote model, none): nothing changes."""
    use_threads = getattr(service, "use_threads", None)
    if use_threads is None:
        yield
        return
    use_threads(max(1, (os.cpu_count() or 1) - trainer_threads))
    try:
        yield
    finally:
        use_threads(None)


class Retrainer:
    """Runs retrains for the bot and the CLI.

    ``export`` runs an export and describes it; ``data`` reads the training data (the shards,
    less forgotten users); ``lease`` takes and gives back the training lease; ``swap`` switches
    this replica's model service (the others follow the registry's pointer).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        export: Callable[[], Awaitable[str]],
        data: Callable[[], Awaitable[Any]],
        lease: Any,
        swap: Callable[[Path], Awaitable[Any]] | None,
        replay: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]],
        settings: RetrainSettings | None = None,
        python: str = sys.executable,
        serving: Any = None,
    ) -> None:
        """``serving``: this process's model service, which lends the trainer its cores."""
        self.registry = registry
        self.serving = serving
        #: Sees every progress report of the trainer (the CLI's progress bar), unthrottled.
        self.on_step: Callable[[Mapping[str, Any]], None] | None = None
        self.export = export
        self.data = data
        self.lease = lease
        self.swap = swap
        self._replay = replay  # loaded when a retrain first needs it, not at start-up
        self.settings = settings or RetrainSettings()
        self.python = python
        self._process: asyncio.subprocess.Process | None = None

    # --- who is training -------------------------------------------------------------------

    def running(self) -> dict[str, Any] | None:
        status = self.status()
        return status if status.get("running") else None

    def status(self) -> dict[str, Any]:
        """The training status beside the registry (shared by the replicas): ``running``,
        ``requested_by``, ``started_at``, and once one ended ``finished_at``,
        ``last_result`` (see :func:`last_result`) and ``last_version``; empty before any."""
        return read_status(self.registry.root)

    def _write_status(self, **status: Any) -> None:
        self.registry.root.mkdir(parents=True, exist_ok=True)
        write_atomically(self.registry.root / STATUS_FILE, json.dumps(status) + "\n")

    # --- a retrain --------------------------------------------------------------------------

    async def retrain(
        self, *, requested_by: str, say: Say | None = None, dry_run: bool = False
    ) -> RetrainOutcome:
        """Export, train, evaluate, promote or keep. Never raises for a failed training: the
        outcome says what happened, and the serving model keeps serving."""
        if not await asyncio.to_thread(self.lease.acquire):
            running = self.running() or {}
            who = running.get("requested_by", "another replica")
            since = running.get("started_at", "a moment ago")
            return RetrainOutcome(
                text=f"A training is running already: started by {who} at {since}.", busy=True
            )
        started = datetime.now(UTC)
        renewing = asyncio.ensure_future(self._renew_lease())
        outcome: RetrainOutcome | None = None
        try:
            if not dry_run:
                self._write_status(
                    running=True, requested_by=requested_by, started_at=started.isoformat()
                )
            outcome = await self._retrain(requested_by=requested_by, say=say, dry_run=dry_run)
            return outcome
        except Exception as error:
            logger.exception("the retrain failed")
            outcome = RetrainOutcome(
                text=f"The retrain failed: {error}. The current model serves.", failed=True
            )
            return outcome
        finally:
            renewing.cancel()
            if not dry_run:
                # How it ended, for the metrics and the dashboard (cancelled: "failed").
                self._write_status(
                    running=False,
                    requested_by=requested_by,
                    started_at=started.isoformat(),
                    finished_at=datetime.now(UTC).isoformat(),
                    last_result=last_result(outcome),
                    last_version=None if outcome is None else outcome.version,
                )
            await asyncio.to_thread(self.lease.release)

    async def _renew_lease(self) -> None:
        """Keep the training lease while this training runs (it lapses if the bot dies)."""
        every = max(1.0, float(getattr(self.lease, "seconds", 120.0)) / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.lease.renew)
            except Exception as error:  # the database went away for a moment
                logger.warning("could not renew the training lease: %s", error)

    async def _retrain(
        self, *, requested_by: str, say: Say | None, dry_run: bool
    ) -> RetrainOutcome:
        exported = await self.export()
        data = await self.data()
        described = f"{exported}\nTraining data: {data.describe()}."
        if dry_run:
            return RetrainOutcome(text=f"Dry run, nothing trained. {described}")
        if not data.train:
            return RetrainOutcome(text=f"Nothing to train on. {described}")
        await _tell(say, f"Training started. {described}")
        await asyncio.to_thread(self.registry.clean_up)
        serving = self.registry.current()
        number, folder = await asyncio.to_thread(self.registry.new_folder)
        job = self._job(data, folder=folder, serving=serving.path)
        clock = time.monotonic()
        try:
            result = await self._train(job, say=say)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        comparison = Comparison.from_json(result["comparison"])
        report = result["report"]
        promote, why = self.settings.gate.decide(comparison)
        metadata = {
            "parent": serving.number,
            "trained_from": 0,
            "triggered_by": requested_by,
            "created_at": datetime.now(UTC).isoformat(),
            "shards": data.shards,
            "exchanges": {"train": len(data.train), "held_out": len(data.held_out)},
            "data_fingerprint": data.fingerprint,
            "pseudonyms": sorted(data.pseudonyms()),
            "metrics": comparison.as_json(),
            "training": {k: v for k, v in report.items() if k != "losses"},
            "losses": report.get("losses", []),
            "dp": report.get("dp"),
            "seconds": round(time.monotonic() - clock, 1),
            "promoted": promote,
            "decision": why,
            "loss_curve": LOSS_CURVE if (folder / LOSS_CURVE).is_file() else None,
        }
        version = await asyncio.to_thread(self.registry.add, number, folder, metadata)
        model_version = await asyncio.to_thread(folder_version, version.path)
        await asyncio.to_thread(
            self.registry.update_metadata, number, {"model_version": model_version}
        )
        table = comparison.table()
        if not promote:
            return RetrainOutcome(
                text=f"Kept the current model: {why}. Version {number} is kept on disk, "
                f"not served.\n{table}",
                version=number,
            )
        await asyncio.to_thread(self.registry.use, number)
        if self.swap is not None:
            try:
                await self.swap(version.path)
            except Exception as error:  # the pointer moved; the watcher tries again
                logger.error("version %d is current but did not load here: %s", number, error)
        return RetrainOutcome(
            text=f"Promoted as version {number}: {why}.\n{table}", promoted=True, version=number
        )

    @property
    def replay(self) -> list[tuple[str, str]]:
        """The starter-corpus pairs replayed and asked back (read once, on first use)."""
        if callable(self._replay):
            self._replay = list(self._replay())
        return list(self._replay)

    def _job(self, data: Any, *, folder: Path, serving: Path) -> TrainingJob:
        recipe = self.settings.recipe
        pairs = self.replay
        new = [list(exchange.messages) for exchange in data.train]
        replay = [
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs
        ]
        taught = [(list(e.messages[:-1]), e.answer) for e in data.train[-NEW_SET_LIMIT:]]
        held_out = [(list(e.messages[:-1]), e.answer) for e in data.held_out]
        regression = [
            ([{"role": "user", "content": q}], a) for q, a in pairs[: self.settings.regression_size]
        ]
        return TrainingJob(
            base=str(self.registry.base),
            output=str(folder),
            new=new,
            replay=replay,
            recipe=asdict(recipe),
            serving=str(serving),
            evaluation={"new": taught, "held_out": held_out, "regression": regression},
        )

    async def _train(self, job: TrainingJob, *, say: Say | None) -> dict[str, Any]:
        """Run the training process; its result lines (``evaluated`` and ``done``)."""
        with tempfile.TemporaryDirectory(prefix="chatbot-train-") as scratch:
            path = Path(scratch) / "job.json"
            await asyncio.to_thread(job.write, path)
            environment = {
                **os.environ,
                "OMP_NUM_THREADS": str(self.settings.recipe.thread_count()),
                "TOKENIZERS_PARALLELISM": "false",
            }
            command = [self.python, "-m", "model.train", str(path)]
            if shutil.which("nice"):
                command = ["nice", "-n", str(self.settings.nice), *command]
            process = await asyncio.create_subprocess_exec(
                *command,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
                cwd=PROJECT_ROOT,
            )
            self._process = process
            try:
                with serving_beside_training(self.serving, self.settings.recipe.thread_count()):
                    return await self._follow(process, say=say)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                self._process = None

    async def _follow(
        self, process: asyncio.subprocess.Process, *, say: Say | None
    ) -> dict[str, Any]:
        assert process.stdout is not None and process.stderr is not None
        errors = asyncio.ensure_future(process.stderr.read())
        result: dict[str, Any] = {}
        last_report = 0.0
        failure: str | None = None
        async for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a library's print; not ours
            kind = event.get("event")
            if kind == "progress" and self.on_step is not None:
                self.on_step(event)
            if kind == "progress" and say is not None:
                if time.monotonic() - last_report >= self.settings.progress_every:
                    last_report = time.monotonic()
                    await _tell(
                        say,
                        f"Training: step {event['step']}/{event['steps']}, "
                        f"loss {event['loss']:.3f}, {event['tokens_per_second']:.0f} tokens/s",
                    )
            elif kind == "evaluated":
                result["comparison"] = event["comparison"]
            elif kind == "done":
                result["report"] = event["report"]
            elif kind == "failed":
                failure = str(event.get("error"))
        code = await process.wait()
        stderr = (await errors).decode(errors="replace")
        if failure or code != 0 or "report" not in result or "comparison" not in result:
            tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
            raise RuntimeError(failure or f"the trainer exited with {code}: {' '.join(tail)}")
        return result


async def _tell(say: Say | None, text: str) -> None:
    """Report to whoever asked; a platform that is away does not stop the training."""
    if say is None:
        return
    try:
        await say(text)
    except Exception as error:
        logger.warning("could not report the training's progress: %s", error)


class ModelControl:
    """The model side of the ``retrain``, ``rollback`` and ``model`` commands (see
    :class:`bot.learning.model_commands.ModelControl`): the registry, and this replica's swap."""

    def __init__(self, *, retrainer: Retrainer | None, registry: Registry, swap: Any) -> None:
        self.retrainer = retrainer
        self.registry = registry
        self.swap = swap

    async def retrain_for(
        self,
        *,
        requested_by: str,
        progress: Say | None = None,
        attach: Callable[[Path, str], Awaitable[None]] | None = None,
    ) -> str:
        if self.retrainer is None:
            return "Retraining needs the local model backend (MODEL_BACKEND=local)."
        outcome = await self.retrainer.retrain(requested_by=requested_by, say=progress)
        if progress is not None and not outcome.busy:
            await _tell(progress, f"Training finished. {outcome.text.splitlines()[0]}")
        if attach is not None and outcome.version is not None:
            curve = self.registry.version(outcome.version).path / LOSS_CURVE
            if curve.is_file():
                try:
                    await attach(curve, f"Loss curve of version {outcome.version}")
                except Exception as error:  # the answer still goes out
                    logger.warning("could not post the loss curve: %s", error)
        return outcome.text

    async def rollback_for(self, *, requested_by: str) -> str:
        from model.registry import RegistryError

        try:
            version = await asyncio.to_thread(self.registry.rollback)
        except RegistryError as error:
            return f"Nothing to roll back to: {error}."
        logger.warning("%s rolled the model back to %s", requested_by, version.label)
        return await self._serve(version.path, f"Rolled back: the {version.label} serves now.")

    async def use_for(self, *, number: int, requested_by: str) -> str:
        from model.registry import RegistryError

        try:
            version = await asyncio.to_thread(self.registry.use, number)
        except RegistryError as error:
            return f"Cannot use that version: {error}."
        logger.warning("%s switched the model to %s", requested_by, version.label)
        return await self._serve(version.path, f"The {version.label} serves now.")

    async def _serve(self, path: Path, text: str) -> str:
        if self.swap is None:
            return text
        try:
            await self.swap(path)
        except Exception as error:
            return f"{text[:-1]} on the other replicas, but it did not load here: {error}"
        return text

    def training_status(self) -> dict[str, Any]:
        """The training status (:meth:`Retrainer.status`, shared by the replicas) and the
        serving version: ``serving_number``, ``serving_label``."""
        current = self.registry.current()
        return {
            **read_status(self.registry.root),
            "serving_number": current.number,
            "serving_label": current.label,
        }

    def learned_from(self, pseudonym: str) -> bool:
        """Whether the serving version was trained on this user's data (its lineage)."""
        return pseudonym in self.registry.current().metadata.get("pseudonyms", ())

    def describe_status(self, forgotten: Mapping[str, datetime]) -> str:
        """The serving version and its metrics, and how many versions hold the data of users
        forgotten after they were trained (``forgotten``: pseudonym -> when they asked)."""
        current = self.registry.current()
        lines = [f"Serving: {current.label}"]
        after = current.metadata.get("metrics", {}).get("after", {})
        if after:
            scores = ", ".join(
                f"{name.replace('_', '-')} {score['normalised']}/{score['total']}"
                for name, score in after.items()
                if score.get("total")
            )
            lines.append(f"Its evaluation: {scores}")
        holding = 0
        for version in self.registry.versions():
            created = parse_utc(version.metadata.get("created_at"))
            learned = set(version.metadata.get("pseudonyms", ()))
            if any(
                pseudonym in learned and (created is None or asked > created)
                for pseudonym, asked in forgotten.items()
            ):
                holding += 1
        lines.append(f"Versions holding forgotten users' data: {holding}")
        return "\n".join(lines)

    def describe_versions(self) -> str:
        current = self.registry.pointer()[0]
        lines = []
        for version in self.registry.versions():
            marker = "→" if version.number == current else " "
            meta = version.metadata
            if version.number == 0:
                detail = str(version.path)
            else:
                state = "promoted" if meta.get("promoted") else "kept, not promoted"
                detail = (
                    f"{meta.get('created_at', '?')[:16]}, by {meta.get('triggered_by', '?')}, "
                    f"{meta.get('exchanges', {}).get('train', '?')} exchanges, {state}"
                )
            lines.append(f"{marker} {version.number}: {detail}")
        return "Model versions:\n" + "\n".join(lines)
