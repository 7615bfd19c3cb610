"""Nothing lost, nothing twice on Discord: a real ``chatbot run`` killed with real signals.

The bot runs as a subprocess against the fake Discord of this test process (REST and gateway,
tests/fakes/discord_server.py), with the tiny model and a SQLite file or a scratch PostgreSQL.
The fake holds one request at the moment to kill in; after SIGKILL and a restart (a fresh
IDENTIFY: Discord replays nothing to a new session) every message ends with exactly one
finished reply, on the fake and in the database. SIGTERM lets the reply in flight finish and
exits 0; a message that arrives while the bot drains is stored and answered after the restart.

Select them with ``pytest -m process``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from bot.storage import AnswerState, Database, DeliveryState, MessageRecord
from tests.fakes.discord_server import FakeDiscord, HeldRequest, Json
from tests.process.harness import (
    ANSWER,
    PLACEHOLDER_FIRST,
    QUESTION,
    BotProcess,
    answers_by_channel,
    question_states,
    wait_until,
)

pytestmark = pytest.mark.process

USERS = [FakeDiscord.make_user(f"30000000000000000{n}", f"user{n}") for n in range(1, 6)]


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    server.release_all()  # a held request would keep the server's shutdown waiting
    await server.stop()


class DiscordBot(BotProcess):
    """One ``chatbot run`` process serving Discord (the fake)."""

    @classmethod
    async def start(
        cls, *, tmp_path: Path, database_url: str, model: Path, discord: FakeDiscord, **env: str
    ) -> DiscordBot:
        """Start the bot and wait until the fake has sent its new session READY."""
        sessions = discord.ready_sent
        log = tmp_path / f"bot-{sessions}.log"  # a session per start
        process = await cls.spawn(
            tmp_path=tmp_path,
            database_url=database_url,
            model=model,
            log=log,
            env={
                "DISCORD_BOT_TOKEN": "process-test-token",
                "DISCORD_API_URL": discord.api_url,
                "DISCORD_GATEWAY_URL": discord.gateway_url,
                **env,
            },
        )
        bot = cls(process, log=log)
        await bot.wait_connected(discord, sessions_before=sessions)
        return bot

    async def wait_connected(
        self, discord: FakeDiscord, *, sessions_before: int, within: float = 120.0
    ) -> None:
        """Until the bot identified on the gateway and got READY (torch takes a while)."""
        deadline = time.monotonic() + within
        while discord.ready_sent <= sessions_before:
            if self.process.returncode is not None:
                raise AssertionError(f"the bot exited early:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the bot never connected:\n{self.output()}")
            await asyncio.sleep(0.1)


async def ask(discord: FakeDiscord, user: Json) -> Json:
    """``user`` asks the bot the seed question in their DM; the message's payload."""
    message = discord.user_message(
        channel_id=discord.dm_channel(user)["id"], author=user, content=QUESTION
    )
    await discord.dispatch("MESSAGE_CREATE", message)
    return message


def hold_final_reply(
    discord: FakeDiscord, channel: str, *, apply_first: bool = False, **options: bool
) -> HeldRequest:
    """Hold the request that carries the finished reply in ``channel``: its post, or the last
    edit of a streamed reply (on a slow machine the reply may stream)."""
    return discord.hold(
        "POST|PATCH",
        rf"/channels/{channel}/messages(/\d+)?",
        when=lambda body: isinstance(body, dict) and body.get("content") == ANSWER,
        apply_first=apply_first,
        **options,
    )


async def arrived(*holds: HeldRequest, within: float = 60.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(h.arrived.wait() for h in holds)), within)


def bot_texts(discord: FakeDiscord, channel: str) -> list[str]:
    """What the bot's messages in ``channel`` show now."""
    return [message["content"] for message in discord.bot_messages(channel)]


def claimants(database_url: str, channel: str) -> list[str | None]:
    """Who holds the claim on each user message of ``channel``."""
    database = Database(database_url)
    try:
        with database.session() as session:
            return list(
                session.exec(
                    select(MessageRecord.answer_claimed_by).where(
                        MessageRecord.role == "user", MessageRecord.channel == channel
                    )
                ).all()
            )
    finally:
        database.dispose()


def describer(database_url: str, discord: FakeDiscord, *bots: DiscordBot) -> Callable[[], str]:
    def describe() -> str:
        runs = "\n".join(f"run {n}:\n{bot.output()}" for n, bot in enumerate(bots, start=1))
        return (
            f"answers: {answers_by_channel(database_url)}\n"
            f"questions: {question_states(database_url)}\n"
            f"Discord: {[(m['channel_id'], m['content']) for m in discord.messages.values()]}\n"
            f"{runs}"
        )

    return describe


