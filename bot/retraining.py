"""The composition of the retrain loop (part of the composition root, with :mod:`bot.cli`):
the registry, the trainer and the commands that change the serving model, for the bot and for
``chatbot train`` / ``chatbot model list|use N|rollback``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import Settings
from bot.storage import Database

if TYPE_CHECKING:
    from model.registry import Registry
    from model.retrain import ModelControl, Retrainer

logger = logging.getLogger(__name__)

#: How long the training lease lasts between renewals; a crashed trainer's lease lapses then.
TRAINING_LEASE_SECONDS = 120.0


def build_registry(settings: Settings) -> Registry:
    from model.registry import Registry

    return Registry(settings.resolved_models_dir, base=settings.resolved_model_path)


def serving_path(settings: Settings) -> str:
    """The folder to serve: the registry's current version, else MODEL_PATH (or the default)."""
    registry = build_registry(settings)
    current = registry.current()
    return settings.resolved_model_path if current.number == 0 else str(current.path)


def build_retrainer(
    settings: Settings, *, database: Database, swap: Any, serving: Any = None
) -> Retrainer:
    from bot.cli import build_exporter
    from bot.learning.lease import Lease
    from bot.learning.training_data import forgotten_users, read_training_data
    from bot.storage.claims import instance_id
    from model.corpus import load_starter_corpus
    from model.evaluation import Gate
    from model.retrain import Retrainer, RetrainSettings
    from model.train import Recipe

    exporter = build_exporter(settings, database)

    async def export() -> str:
        result = await asyncio.to_thread(exporter.run)
        return result.describe()

    async def data() -> Any:
        forgotten = await asyncio.to_thread(forgotten_users, database)
        return await asyncio.to_thread(
            read_training_data,
            settings.resolved_export_dir,
            forgotten=forgotten,
            holdout_from=settings.retrain_holdout_from,
            holdout_percent=settings.retrain_holdout_percent,
        )

    recipe = Recipe(
        epochs=settings.retrain_epochs,
        replay_ratio=settings.retrain_replay_ratio,
        learning_rate=settings.retrain_learning_rate,
        batch_size=settings.retrain_batch_size,
        method=settings.retrain_method,
        lora_from_parameters=settings.retrain_lora_from_parameters,
        threads=settings.retrain_threads,
        system_prompt=settings.system_prompt,
        dp_epsilon=settings.retrain_dp_epsilon,
        dp_delta=settings.retrain_dp_delta,
    )
    return Retrainer(
        registry=build_registry(settings),
        export=export,
        data=data,
        lease=Lease(
            database, name="training", holder=instance_id(), seconds=TRAINING_LEASE_SECONDS
        ),
        swap=swap,
        replay=load_starter_corpus,  # read at the first retrain
        serving=serving,
        settings=RetrainSettings(
            recipe=recipe,
            gate=Gate(learned=settings.retrain_learned_share, margin=settings.retrain_margin),
            holdout_from=settings.retrain_holdout_from,
            holdout_percent=settings.retrain_holdout_percent,
        ),
    )


def build_model_control(
    settings: Settings, *, database: Database, generator: Any
) -> tuple[ModelControl, Registry]:
    """The model side of ``retrain``, ``rollback`` and ``model``; a remote model cannot be
    retrained here, but its registry commands still answer."""
    from model.retrain import ModelControl

    swap = getattr(generator, "swap", None)
    registry = build_registry(settings)
    retrainer = (
        build_retrainer(settings, database=database, swap=swap, serving=generator)
        if settings.model_backend == "local"
        else None
    )
    return ModelControl(retrainer=retrainer, registry=registry, swap=swap), registry


def retrain_when_due(
    settings: Settings, *, database: Database, control: Any
) -> Callable[[Any], Awaitable[str | None]]:
    """After a scheduled export: retrain once ``RETRAIN_AFTER_EXPORTED`` exchanges have been
    exported since the newest version was trained (kept or promoted); ``None`` when not due."""
    from bot.learning.training_data import exported_since, parse_utc

    async def maybe_retrain(_result: Any) -> str | None:
        versions = await asyncio.to_thread(build_registry(settings).versions)
        newest = max(versions, key=lambda version: version.number)
        since = parse_utc(newest.metadata.get("created_at"))
        fresh = await asyncio.to_thread(exported_since, database, since)
        if fresh < settings.retrain_after_exported:
            return None
        logger.info("%d exchanges exported since the last training: retraining", fresh)
        text: str = await control.retrain_for(requested_by="scheduler")
        logger.warning("scheduled retrain: %s", text.splitlines()[0])
        return text

    return maybe_retrain


def serving_folder(generator: Any) -> Path | None:
    """The folder the model service serves from (``None`` for a remote model)."""
    source = getattr(generator, "source", None) or getattr(
        getattr(generator, "local", None), "source", ""
    )
    return Path(source) if source else None


async def watch_models(settings: Settings, generator: Any) -> None:
    """Follow the registry's pointer: every replica swaps when another promotes or rolls back."""
    from model.registry import watch_pointer

    swap = getattr(generator, "swap", None)
    if swap is None:
        return
    await watch_pointer(
        build_registry(settings),
        serving=lambda: serving_folder(generator),
        swap=swap,
        interval=settings.model_watch_seconds,
    )


# --- the command line ----------------------------------------------------------------------


def train_command(settings: Settings, *, dry_run: bool) -> int:
    """``chatbot train [--dry-run]``: a retrain from the command line, with progress."""
    database = Database(settings.resolved_database_url)
    database.upgrade()

    async def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc="training", file=sys.stderr)

    def step(event: Any) -> None:
        bar.total = int(event["steps"])
        bar.n = int(event["step"])
        bar.set_postfix(
            loss=f"{event['loss']:.3f}", tokens_per_s=f"{event['tokens_per_second']:.0f}"
        )

    try:
        retrainer = build_retrainer(settings, database=database, swap=None)
        retrainer.settings = _with_progress_every(retrainer.settings, 10.0)
        retrainer.on_step = step
        outcome = asyncio.run(
            retrainer.retrain(requested_by="command line", say=say, dry_run=dry_run)
        )
    finally:
        bar.close()
        database.dispose()
    print(outcome.text)
    if outcome.version is not None:
        from model.train import LOSS_CURVE

        curve = build_registry(settings).version(outcome.version).path / LOSS_CURVE
        if curve.is_file():
            print(f"Loss curve: {curve}")
    return 1 if outcome.busy or outcome.failed else 0


def _with_progress_every(settings: Any, seconds: float) -> Any:
    import dataclasses

    return dataclasses.replace(settings, progress_every=seconds)


def model_command(settings: Settings, *, action: str, number: int | None) -> int:
    """``chatbot model list | use N | rollback``."""
    from model.registry import RegistryError
    from model.retrain import ModelControl

    registry = build_registry(settings)
    control = ModelControl(retrainer=None, registry=registry, swap=None)
    if action == "list":
        print(control.describe_versions())
        return 0
    try:
        if action == "use":
            assert number is not None
            version = registry.use(number)
        else:
            version = registry.rollback()
    except RegistryError as error:
        print(f"chatbot: error: {error}", file=sys.stderr)
        return 2
    print(f"the {version.label} is now the current model; running bots switch within seconds")
    return 0
