"""What the process tests share: the bot as a real ``chatbot run`` subprocess, and looks at
what it stored (the database fixture is in this folder's conftest)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlmodel import col, select

from bot.storage import Database, ExchangeRecord, MessageRecord
from model.corpus import SEED_EXCHANGES

REPO = Path(__file__).resolve().parents[2]
QUESTION, ANSWER = SEED_EXCHANGES[0]

#: Short intervals so a test sees recovery and retries within seconds.
#: PLACEHOLDER_DELAY_SECONDS: the placeholder (Slack) or typing (Discord) before generation
#: starts, for tests that catch a reply at its placeholder or its final edit (by default a
#: quick reply has neither)...
PLACEHOLDER_FIRST = "0"
#: ...or never a placeholder or a streamed edit: every reply is one post, whatever the load.
NO_PLACEHOLDER = "600"

FAST_INTERVALS = {
    "LOG_LEVEL": "INFO",
    "RECOVERY_INTERVAL_SECONDS": "0.5",
    "DELIVERY_RETRY_SECONDS": "0.3",
    # Long enough that this process never retries a reply it is still sending.
    "DELIVERY_GRACE_SECONDS": "60",
    "SHUTDOWN_DRAIN_SECONDS": "20",
    # Any free port for the HTTP server: bots of several tests never contend for 8080.
    "DASHBOARD_PORT": "0",
}


class BotProcess:
    """One ``chatbot run`` process, its output in a log file."""

    def __init__(self, process: asyncio.subprocess.Process, *, log: Path) -> None:
        self.process = process
        self.log = log

    @staticmethod
    async def spawn(
        *, tmp_path: Path, database_url: str, model: Path, log: Path, env: dict[str, str]
    ) -> asyncio.subprocess.Process:
        """Start ``chatbot run`` with ``env`` (the platform's settings) on top of a clean
        environment: no platform, database or model settings of the caller's leak in."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SLACK_", "DISCORD_", "DATABASE_", "MODEL_"))
        }
        environment.update(
            PYTHONPATH=str(REPO),
            DATA_DIR=str(tmp_path / "data"),
            DATABASE_URL=database_url,
            MODEL_PATH=str(model),
            **FAST_INTERVALS,
        )
        environment.update(env)
        with log.open("wb") as output:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                "run",
                cwd=tmp_path,  # away from the repository's .env
                env=environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    async def wait_for_log(self, text: str, *, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while text not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never logged:\n{self.output()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, *, within: float = 60.0) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"the bot did not exit:\n{self.output()}") from None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        self.process.send_signal(signum)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def answers_by_channel(database_url: str) -> dict[str, list[tuple[str, str | None]]]:
    """Per channel: the stored bot answers (text, delivery state)."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for row in _answers(database_url):
        found.setdefault(row.channel, []).append((row.text, row.delivery_state))
    return found


def answer_message_ids(database_url: str, channel: str) -> list[str | None]:
    """The platform message ids recorded for the stored bot answers in ``channel``."""
    return [row.platform_message_id for row in _answers(database_url) if row.channel == channel]


def _answers(database_url: str) -> list[MessageRecord]:
    """The stored answers (the messages exchanges answer with), oldest first."""
    database = Database(database_url)
    try:
        with database.session() as session:
            rows = session.exec(
                select(MessageRecord)
                .join(ExchangeRecord, col(ExchangeRecord.answer_message_id) == MessageRecord.id)
                .order_by(col(MessageRecord.id))
            ).all()
            return list(rows)
    finally:
        database.dispose()


def question_states(database_url: str) -> dict[str, list[str | None]]:
    database = Database(database_url)
    try:
        with database.session() as session:
            rows = session.exec(
                select(MessageRecord.channel, MessageRecord.answer_state).where(
                    MessageRecord.role == "user"
                )
            ).all()
            found: dict[str, list[str | None]] = {}
            for channel, state in rows:
                found.setdefault(channel, []).append(state)
            return found
    finally:
        database.dispose()


async def wait_until(
    condition: Callable[[], bool],
    *,
    what: str,
    within: float = 60.0,
    describe: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{describe()}")
        await asyncio.sleep(0.1)
