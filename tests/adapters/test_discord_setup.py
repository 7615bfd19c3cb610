"""Setting the Discord bot up: its invite link, and a Message Content intent left off.

The real discord.py client against the fake Discord (tests/fakes/discord_server.py), the real
pipeline and tiny model on SQLite; one test runs ``chatbot run`` as a process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import discord
import pytest

from adapters.discord_setup import invite_url
from bot.service import ReplyGenerator
from bot.storage import Database
from model.corpus import SEED_EXCHANGES
from tests.adapters.test_discord_adapter import (
    ALICE,
    running_bot,
    say,
    stored,
)
from tests.fakes.discord_server import (
    APPLICATION_ID,
    MESSAGE_CONTENT_INTENT,
    THREAD_ID,
    FakeDiscord,
    Json,
)

REPO = Path(__file__).resolve().parents[2]
RESET_QUESTION, RESET_ANSWER = SEED_EXCHANGES[0]
REFUND_QUESTION, _ = SEED_EXCHANGES[1]
#: What the bot does in a channel (see adapters/discord_setup.py), named as Discord names it.
NEEDED = {
    "view_channel",
    "send_messages",
    "send_messages_in_threads",
    "read_message_history",
    "attach_files",
}
NEEDED_VALUE = discord.Permissions(**dict.fromkeys(NEEDED, True)).value


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'chatbot.db'}")
    database.upgrade()
    yield database
    database.dispose()


def granted(url: str) -> tuple[str, list[str], int]:
    """The client id, scopes and permissions integer an invite URL asks for."""
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "discord.com", "/oauth2/authorize")
    query = parse_qs(parts.query)
    return query["client_id"][0], query["scope"][0].split(" "), int(query["permissions"][0])


def invite_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "oauth2/authorize" in r.getMessage()
    ]


async def answered(server: FakeDiscord, message: Json, text: str) -> None:
    """Wait until the bot's reply to ``message`` reads ``text`` (it streams by edits)."""
    await server.wait_for(
        lambda: [r["content"] for r in server.replies_to(message["id"])] == [text],
        what=f"the answer to {message['content'][:40]!r}",
    )


async def test_ready_logs_the_invite_url_once_with_the_scopes_and_permissions(
    discord_server: FakeDiscord,
    sqlite_database: Database,
    tiny_model: ReplyGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_bot(discord_server, sqlite_database, tiny_model):
        await discord_server.wait_for(lambda: invite_lines(caplog), what="the invite URL")
        await discord_server.drop_connection(code=4000)  # a reconnect says it no second time
        await discord_server.wait_for(lambda: discord_server.resumes, what="a resume")

    (line,) = invite_lines(caplog)
    url = line.split()[-1]
    assert url.startswith(f"https://discord.com/oauth2/authorize?client_id={APPLICATION_ID}&")
    assert "&scope=bot+applications.commands&" in url
    assert granted(url) == (APPLICATION_ID, ["bot", "applications.commands"], NEEDED_VALUE)
    assert url == invite_url(int(APPLICATION_ID))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"scope=bot+applications.commands&permissions={NEEDED_VALUE}`" in readme


async def test_without_the_message_content_intent_it_warns_and_serves_dms_and_mentions(
    discord_server: FakeDiscord,
    sqlite_database: Database,
    tiny_model: ReplyGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    discord_server.message_content_intent = False
    async with running_bot(discord_server, sqlite_database, tiny_model) as bot:
        warnings = [r.getMessage() for r in caplog.records if "Message Content" in r.getMessage()]
        assert len(warnings) == 1
        assert "Privileged Gateway Intents" in warnings[0]
        assert "discord.com/developers/applications" in warnings[0]
        identifies = [f["d"]["intents"] for f in discord_server.gateway_frames if f["op"] == 2]
        assert [bool(i & MESSAGE_CONTENT_INTENT) for i in identifies] == [True, False]

        dm = discord_server.dm_channel(ALICE)
        direct = await say(discord_server, RESET_QUESTION, channel_id=dm["id"])
        await answered(discord_server, direct, RESET_ANSWER)
        # A mention in a thread puts the bot in it; a follow-up there without a mention is
        # one Discord withholds the text of: nothing to answer, nothing stored.
        question = await say(
            discord_server, RESET_QUESTION, channel_id=THREAD_ID, mentions_bot=True
        )
        await answered(discord_server, question, RESET_ANSWER)
        follow_up = await say(discord_server, REFUND_QUESTION, channel_id=THREAD_ID)
        await bot.wait_until_idle()

    assert discord_server.replies_to(follow_up["id"]) == []
    assert [m.text for m in stored(sqlite_database) if m.role == "user"] == [
        RESET_QUESTION,
        RESET_QUESTION,
    ]


async def test_chatbot_run_prints_the_invite_url(
    discord_server: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    discord_server.bot_token = "run-token"
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "DATABASE_", "MODEL_"))
    }
    environment.update(
        PYTHONPATH=str(REPO),
        MODEL_PATH=str(tiny_model_dir),
        DISCORD_BOT_TOKEN="run-token",
        DISCORD_API_URL=discord_server.api_url,
        DISCORD_GATEWAY_URL=discord_server.gateway_url,
        DASHBOARD_PORT="-1",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        cwd=tmp_path,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not any("oauth2/authorize" in line for line in seen):
                line = (await process.stderr.readline()).decode()
                assert line, f"chatbot run ended first: {''.join(seen)}"
                seen.append(line)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 0, "".join(seen) + rest.decode()
    (line,) = [line for line in seen if "oauth2/authorize" in line]
    assert granted(line.split()[-1])[1:] == (["bot", "applications.commands"], NEEDED_VALUE)
