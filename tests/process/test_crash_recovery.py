"""Nothing lost, nothing twice: a real ``chatbot run`` killed with real signals.

The bot runs as a subprocess in Slack HTTP mode against the fake Web API of this test process
(tests/fakes/slack_api.py), with the tiny model and a SQLite file or a scratch PostgreSQL. The
fake holds one call at the moment to kill in; after SIGKILL and a restart every message ends
with exactly one finished reply, on the fake and in the database. SIGTERM lets the reply in
flight finish and exits 0.

Select them with ``pytest -m process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlmodel import col, select

from bot.storage import AnswerState, Database, DeliveryState, ExchangeRecord, MessageRecord
from model.corpus import SEED_EXCHANGES
from tests.conftest import scratch_postgres
from tests.fakes.slack_api import FakeSlackWebApi, HeldCall, event_callback, signed_headers

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
QUESTION, ANSWER = SEED_EXCHANGES[0]
SECRET = "process-test-secret"
PLACEHOLDER = "…"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of the bot's own: a SQLite file, then a scratch PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chatbot.db'}"
        return
    with scratch_postgres("chatbot_process") as url:
        yield url


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlackWebApi]:
    api = FakeSlackWebApi()
    await api.start()
    yield api
    api.release_all()
    await api.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Bot:
    """One ``chatbot run`` process serving Slack over HTTP."""

    def __init__(self, process: asyncio.subprocess.Process, *, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @classmethod
    async def start(
        cls, *, tmp_path: Path, database_url: str, model: Path, slack: FakeSlackWebApi, **env: str
    ) -> Bot:
        port = free_port()
        log = tmp_path / f"bot-{port}.log"
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
            SLACK_BOT_TOKEN="xoxb-process-test",
            SLACK_SIGNING_SECRET=SECRET,
            SLACK_API_URL=slack.url,
            SLACK_PORT=str(port),
            LOG_LEVEL="INFO",
            RECOVERY_INTERVAL_SECONDS="0.5",
            DELIVERY_RETRY_SECONDS="0.3",
            # Long enough that this process never retries a reply it is still sending.
            DELIVERY_GRACE_SECONDS="60",
            SHUTDOWN_DRAIN_SECONDS="20",
        )
        environment.update(env)
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
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
        bot = cls(process, port=port, log=log)
        await bot.wait_listening()
        return bot

    async def wait_listening(self, *, within: float = 120.0) -> None:
        """Until the bot accepts connections on its Slack port (torch takes a while)."""
        deadline = time.monotonic() + within
        while True:
            if self.process.returncode is not None:
                raise AssertionError(f"the bot exited early:\n{self.output()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the bot never listened:\n{self.output()}") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def deliver(self, event: dict[str, Any]) -> None:
        """Post a signed Events API request, as Slack does."""
        body = json.dumps(event_callback(event))
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{self.port}/slack/events",
                data=body,
                headers=signed_headers(body, secret=SECRET),
            ) as response,
        ):
            assert response.status == 200, await response.text()

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


def dm(channel: str, ts: str, text: str = QUESTION) -> dict[str, Any]:
    return {
        "type": "message",
        "channel_type": "im",
        "channel": channel,
        "user": "U1",
        "text": text,
        "ts": ts,
    }


async def arrived(*holds: HeldCall, within: float = 60.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(h.arrived.wait() for h in holds)), within)


def on_channel(channel: str, *, final: bool = False) -> Callable[[dict[str, Any]], bool]:
    """A call for ``channel``; with ``final``, the one carrying the finished reply."""

    def matches(params: dict[str, Any]) -> bool:
        return params.get("channel") == channel and (
            not final or params.get("text") not in {PLACEHOLDER, None}
        )

    return matches


def bot_messages(slack: FakeSlackWebApi, channel: str) -> list[str]:
    """What the bot's messages in ``channel`` show now."""
    return [m["text"] for m in slack.posted() if m["channel"] == channel]


