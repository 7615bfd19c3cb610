"""What the dashboard's buttons do: each one is a chat command run through
:meth:`bot.commands.Commands.run`, asked by the dashboard's admin, so it meets the same
permission check and leaves the same audit line as the command typed in chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bot.commands import CommandRequest, Commands

logger = logging.getLogger(__name__)

PLATFORM = "dashboard"
USER_ID = "dashboard-admin"
USER_NAME = "dashboard"


@dataclass(slots=True)
class RetrainJob:
    """A retrain started from the dashboard: its progress lines, then its answer."""

    started_at: datetime
    lines: list[str] = field(default_factory=list)
    result: str | None = None

    @property
    def running(self) -> bool:
        return self.result is None


class DashboardActions:
    """Runs the commands behind the dashboard's forms; each returns the command's answer."""

    def __init__(self, *, commands: Commands) -> None:
        self.commands = commands
        self.retrain_job: RetrainJob | None = None
        self._retrain_task: asyncio.Task[None] | None = None

    def request(
        self,
        command: str,
        arguments: str = "",
        *,
        channel: str = "",
        channel_platform: str = "",
        progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> CommandRequest:
        """The request of the dashboard's admin (a configured admin, as on every platform)."""
        return CommandRequest(
            command=command,
            arguments=arguments,
            platform=PLATFORM,
            workspace=PLATFORM,
            channel=channel or PLATFORM,
            channel_platform=channel_platform,
            user_id=USER_ID,
            user_name=USER_NAME,
            user_is_admin=True,
            progress=progress,
        )

    async def review(self, *, exchange_id: int, verdict: str) -> str:
        if verdict not in ("approve", "reject"):
            raise ValueError(f"unknown verdict {verdict!r}")
        return await self.commands.run(self.request("review", f"{verdict} {exchange_id}"))

    async def edit(self, *, exchange_id: int, answer: str) -> str:
        return await self.commands.run(self.request("review", f"edit {exchange_id} {answer}"))

    async def set_training(self, *, platform: str, channel: str, on: bool) -> str:
        request = self.request(
            "training", "on" if on else "off", channel=channel, channel_platform=platform
        )
        return await self.commands.run(request)

    async def rollback(self) -> str:
        return await self.commands.run(self.request("rollback"))

    async def use_version(self, *, number: int) -> str:
        return await self.commands.run(self.request("model", f"use {number}"))

    def start_retrain(self) -> bool:
        """Start ``retrain`` in the background; ``False`` while one started here still runs
        (one at a time across replicas is the training lease's job)."""
        if self.retrain_job is not None and self.retrain_job.running:
            return False
        job = RetrainJob(started_at=datetime.now(UTC))

        async def progress(line: str) -> None:
            job.lines.append(line)
            del job.lines[:-20]

        async def run() -> None:
            try:
                job.result = await self.commands.run(self.request("retrain", progress=progress))
            except Exception as error:  # one trace in the log; the page says it failed
                logger.exception("the retrain started from the dashboard failed")
                job.result = f"The retrain failed: {error}"

        self.retrain_job = job
        self._retrain_task = asyncio.create_task(run())
        return True

    async def close(self) -> None:
        """Stop waiting for a retrain still running (the bot is stopping)."""
        task = self._retrain_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
