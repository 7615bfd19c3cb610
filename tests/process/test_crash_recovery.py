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
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.storage import AnswerState, DeliveryState
from tests.fakes.slack_api import FakeSlackWebApi, HeldCall, event_callback, signed_headers
from tests.process.harness import (
    ANSWER,
    NO_PLACEHOLDER,
    PLACEHOLDER_FIRST,
    QUESTION,
    BotProcess,
    answer_message_ids,
    answers_by_channel,
    question_states,
    wait_until,
)

pytestmark = pytest.mark.process

SECRET = "process-test-secret"
PLACEHOLDER = "…"


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


class Bot(BotProcess):
    """One ``chatbot run`` process serving Slack over HTTP."""

    def __init__(self, process: asyncio.subprocess.Process, *, port: int, log: Path) -> None:
        super().__init__(process, log=log)
        self.port = port

    @classmethod
    async def start(
        cls, *, tmp_path: Path, database_url: str, model: Path, slack: FakeSlackWebApi, **env: str
    ) -> Bot:
        port = free_port()
        log = tmp_path / f"bot-{port}.log"
        process = await cls.spawn(
            tmp_path=tmp_path,
            database_url=database_url,
            model=model,
            log=log,
            env={
                "SLACK_BOT_TOKEN": "xoxb-process-test",
                "SLACK_SIGNING_SECRET": SECRET,
                "SLACK_API_URL": slack.url,
                "SLACK_PORT": str(port),
                **env,
            },
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
        tmp_path=tmp_path,
        database_url=database_url,
        model=tiny_model_dir,
        slack=slack,
        PLACEHOLDER_DELAY_SECONDS=PLACEHOLDER_FIRST,
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


async def test_sigkill_around_a_quick_reply_without_placeholder_posts_it_once(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, slack: FakeSlackWebApi
) -> None:
    # A reply ready before the placeholder delay is one chat.postMessage, with no placeholder
    # ts recorded first. Killed around that post:
    # D5: the reply recorded, its post held before it reached Slack;
    # D6: the post applied on Slack, the answer to the bot held (its ts never recorded).
    unsent = slack.hold("chat.postMessage", when=on_channel("D5", final=True))
    sent_unrecorded = slack.hold(
        "chat.postMessage", when=on_channel("D6", final=True), apply_first=True
    )
    start: dict[str, Any] = {
        "tmp_path": tmp_path,
        "database_url": database_url,
        "model": tiny_model_dir,
        "slack": slack,
    }
    first = await Bot.start(**start, PLACEHOLDER_DELAY_SECONDS=NO_PLACEHOLDER)
    for n, channel in enumerate(["D5", "D6"], start=5):
        await first.deliver(dm(channel, f"1700000000.00000{n}"))
    try:
        await arrived(unsent, sent_unrecorded)
    finally:
        first.kill(signal.SIGKILL)
        await first.wait_exit()
    slack.release_all()
    assert bot_messages(slack, "D5") == [] and bot_messages(slack, "D6") == [ANSWER]

    second = await Bot.start(**start, DELIVERY_GRACE_SECONDS="1")
    try:

        def all_delivered() -> bool:
            answers = answers_by_channel(database_url)
            return all(
                [state for _, state in answers.get(channel, [])] == [DeliveryState.SENT]
                for channel in ("D5", "D6")
            )

        await wait_until(
            all_delivered,
            what="every reply delivered",
            describe=lambda: f"Slack: {slack.posted()}\nsecond run:\n{second.output()}",
        )
    finally:
        second.kill(signal.SIGTERM)
        assert await second.wait_exit() == 0, second.output()

    for channel in ("D5", "D6"):
        assert bot_messages(slack, channel) == [ANSWER], (channel, slack.posted())
    # The reply that had landed is the one recorded (and rated), not a second post.
    d6_posted = [m["ts"] for m in slack.posted() if m["channel"] == "D6"]
    assert answer_message_ids(database_url, "D6") == d6_posted


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
        tmp_path=tmp_path,
        database_url=database_url,
        model=tiny_model_dir,
        slack=slack,
        PLACEHOLDER_DELAY_SECONDS=PLACEHOLDER_FIRST,
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
