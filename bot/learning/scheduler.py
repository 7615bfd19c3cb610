"""The scheduled export (APScheduler 3.11's asyncio scheduler, inside the bot process).

``EXPORT_SCHEDULE`` is ``interval:<seconds>`` or ``cron:<crontab fields>``, empty for none.
Missed runs (the bot was down or busy) are coalesced into one and still run within
``misfire_grace_time``; ``max_instances=1`` keeps runs from overlapping in this process, and the
export's database lease keeps several processes from overlapping (APScheduler's job stores do
not coordinate processes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.config import ConfigurationError
from bot.learning.errors import ExportError
from bot.learning.exporter import Exporter, ExportResult

logger = logging.getLogger(__name__)

MISFIRE_GRACE_SECONDS = 3600


class ScheduleError(ConfigurationError):
    """``EXPORT_SCHEDULE`` cannot be understood."""


def parse_schedule(spec: str) -> BaseTrigger | None:
    """``"interval:3600"`` → every hour; ``"cron:0 3 * * *"`` → 03:00 UTC daily; ``""`` → None."""
    spec = spec.strip()
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    try:
        if kind == "interval":
            seconds = float(value)
            if seconds <= 0:
                raise ValueError("the interval must be positive")
            return IntervalTrigger(seconds=seconds, timezone=UTC)
        if kind == "cron":
            return CronTrigger.from_crontab(value.strip(), timezone=UTC)
    except ValueError as error:
        raise ScheduleError(f"EXPORT_SCHEDULE {spec!r}: {error}") from None
    raise ScheduleError(
        f"EXPORT_SCHEDULE {spec!r}: expected 'interval:<seconds>' or 'cron:<crontab>'"
    )


class ExportScheduler:
    """Runs the export on a trigger, off the event loop."""

    def __init__(
        self,
        *,
        exporter: Exporter,
        trigger: BaseTrigger,
        after_export: Callable[[ExportResult], Awaitable[object]] | None = None,
    ) -> None:
        """``after_export`` runs after each export that worked (the retrain trigger)."""
        self.exporter = exporter
        self.trigger = trigger
        self.after_export = after_export
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.results: list[ExportResult] = []

    def start(self) -> None:
        """Start; needs a running event loop."""
        self.scheduler.add_job(
            self.run_once,
            self.trigger,
            id="export",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=MISFIRE_GRACE_SECONDS,
            replace_existing=True,
        )
        self.scheduler.start()

    async def run_once(self) -> None:
        try:
            result = await asyncio.to_thread(self.exporter.run)
        except ExportError as error:
            logger.error("scheduled export failed: %s", error)
            return
        self.results.append(result)
        logger.info("scheduled export: %s", result.describe())
        if self.after_export is not None:
            try:
                await self.after_export(result)
            except Exception:
                logger.exception("the step after the scheduled export failed")

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
