"""The scheduled retrain (bot/retraining.py): after a scheduled export, a retrain once enough
exchanges were exported since the last training; on a real database and registry."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.triggers.interval import IntervalTrigger

from bot.config import Settings
from bot.learning import ExportScheduler
from bot.learning.training_data import exported_since
from bot.retraining import build_registry, retrain_when_due
from bot.storage import Database
from tests.bot.test_export import agent_exchange, exporter_for


class Control:
    def __init__(self) -> None:
        self.retrains: list[str] = []

    async def retrain_for(self, *, requested_by: str) -> str:
        self.retrains.append(requested_by)
        return "Promoted as version 1: fine."


def settings_for(tmp_path: Path, after: int) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        model_path=str(tmp_path / "base"),
        retrain_after_exported=after,
    )


async def test_a_retrain_follows_once_enough_was_exported(
    database: Database, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, after=3)
    control = Control()
    due = retrain_when_due(settings, database=database, control=control)
    for n in range(2):
        agent_exchange(database, f"Question {n}?", f"Answer {n}.", thread=f"T{n}")
    exporter_for(database, tmp_path / "exports", create_directory=True).run()
    assert exported_since(database, None) == 2
    assert await due(None) is None  # 2 of 3
    agent_exchange(database, "Question 9?", "Answer 9.", thread="T9")
    exporter_for(database, tmp_path / "exports").run()
    assert await due(None) == "Promoted as version 1: fine."
    assert control.retrains == ["scheduler"]

    # A version trained after those exports resets the count.
    registry = build_registry(settings)
    number, folder = registry.new_folder()
    trained_at = datetime.now(UTC) + timedelta(seconds=1)
    registry.add(number, folder, {"created_at": trained_at.isoformat()})
    assert exported_since(database, trained_at) == 0
    assert await due(None) is None
    assert control.retrains == ["scheduler"]
    json.dumps(registry.version(number).metadata)  # plain metadata


async def test_the_scheduled_export_runs_the_step_after_it(
    database: Database, tmp_path: Path
) -> None:
    agent_exchange(database, "Question?", "Answer.", thread="T1")
    seen = []

    async def after(result: object) -> None:
        seen.append(result)

    scheduler = ExportScheduler(
        exporter=exporter_for(database, tmp_path / "exports", create_directory=True),
        trigger=IntervalTrigger(seconds=0.05),
        after_export=after,
    )
    scheduler.start()
    try:
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.02)
    finally:
        scheduler.shutdown()
    assert seen and seen[0] is scheduler.results[0]
