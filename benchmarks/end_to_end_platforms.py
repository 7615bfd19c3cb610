"""The platforms of the end-to-end serving benchmark (benchmarks/serving_end_to_end.py): each
starts one of the test suite's fakes and a real ``chatbot run`` serving it, mentions the bot
there and tells which of the bot's requests post or edit a reply.

- :class:`Slack`: HTTP mode against the fake Web API; signed Events API ``app_mention``
  requests posted to the bot.
- :class:`Discord`: the fake REST API and gateway; guild-channel mentions dispatched as
  ``MESSAGE_CREATE``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.fakes.discord_server import FakeDiscord, RecordedRequest, snowflake
from tests.fakes.slack_api import (
    BOT_USER_ID,
    ApiCall,
    FakeSlackWebApi,
    event_callback,
    signed_headers,
)
from tests.process.harness import BotProcess

T = TypeVar("T")

SECRET = "benchmark-signing-secret"


class StampedList(list[T]):
    """A fake's request log that also notes, for each channel the bot posted or edited a
    message in, when it last did (the fakes append a request to their log as it arrives,
    before answering it): the driver looks that up each poll without scanning the log."""

    def __init__(self) -> None:
        super().__init__()
        self.posted_at: dict[str, float] = {}
        self.channel_of: Callable[[T], str | None] = lambda _request: None

    def append(self, item: T) -> None:
        channel = self.channel_of(item)
        if channel is not None:
            self.posted_at[channel] = time.monotonic()
        super().append(item)


class Platform:
    """One platform's fake and the ``chatbot run`` serving it."""

    name = ""

    def __init__(self, requests: StampedList[Any]) -> None:
        self.bot: BotProcess | None = None
        self.requests = requests  # the fake's log of the bot's requests
        requests.channel_of = self.posts_in

    async def start(self, *, folder: Path, model: Path, env: dict[str, str]) -> BotProcess:
        """Start the fake, then the bot, and wait until it serves."""
        log = folder / f"bot-{self.name}.log"
        process = await BotProcess.spawn(
            tmp_path=folder,
            database_url=database_url(folder),
            model=model,
            log=log,
            env={**await self.open(), **env},
        )
        self.bot = BotProcess(process, log=log)
        deadline = time.monotonic() + 300.0
        while not await self.serving():
            if process.returncode is not None:
                raise RuntimeError(f"the bot exited early:\n{self.bot.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bot never came up:\n{self.bot.output()[-4000:]}")
            await asyncio.sleep(0.1)
        return self.bot

    def last_post_at(self, channel: str) -> float | None:
        """When the bot last posted or edited a message in ``channel`` (monotonic)."""
        return self.requests.posted_at.get(channel)

    async def open(self) -> dict[str, str]:
        """Start the fake; the bot's settings for it."""
        raise NotImplementedError

    async def serving(self) -> bool:
        raise NotImplementedError

    async def mention(self, index: int, question: str) -> str:
        """Mention the bot as user ``index`` in channel ``index``; returns the channel."""
        raise NotImplementedError

    def posts_in(self, request: Any) -> str | None:
        """The channel of a request that posts or edits a message of the bot's."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def stop(self, *, keep_log: Path | None, as_name: str) -> None:
        """Stop the bot (SIGTERM), keep its log if asked, stop the fake."""
        try:
            if self.bot is not None and self.bot.process.returncode is None:
                self.bot.kill(signal.SIGTERM)
                await self.bot.wait_exit(within=60)
        finally:
            await self.close()
            if self.bot is not None and keep_log is not None:
                keep_log.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, at the end)
                shutil.copy(self.bot.log, keep_log / f"{as_name}.log")


class Slack(Platform):
    """Slack in HTTP mode: signed Events API ``app_mention`` requests, posted to the bot."""

    name = "slack"

    def __init__(self) -> None:
        super().__init__(StampedList[ApiCall]())
        self.api = FakeSlackWebApi(calls=self.requests)
        self.session: aiohttp.ClientSession | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]

    async def open(self) -> dict[str, str]:
        await self.api.start()
        self.session = aiohttp.ClientSession()
        return {
            "SLACK_BOT_TOKEN": "xoxb-benchmark",
            "SLACK_SIGNING_SECRET": SECRET,
            "SLACK_API_URL": self.api.url,
            "SLACK_PORT": str(self.port),
        }

    async def serving(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async def mention(self, index: int, question: str) -> str:
        assert self.session is not None
        channel = f"C{index:05d}"
        event = {
            "type": "app_mention",
            "channel": channel,
            "user": f"U{index:05d}",
            "text": f"<@{BOT_USER_ID}> {question}",
            "ts": f"{1_700_000_000 + index}.000100",
        }
        body = json.dumps(event_callback(event))
        async with self.session.post(
            f"http://127.0.0.1:{self.port}/slack/events",
            data=body,
            headers=signed_headers(body, secret=SECRET),
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"the bot answered {response.status}: {await response.text()}")
        return channel

    def posts_in(self, request: ApiCall) -> str | None:
        if request.method in {"chat.postMessage", "chat.update"}:
            return str(request.params.get("channel"))
        return None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.api.release_all()
        await self.api.close()


class Discord(Platform):
    """Discord: guild-channel mentions dispatched on the fake gateway."""

    name = "discord"
    _posts = re.compile(r"/channels/(?P<channel>\d+)/messages(?:/\d+)?")

    def __init__(self, *, channels: int) -> None:
        super().__init__(StampedList[RecordedRequest]())
        self.server = FakeDiscord()
        self.server.requests = self.requests
        # The channels exist before the bot connects, so its GUILD_CREATE holds them all.
        self.channels = [
            self.server.add_channel(
                {"id": snowflake(), "type": 0, "name": f"bench-{n}", "position": n + 1}
            )["id"]
            for n in range(channels)
        ]
        self.users = [
            FakeDiscord.make_user(str(400_000_000_000_000_000 + n), f"asker{n}")
            for n in range(channels)
        ]

    async def open(self) -> dict[str, str]:
        await self.server.start()
        return {
            "DISCORD_BOT_TOKEN": "benchmark-token",
            "DISCORD_API_URL": self.server.api_url,
            "DISCORD_GATEWAY_URL": self.server.gateway_url,
        }

    async def serving(self) -> bool:
        return self.server.ready_sent > 0

    async def mention(self, index: int, question: str) -> str:
        bot_user = self.server.bot_user
        message = self.server.user_message(
            channel_id=self.channels[index],
            author=self.users[index],
            content=f"<@{bot_user['id']}> {question}",
            mentions=(bot_user,),
        )
        await self.server.dispatch("MESSAGE_CREATE", message)
        return str(self.channels[index])

    def posts_in(self, request: RecordedRequest) -> str | None:
        match = self._posts.fullmatch(request.path)
        return match["channel"] if match and request.method in {"POST", "PATCH"} else None

    async def close(self) -> None:
        self.server.release_all()
        await self.server.stop()


def database_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'chatbot.db'}"