def answers_by_channel(database_url: str) -> dict[str, list[tuple[str, str | None]]]:
    """Per channel: the stored bot answers (text, delivery state)."""
    database = Database(database_url)
    try:
        with database.session() as session:
            rows = session.exec(
                select(MessageRecord)
                .join(ExchangeRecord, col(ExchangeRecord.answer_message_id) == MessageRecord.id)
                .order_by(col(MessageRecord.id))
            ).all()
            found: dict[str, list[tuple[str, str | None]]] = {}
            for row in rows:
                found.setdefault(row.channel, []).append((row.text, row.delivery_state))
            return found
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


async def test_sigkill_at_every_point_loses_nothing_and_posts_nothing_twice(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, slack: FakeSlackWebApi
) -> None:
    # Three DMs, each caught at another moment when the bot is killed:
    # D1: generating — its placeholder post never reached Slack;
    # D2: the reply recorded, its final edit held before it reached Slack;
    # D3: the final edit applied on Slack, the answer to the bot held (delivery unrecorded).
    generating = slack.hold("chat.postMessage", when=on_channel("D1"))
    unsent = slack.hold("chat.update", when=on_channel("D2", final=True))
    sent_unrecorded = slack.hold("chat.update", when=on_channel("D3", final=True), apply_first=True)
    first = await Bot.start(
        tmp_path=tmp_path, database_url=database_url, model=tiny_model_dir, slack=slack
    )
    for n, channel in enumerate(["D1", "D2", "D3"], start=1):
        await first.deliver(dm(channel, f"1700000000.00000{n}"))
    try:
        await arrived(generating, unsent, sent_unrecorded)
    finally:
        first.kill(signal.SIGKILL)
        await first.wait_exit()
    slack.release_all()  # answered to nobody: the process is gone

    second = await Bot.start(
        tmp_path=tmp_path,
        database_url=database_url,
        model=tiny_model_dir,
        slack=slack,
        DELIVERY_GRACE_SECONDS="1",
    )
    try:

        def all_delivered() -> bool:
            answers = answers_by_channel(database_url)
            return all(
                [state for _, state in answers.get(channel, [])] == [DeliveryState.SENT]
                for channel in ("D1", "D2", "D3")
            )

        def describe() -> str:
            return (
                f"answers: {answers_by_channel(database_url)}\n"
                f"questions: {question_states(database_url)}\nSlack: {slack.posted()}\n"
                f"first run:\n{first.output()}\nsecond run:\n{second.output()}"
            )

        await wait_until(all_delivered, what="every reply delivered", describe=describe)
    finally:
        second.kill(signal.SIGTERM)
        assert await second.wait_exit() == 0, second.output()

    for channel in ("D1", "D2", "D3"):
        assert bot_messages(slack, channel) == [ANSWER], (channel, slack.posted())
        assert answers_by_channel(database_url)[channel] == [(ANSWER, DeliveryState.SENT)]
    assert question_states(database_url) == {
        channel: [AnswerState.ANSWERED] for channel in ("D1", "D2", "D3")
    }


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_lets_the_reply_in_flight_finish_and_exits_0(
    tmp_path: Path,
    tiny_model_dir: Path,
    database_url: str,
    slack: FakeSlackWebApi,
    signum: signal.Signals,
) -> None:
    """systemd and Docker stop with SIGTERM, a terminal with SIGINT (Ctrl-C): the same clean
    stop."""
    final_edit = slack.hold(
        "chat.update", when=on_channel("D4", final=True), answer_on_release=True
    )
    bot = await Bot.start(
        tmp_path=tmp_path, database_url=database_url, model=tiny_model_dir, slack=slack
    )
    try:
        await bot.deliver(dm("D4", "1700000000.000004"))
        await arrived(final_edit)
        bot.kill(signum)
        await bot.wait_for_log(f"{signum.name}: stopping")
        with contextlib.suppress(Exception):
            # A new event after the signal is not taken (the listener may be closed already).
            await bot.deliver(dm("D5", "1700000000.000005"))
    finally:
        # The reply in flight reaches Slack after the signal, within the drain time.
        final_edit.release()
    assert await bot.wait_exit() == 0, bot.output()

    assert bot_messages(slack, "D4") == [ANSWER]
    assert answers_by_channel(database_url) == {"D4": [(ANSWER, DeliveryState.SENT)]}
    assert question_states(database_url) == {"D4": [AnswerState.ANSWERED]}
    assert bot_messages(slack, "D5") == []  # taken after the signal: not answered