def all_sent(database_url: str, channels: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        answers = answers_by_channel(database_url)
        return all(
            [state for _, state in answers.get(channel, [])] == [DeliveryState.SENT]
            for channel in channels
        )

    return check


async def test_sigkill_at_every_point_loses_nothing_and_posts_nothing_twice(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, discord: FakeDiscord
) -> None:
    # Three DMs, each caught at another moment when the bot is killed:
    # D1: generating — its typing indicator (shown before generation starts) held;
    # D2: the reply recorded, its post held before it reached Discord;
    # D3: the reply posted on Discord, the answer to the bot held (delivery unrecorded).
    d1, d2, d3 = (discord.dm_channel(user)["id"] for user in USERS[:3])
    generating = discord.hold("POST", rf"/channels/{d1}/typing")
    unsent = hold_final_reply(discord, d2)
    sent_unrecorded = hold_final_reply(discord, d3, apply_first=True)
    start: dict[str, Any] = {
        "tmp_path": tmp_path,
        "database_url": database_url,
        "model": tiny_model_dir,
        "discord": discord,
    }
    first = await DiscordBot.start(**start, PLACEHOLDER_DELAY_SECONDS=PLACEHOLDER_FIRST)
    for user in USERS[:3]:
        await ask(discord, user)
    try:
        await arrived(generating, unsent, sent_unrecorded)
    finally:
        first.kill(signal.SIGKILL)
        await first.wait_exit()
    discord.release_all()  # answered to nobody: the process is gone

    # Each message was caught where it was meant to be.
    assert question_states(database_url) == {
        d1: [AnswerState.PENDING],
        d2: [AnswerState.ANSWERED],
        d3: [AnswerState.ANSWERED],
    }
    assert answers_by_channel(database_url) == {
        d2: [(ANSWER, DeliveryState.PENDING)],
        d3: [(ANSWER, DeliveryState.PENDING)],
    }
    assert (bot_texts(discord, d1), bot_texts(discord, d2), bot_texts(discord, d3)) == (
        [],
        [],
        [ANSWER],
    )

    second = await DiscordBot.start(**start, DELIVERY_GRACE_SECONDS="1")
    try:
        await wait_until(
            all_sent(database_url, [d1, d2, d3]),
            what="every reply delivered",
            describe=describer(database_url, discord, first, second),
        )
    finally:
        second.kill(signal.SIGTERM)
        assert await second.wait_exit() == 0, second.output()

    for channel in (d1, d2, d3):
        assert bot_texts(discord, channel) == [ANSWER], (channel, discord.messages)
        assert answers_by_channel(database_url)[channel] == [(ANSWER, DeliveryState.SENT)]
    assert question_states(database_url) == {
        channel: [AnswerState.ANSWERED] for channel in (d1, d2, d3)
    }


async def test_sigterm_finishes_the_reply_in_flight_and_keeps_what_arrives_meanwhile(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, discord: FakeDiscord
) -> None:
    d4, d5 = (discord.dm_channel(user)["id"] for user in USERS[3:5])
    in_flight = hold_final_reply(discord, d4, answer_on_release=True)
    start: dict[str, Any] = {
        "tmp_path": tmp_path,
        "database_url": database_url,
        "model": tiny_model_dir,
        "discord": discord,
    }
    bot = await DiscordBot.start(**start)
    try:
        question = await ask(discord, USERS[3])
        await arrived(in_flight)
        bot.kill(signal.SIGTERM)
        await bot.wait_for_log("SIGTERM: stopping")
        # Still connected while it drains: Discord never sends this event again.
        late = await ask(discord, USERS[4])
        await wait_until(
            lambda: question_states(database_url).get(d5) == [AnswerState.PENDING],
            what="the late message stored",
            within=20,
            describe=describer(database_url, discord, bot),
        )
    finally:
        # The reply in flight reaches Discord after the signal, within the drain time.
        in_flight.release()
    assert await bot.wait_exit() == 0, bot.output()

    assert [m["content"] for m in discord.replies_to(question["id"])] == [ANSWER]
    assert answers_by_channel(database_url) == {d4: [(ANSWER, DeliveryState.SENT)]}
    assert bot_texts(discord, d5) == []  # not answered by the instance going down...
    assert claimants(database_url, d5) == [None]  # ...and left to the next one

    restarted = await DiscordBot.start(**start)
    try:
        await wait_until(
            all_sent(database_url, [d5]),
            what="the late message answered",
            describe=describer(database_url, discord, bot, restarted),
        )
    finally:
        restarted.kill(signal.SIGTERM)
        assert await restarted.wait_exit() == 0, restarted.output()

    assert [m["content"] for m in discord.replies_to(late["id"])] == [ANSWER]
    assert (bot_texts(discord, d4), bot_texts(discord, d5)) == ([ANSWER], [ANSWER])
    assert question_states(database_url) == {
        d4: [AnswerState.ANSWERED],
        d5: [AnswerState.ANSWERED],
    }
