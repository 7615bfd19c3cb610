"""The Discord adapter end to end: the real discord.py client against a fake Discord.

The fake REST API and gateway run on loopback (tests/fakes/discord_server.py) and speak the real
protocol; replies come from the real tiny model through the real pipeline and database (SQLite
and PostgreSQL). Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from adapters.discord_adapter import DiscordAdapter
from adapters.discord_replies import MESSAGE_LIMIT
from bot.commands import ADMIN_ONLY, Command, CommandAction, Commands
from bot.config import Settings
from bot.contracts import GeneratedReply
from bot.conversation import IncomingMessage, Role
from bot.learning import Exporter, ExportOptions, LearningActions, Pseudonymizer
from bot.replies import split_reply
from bot.service import (
    APOLOGY,
    PartialDelivery,
    PipelineOptions,
    PipelineResult,
    ProgressSink,
    ReplyGenerator,
    ReplyPipeline,
    ReplySender,
    StreamingReplyGenerator,
)
from bot.storage import (
    AnsweredBy,
    AnswerState,
    ConversationRecord,
    Database,
    DeliveryState,
    ExchangeRecord,
    MessageRecord,
    RatingRecord,
    Store,
    record_answer,
    record_incoming,
    set_delivery,
)
from model.corpus import SEED_EXCHANGES
from model.prompt import format_prompt
from tests.conftest import make_message
from tests.fakes.discord_server import (
    ADMIN_ROLE_ID,
    APP_OWNER_ID,
    BOT_ID,
    GENERAL_CHANNEL_ID,
    GUILD_ID,
    MANAGE_GUILD,
    MANAGER_ROLE_ID,
    OTHER_ADMIN_ROLE_ID,
    OTHER_CHANNEL_ID,
    THREAD_ID,
    FakeDiscord,
    Json,
    snowflake,
)
from tests.fakes.models import BrokenModel, RecordingModel

RESET_QUESTION, RESET_ANSWER = SEED_EXCHANGES[0]
REFUND_QUESTION, REFUND_ANSWER = SEED_EXCHANGES[1]
ADMIN_ID = "500000000000000001"
AGENT_ID = "700000000000000001"

ALICE = FakeDiscord.make_user("300000000000000001", "alice")
BOB = FakeDiscord.make_user("300000000000000002", "bob")
ADMIN = FakeDiscord.make_user(ADMIN_ID, "admin")
AGENT = FakeDiscord.make_user(AGENT_ID, "agent")
OTHER_BOT = FakeDiscord.make_user("800000000000000001", "otherbot", bot=True)
APP_OWNER = FakeDiscord.make_user(APP_OWNER_ID, "app owner")


# --------------------------------------------------------------------------- harness


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def model(tiny_model: ReplyGenerator) -> RecordingModel:
    return RecordingModel(tiny_model)


class SpiedPipeline(ReplyPipeline):
    """The real pipeline, keeping what the adapter's sender raised."""

    send_errors: list[Exception]

    async def handle(
        self,
        message: IncomingMessage,
        *,
        send: ReplySender,
        progress: ProgressSink | None = None,
    ) -> PipelineResult:
        async def spied_send(*, text: str, in_reply_to: IncomingMessage) -> str | None:
            try:
                return await send(text=text, in_reply_to=in_reply_to)
            except Exception as error:
                self.send_errors.append(error)
                raise

        return await super().handle(message, send=spied_send, progress=progress)


async def start_bot(
    discord: FakeDiscord,
    database: Database,
    generator: ReplyGenerator,
    *,
    progress_interval: float = 0.05,
    actions: Mapping[Command, CommandAction] | None = None,
    **settings: Any,
) -> tuple[DiscordAdapter, asyncio.Task[int]]:
    """The adapter connected to the fake Discord and ready, with the task running it."""
    pipeline = SpiedPipeline(
        store=Store(database),
        generator=generator,
        options=PipelineOptions(
            max_new_tokens=64,
            progress_interval=progress_interval,
            history_turns=settings.get("history_turns", 20),
            # Typing goes up before generating unless a test asks for the delay.
            placeholder_delay=settings.get("placeholder_delay_seconds", 0.0),
        ),
    )
    pipeline.send_errors = []
    values: dict[str, Any] = {
        "discord_bot_token": "test-token",
        "discord_api_url": discord.api_url,
        "discord_gateway_url": discord.gateway_url,
        "discord_admin_ids": [ADMIN_ID],
        "discord_admin_role_ids": [ADMIN_ROLE_ID],
        "discord_agent_ids": [AGENT_ID],
        **settings,
    }
    adapter = DiscordAdapter(
        settings=Settings(_env_file=None, **values),  # type: ignore[call-arg]
        handler=pipeline,
        commands=Commands(
            store=pipeline.store, model_version=lambda: generator.version, actions=actions
        ),
        guild_ready_timeout=0.05,
    )
    run = asyncio.create_task(adapter.run())
    ready = asyncio.create_task(adapter.wait_until_ready())
    done, _ = await asyncio.wait({run, ready}, timeout=15, return_when="FIRST_COMPLETED")
    if ready not in done:
        ready.cancel()
        await adapter.close()
        raise AssertionError("the client did not become ready")
    return adapter, run


@contextlib.asynccontextmanager
async def running_bot(
    discord: FakeDiscord, database: Database, generator: ReplyGenerator, **options: Any
) -> AsyncIterator[DiscordAdapter]:
    """The adapter connected to the fake Discord; closed (and checked) on the way out."""
    adapter, run = await start_bot(discord, database, generator, **options)
    try:
        yield adapter
    finally:
        await adapter.close()
        assert await asyncio.wait_for(run, 15) == 0


def send_errors(adapter: DiscordAdapter) -> list[Exception]:
    """What the adapter's reply sender raised to the pipeline."""
    handler = adapter.router.handler
    assert isinstance(handler, SpiedPipeline)
    return handler.send_errors


def learning_actions(database: Database, directory: Path) -> dict[Command, CommandAction]:
    """The real export, forget-me, correct and training actions."""
    learning = LearningActions(
        store=Store(database),
        exporter=Exporter(
            database=database,
            options=ExportOptions(directory=directory),
            formatter=format_prompt,
            pseudonymize=Pseudonymizer(b"k"),
        ),
        pseudonymize=Pseudonymizer(b"k"),
    )
    return learning.actions()


def mention(text: str) -> str:
    return f"<@{BOT_ID}> {text}"


async def say(
    discord: FakeDiscord,
    text: str,
    *,
    author: Json = ALICE,
    channel_id: str = GENERAL_CHANNEL_ID,
    mentions_bot: bool = False,
    **options: Any,
) -> Json:
    """Post a user message through the gateway; returns its payload."""
    options.setdefault("mentions", (discord.bot_user,) if mentions_bot else ())
    message = discord.user_message(
        channel_id=channel_id,
        author=author,
        content=mention(text) if mentions_bot else text,
        **options,
    )
    await discord.dispatch("MESSAGE_CREATE", message)
    return message


async def reply_to(discord: FakeDiscord, message: Json, *, count: int = 1) -> list[Json]:
    """Wait for the bot's replies to ``message``."""
    return await discord.wait_for(
        lambda: (r := discord.replies_to(message["id"])) and len(r) >= count and r,
        what=f"a reply to {message['content'][:40]!r}",
    )


async def direct_messages(discord: FakeDiscord, user: Json, *, count: int = 1) -> list[str]:
    """Wait for ``count`` bot messages in the DM channel with ``user``; their texts."""
    channel = discord.dm_channel(user)["id"]
    found = await discord.wait_for(
        lambda: (m := discord.bot_messages(channel)) and len(m) >= count and m,
        what=f"{count} direct message(s) to {user['username']}",
    )
    return [message["content"] for message in found]


async def reply_id_stored(discord: FakeDiscord, database: Database, reply: Json) -> None:
    """Wait until the bot has stored the Discord id of ``reply`` (just after Discord has it;
    a person is never faster)."""
    await discord.wait_for(
        lambda: any(m.platform_message_id == reply["id"] for m in stored(database)),
        what="the reply's id stored",
    )


def stored(database: Database) -> list[MessageRecord]:
    with database.session() as session:
        return list(session.exec(select(MessageRecord).order_by(col(MessageRecord.id))).all())


def exchanges(database: Database) -> list[ExchangeRecord]:
    with database.session() as session:
        return list(session.exec(select(ExchangeRecord).order_by(col(ExchangeRecord.id))).all())


def ratings(database: Database) -> list[tuple[str, int]]:
    with database.session() as session:
        return [(r.rater_id, r.value) for r in session.exec(select(RatingRecord)).all()]


# --------------------------------------------------------------------------- conversations


async def test_answers_a_direct_message(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model):
        dm = discord.dm_channel(ALICE)
        question = await say(discord, RESET_QUESTION, channel_id=dm["id"])
        (reply,) = await reply_to(discord, question)

    assert reply["content"] == RESET_ANSWER
    assert discord.requests_to("POST", f"/channels/{dm['id']}/typing"), "no typing indicator"
    user, answer = stored(database)
    assert (user.role, user.text, user.is_direct, user.answer_state) == (
        Role.USER,
        RESET_QUESTION,
        True,
        AnswerState.ANSWERED,
    )
    assert (answer.role, answer.text, answer.delivery_state) == (
        Role.ASSISTANT,
        RESET_ANSWER,
        DeliveryState.SENT,
    )
    assert answer.platform_message_id == reply["id"]


async def test_a_quick_reply_is_posted_without_typing_first(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    # Ready before the placeholder delay: the reply itself, no typing trigger before it.
    async with running_bot(discord, database, model, placeholder_delay_seconds=30.0):
        dm = discord.dm_channel(ALICE)
        question = await say(discord, RESET_QUESTION, channel_id=dm["id"])
        (reply,) = await reply_to(discord, question)

    assert reply["content"] == RESET_ANSWER
    assert not discord.requests_to("POST", f"/channels/{dm['id']}/typing")
    assert not discord.requests_to("PATCH", f"/channels/{dm['id']}/messages/{reply['id']}")


async def test_answers_a_mention_in_a_guild_channel_and_nothing_else(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        chatter = await say(discord, "anyone around for lunch?", author=BOB)
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)
        await bot.wait_until_idle()

    assert reply["content"] == RESET_ANSWER
    assert reply["message_reference"]["message_id"] == question["id"]
    assert discord.replies_to(chatter["id"]) == []
    assert len(discord.bot_messages(GENERAL_CHANNEL_ID)) == 1
    user, _answer = stored(database)
    assert user.text == RESET_QUESTION, "the bot's mention is not part of the text"
    assert model.prompts == [[{"role": "user", "content": RESET_QUESTION}]]


async def test_a_reply_chain_of_four_messages_is_the_models_history(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    # The chain starts before the bot connected: the client has never seen those two.
    first = discord.user_message(
        channel_id=GENERAL_CHANNEL_ID, author=ALICE, content="My account is locked."
    )
    second = discord.user_message(
        channel_id=GENERAL_CHANNEL_ID,
        author=BOB,
        content="Did you try logging in again?",
        reply_to=first["id"],
    )
    async with running_bot(discord, database, model):
        third = await say(discord, "Yes, it still fails.", author=ALICE, reply_to=second["id"])
        fourth = await say(
            discord, RESET_QUESTION, author=BOB, reply_to=third["id"], mentions_bot=True
        )
        (reply,) = await reply_to(discord, fourth)

    # Discord resolves one level; the older messages were fetched over REST.
    fetches = discord.requests_to("GET", r"/channels/\d+/messages/\d+")
    assert {r.path.rsplit("/", 1)[1] for r in fetches} == {first["id"], second["id"]}
    texts = [first["content"], second["content"], third["content"], RESET_QUESTION]
    assert model.prompts[-1] == [{"role": "user", "content": "\n".join(texts)}]
    assert reply["content"]
    # All four belong to one conversation, keyed by the chain's root.
    rows = stored(database)
    assert [r.platform_message_id for r in rows[:4]] == [
        first["id"],
        second["id"],
        third["id"],
        fourth["id"],
    ]
    assert len({r.conversation_id for r in rows}) == 1
    assert [r.answer_state for r in rows[:3]] == [AnswerState.IGNORED] * 3


async def test_a_reply_to_the_bot_continues_its_conversation(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (answer,) = await reply_to(discord, question)
        follow_up = await say(discord, REFUND_QUESTION, reply_to=answer["id"])
        await reply_to(discord, follow_up)

    assert model.prompts[-1] == [
        {"role": "user", "content": RESET_QUESTION},
        {"role": "assistant", "content": RESET_ANSWER},
        {"role": "user", "content": REFUND_QUESTION},
    ]


async def test_a_broken_reply_chain_leaves_a_partial_history(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_bot(discord, database, model):
        middle = await say(discord, "Still locked out.", author=ALICE, reply_to=snowflake())
        question = await say(
            discord, RESET_QUESTION, author=BOB, reply_to=middle["id"], mentions_bot=True
        )
        await reply_to(discord, question)

    assert model.prompts[-1] == [
        {"role": "user", "content": "Still locked out.\n" + RESET_QUESTION}
    ]
    assert "reply chain of Discord message" in caplog.text


async def test_thread_conversations(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        before = await say(discord, "I need help with my login.", channel_id=THREAD_ID)
        question = await say(discord, RESET_QUESTION, channel_id=THREAD_ID, mentions_bot=True)
        await reply_to(discord, question)
        # Once the bot is in the thread, it answers without being mentioned.
        follow_up = await say(discord, REFUND_QUESTION, channel_id=THREAD_ID, author=BOB)
        await reply_to(discord, follow_up)

        # A thread the bot started: answered without a mention.
        own_thread = discord.add_channel(
            discord.thread_payload(snowflake(), owner_id=BOT_ID, name="bot thread")
        )
        await discord.dispatch("THREAD_CREATE", {**own_thread, "newly_created": True})
        in_own = await say(discord, RESET_QUESTION, channel_id=own_thread["id"])
        await reply_to(discord, in_own)

        # Someone else's thread the bot never joined: ignored.
        other = discord.add_channel(
            discord.thread_payload(snowflake(), owner_id=BOB["id"], name="chat")
        )
        await discord.dispatch("THREAD_CREATE", {**other, "newly_created": True})
        ignored = await say(discord, RESET_QUESTION, channel_id=other["id"])
        last = await say(discord, RESET_QUESTION, channel_id=own_thread["id"])
        await reply_to(discord, last)
        await bot.wait_until_idle()

    assert discord.replies_to(ignored["id"]) == []
    # The thread's earlier message was fetched and is part of the first prompt.
    assert model.prompts[0] == [
        {"role": "user", "content": f"{before['content']}\n{RESET_QUESTION}"}
    ]
    thread_rows = [r for r in stored(database) if r.channel == THREAD_ID]
    assert len({r.conversation_id for r in thread_rows}) == 1
    assert [r.role for r in thread_rows] == [
        Role.USER,
        Role.USER,
        Role.ASSISTANT,
        Role.USER,
        Role.ASSISTANT,
    ]


async def test_own_and_other_bots_messages_are_ignored(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        from_bot = await say(discord, RESET_QUESTION, author=OTHER_BOT, mentions_bot=True)
        dm = discord.dm_channel(OTHER_BOT)
        dm_from_bot = await say(discord, RESET_QUESTION, author=OTHER_BOT, channel_id=dm["id"])
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        await reply_to(discord, question)
        await bot.wait_until_idle()

    assert discord.replies_to(from_bot["id"]) == discord.replies_to(dm_from_bot["id"]) == []
    # The fake gateway echoes the bot's own reply back; it must not be answered or stored twice.
    assert len(discord.bot_messages(GENERAL_CHANNEL_ID)) == 1
    assert [r.role for r in stored(database)] == [Role.USER, Role.ASSISTANT]


async def test_a_reconnect_mid_conversation_gives_exactly_one_reply_each(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_bot(discord, database, model):
        first = await say(discord, RESET_QUESTION, mentions_bot=True)
        await reply_to(discord, first)

        # The replay after RESUME repeats everything, the first message included, as if the
        # bot's last sequence number had been lost; the second is sent while the bot is away.
        discord.replay_from(0)
        await discord.drop_connection(code=4000)
        second = await say(discord, REFUND_QUESTION, mentions_bot=True)
        await reply_to(discord, second)
        third = await say(discord, RESET_QUESTION, author=BOB, mentions_bot=True)
        await reply_to(discord, third)

    assert discord.resumes == 1 and discord.identifies == 1
    assert f"duplicate delivery of discord message {first['id']} ignored" in caplog.text
    for message in (first, second, third):
        assert len(discord.replies_to(message["id"])) == 1
    assert len(exchanges(database)) == 3


async def test_a_rate_limited_reply_is_retried_and_arrives_once(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    discord.rate_limit("POST", f"/channels/{GENERAL_CHANNEL_ID}/messages", times=1)
    async with running_bot(discord, database, model):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)

    assert len(discord.bot_posts(GENERAL_CHANNEL_ID)) == 2, "one 429, then the retry"
    assert len(discord.bot_messages(GENERAL_CHANNEL_ID)) == 1
    answer = stored(database)[-1]
    assert (answer.delivery_state, answer.platform_message_id) == (DeliveryState.SENT, reply["id"])


async def test_the_reply_streams_by_editing_it(
    discord: FakeDiscord, database: Database, tiny_model: ReplyGenerator
) -> None:
    assert isinstance(tiny_model, StreamingReplyGenerator)  # the model service streams
    async with running_bot(discord, database, tiny_model, progress_interval=0.0):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        await discord.wait_for(
            lambda: [r for r in discord.replies_to(question["id"]) if r["content"] == RESET_ANSWER],
            what="the finished reply",
        )

    (post,) = discord.bot_posts(GENERAL_CHANNEL_ID)
    edits = discord.requests_to("PATCH", rf"/channels/{GENERAL_CHANNEL_ID}/messages/\d+")
    assert edits, "the reply was not streamed"
    shown = [post.body["content"]] + [edit.body["content"] for edit in edits]
    assert shown[-1] == RESET_ANSWER
    for partial in shown[:-1]:
        # Marked unfinished, as on Slack: a partial reply never looks like the whole one
        # (the final edit is always its own request, even when the stream had it all).
        assert partial.endswith(" …"), partial
        assert RESET_ANSWER.startswith(partial.removesuffix(" …"))
    answer = stored(database)[-1]
    assert (answer.text, answer.platform_message_id) == (
        RESET_ANSWER,
        discord.replies_to(question["id"])[0]["id"],
    )


async def test_a_model_failure_gets_an_apology(discord: FakeDiscord, database: Database) -> None:
    async with running_bot(discord, database, BrokenModel()):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)

    assert reply["content"] == APOLOGY
    assert stored(database)[0].answer_state == AnswerState.UNANSWERED


# --------------------------------------------------------------------------- events


async def test_edits_and_deletions_update_the_history(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        question = await say(discord, "How do I reset my pasword?", mentions_bot=True)
        (answer_message,) = await reply_to(discord, question)
        edited = {**question, "content": mention(RESET_QUESTION), "edited_timestamp": "2026-01-01"}
        await discord.dispatch("MESSAGE_UPDATE", edited)
        await discord.wait_for(
            lambda: stored(database)[0].text == RESET_QUESTION, what="the edit to be stored"
        )

        await discord.dispatch(
            "MESSAGE_DELETE",
            {"id": question["id"], "channel_id": GENERAL_CHANNEL_ID, "guild_id": GUILD_ID},
        )
        await discord.wait_for(
            lambda: stored(database)[0].deleted_at is not None, what="the deletion"
        )
        await bot.wait_until_idle()

    user, answer = stored(database)
    assert user.text == "" and user.deleted_at is not None
    assert answer.text == answer_message["content"] and answer.deleted_at is None


async def test_thumbs_reactions_on_a_reply_are_ratings(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    def reaction(message: Json, user: Json, emoji: str) -> Json:
        return {
            "user_id": user["id"],
            "channel_id": GENERAL_CHANNEL_ID,
            "message_id": message["id"],
            "guild_id": GUILD_ID,
            "emoji": {"id": None, "name": emoji},
            "message_author_id": message["author"]["id"],
            "burst": False,
            "type": 0,
        }

    async with running_bot(discord, database, model) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)

        await discord.dispatch("MESSAGE_REACTION_ADD", reaction(reply, ALICE, "👍🏽"))
        await discord.dispatch("MESSAGE_REACTION_ADD", reaction(reply, BOB, "👎"))
        await discord.dispatch("MESSAGE_REACTION_ADD", reaction(reply, ADMIN, "🎉"))
        await discord.dispatch("MESSAGE_REACTION_ADD", reaction(question, BOB, "👍"))
        await discord.wait_for(lambda: len(ratings(database)) == 2, what="two ratings")
        await bot.wait_until_idle()
        assert sorted(ratings(database)) == sorted([(ALICE["id"], 1), (BOB["id"], -1)])

        await discord.dispatch("MESSAGE_REACTION_REMOVE", reaction(reply, ALICE, "👍🏽"))
        await discord.wait_for(lambda: len(ratings(database)) == 1, what="the removal")

    assert ratings(database) == [(BOB["id"], -1)]


async def test_a_human_agent_reply_is_stored_as_the_answer(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)
        follow_up = await say(discord, "That link does not work for me.", reply_to=reply["id"])
        await reply_to(discord, follow_up)
        agent = await say(
            discord,
            "I have reset it for you, check your mail.",
            author=AGENT,
            reply_to=follow_up["id"],
        )
        await discord.wait_for(lambda: len(exchanges(database)) == 3, what="the agent answer")
        await bot.wait_until_idle()

    assert discord.replies_to(agent["id"]) == []
    last = exchanges(database)[-1]
    assert last.answered_by == AnsweredBy.HUMAN_AGENT
    answer = stored(database)[-1]
    assert (answer.role, answer.platform_message_id) == (Role.HUMAN_AGENT, agent["id"])


# --------------------------------------------------------------------------- commands


def interaction_text(discord: FakeDiscord, token: str) -> str:
    edits = discord.requests_to("PATCH", rf"/webhooks/\d+/{token}/messages/@original")
    return edits[-1].body["content"] if edits else ""


async def run_slash(
    discord: FakeDiscord, user: Json, group: str, subcommand: str, **options: Any
) -> str:
    interaction = discord.interaction(user=user, group=group, subcommand=subcommand, **options)
    await discord.dispatch("INTERACTION_CREATE", interaction)
    token = interaction["token"]
    return await discord.wait_for(
        lambda: interaction_text(discord, token), what=f"/{group} {subcommand}"
    )


async def test_slash_commands_check_admins_twice(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_bot(discord, database, model):
        refused = await run_slash(discord, ALICE, "chatbot-admin", "status")
        # Manage Server covers this server's channels, not the model every server shares.
        by_permission = await run_slash(
            discord, BOB, "chatbot-admin", "status", permissions=MANAGE_GUILD
        )
        channel_local = await run_slash(
            discord, BOB, "chatbot-admin", "training", permissions=MANAGE_GUILD, arguments="off"
        )
        by_role = await run_slash(discord, BOB, "chatbot-admin", "status", roles=(ADMIN_ROLE_ID,))
        by_id = await run_slash(discord, ADMIN, "chatbot-admin", "retrain")
        help_text = await run_slash(discord, ALICE, "chatbot", "help")
        with_arguments = await run_slash(
            discord, ADMIN, "chatbot-admin", "status", arguments="  please  "
        )

    assert refused == "Sorry, only admins can use `status`."
    assert "refused admin command status" in caplog.text
    assert by_permission == "Sorry, only admins can use `status`."
    assert channel_local == "`training` is not available yet.", "allowed, but no action set"
    assert by_role.startswith(f"Model: {model.version}")
    assert by_id == "`retrain` is not available yet."
    assert "`forget-me`" in help_text
    assert with_arguments.startswith("Model: ")
    # Deferred privately first, so slow commands do not time out.
    callbacks = discord.requests_to("POST", r"/interactions/\d+/[^/]+/callback")
    assert all(c.body["type"] == 5 and c.body["data"]["flags"] == 64 for c in callbacks)
    # Discord hides the admin group from members without Manage Server.
    (sync,) = discord.requests_to("PUT", r"/applications/\d+/commands")
    groups = {command["name"]: command for command in sync.body}
    assert str(groups["chatbot-admin"]["default_member_permissions"]) == str(MANAGE_GUILD)
    assert groups["chatbot"]["default_member_permissions"] is None
    admin_commands = {o["name"] for o in groups["chatbot-admin"]["options"]}
    assert {"retrain", "export", "status", "rollback"} <= admin_commands
    assert admin_commands == {command.value for command in ADMIN_ONLY}
    assert {o["name"] for o in groups["chatbot"]["options"]} == {"help", "forget-me"}
    assert stored(database) == [], "commands are not conversation turns"


async def test_bang_commands_check_admins(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_bot(discord, database, model):
        refused = await say(discord, "!status", author=ALICE, mentions_bot=True)
        allowed = await say(
            discord, "!status", author=ADMIN, channel_id=discord.dm_channel(ADMIN)["id"]
        )
        by_role = await say(
            discord, "!export", author=BOB, mentions_bot=True, roles=(ADMIN_ROLE_ID,)
        )
        help_asked = await say(
            discord, "!help", author=ALICE, channel_id=discord.dm_channel(ALICE)["id"]
        )
        # Answers to commands in a server go to the asker alone, as a DM; in a DM, right there.
        alice_dm = await direct_messages(discord, ALICE, count=2)
        (status,) = await reply_to(discord, allowed)
        (export,) = await direct_messages(discord, BOB)

    assert "Sorry, only admins can use `status`." in alice_dm
    assert "refused admin command status" in caplog.text
    assert status["content"].startswith(f"Model: {model.version}")
    assert export == "`export` is not available yet."
    assert [text for text in alice_dm if "`forget-me`" in text]
    assert discord.replies_to(help_asked["id"]), "in a DM the answer replies to the command"
    assert discord.bot_messages(GENERAL_CHANNEL_ID) == [], "nothing answered in the channel"
    assert discord.replies_to(refused["id"]) == discord.replies_to(by_role["id"]) == []
    assert stored(database) == [] and model.prompts == []


THANKS = "Thanks, I stored your correction; it will be used for training."


async def test_bang_correct_in_reply_to_a_bot_message_stores_a_correction(
    discord: FakeDiscord, database: Database, model: RecordingModel, tmp_path: Path
) -> None:
    better = "Use the 'Forgot password?' link, then check your inbox."
    actions = learning_actions(database, tmp_path)
    async with running_bot(discord, database, model, actions=actions):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (answer,) = await reply_to(discord, question)
        await reply_id_stored(discord, database, answer)
        await say(
            discord, f"!correct {better}", author=ADMIN, reply_to=answer["id"], mentions_bot=True
        )
        (acknowledgement,) = await direct_messages(discord, ADMIN)

    assert acknowledgement == THANKS
    [asked] = [m for m in stored(database) if m.text == RESET_QUESTION]
    [correction] = [e for e in exchanges(database) if e.answered_by == "correction"]
    assert correction.user_message_id == asked.id
    assert [m.text for m in stored(database) if m.id == correction.answer_message_id] == [better]


async def test_bang_correct_in_a_thread_corrects_the_last_answer_there(
    discord: FakeDiscord, database: Database, model: RecordingModel, tmp_path: Path
) -> None:
    better = "Click 'Forgot password?' on the login page."
    async with running_bot(discord, database, model, actions=learning_actions(database, tmp_path)):
        question = await say(discord, RESET_QUESTION, channel_id=THREAD_ID, mentions_bot=True)
        await reply_to(discord, question)
        # No reply to a message and no mention: the bot is part of the thread already.
        await say(discord, f"!correct {better}", author=ADMIN, channel_id=THREAD_ID)
        (acknowledgement,) = await direct_messages(discord, ADMIN)

    assert acknowledgement == THANKS
    [asked] = [m for m in stored(database) if m.text == RESET_QUESTION]
    [correction] = [e for e in exchanges(database) if e.answered_by == "correction"]
    assert correction.user_message_id == asked.id
    assert discord.bot_messages(THREAD_ID)[-1]["content"] != THANKS, "answered privately"


async def test_a_moderator_runs_channel_commands_but_not_model_commands(
    discord: FakeDiscord, database: Database, model: RecordingModel, tmp_path: Path
) -> None:
    moderator: dict[str, Any] = {"author": BOB, "roles": (MANAGER_ROLE_ID,), "mentions_bot": True}
    async with running_bot(discord, database, model, actions=learning_actions(database, tmp_path)):
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (answer,) = await reply_to(discord, question)
        await reply_id_stored(discord, database, answer)
        await say(discord, "!training off", **moderator)
        await direct_messages(discord, BOB)
        await say(discord, "!correct Wrong answer.", reply_to=answer["id"], **moderator)
        await direct_messages(discord, BOB, count=2)
        await say(discord, "!export", **moderator)
        await direct_messages(discord, BOB, count=3)
        await say(discord, "!status", **moderator)
        texts = await direct_messages(discord, BOB, count=4)

    assert texts[0].startswith("Training is now off in this channel")
    assert texts[1:] == [
        "Sorry, only admins can use `correct`.",
        "Sorry, only admins can use `export`.",
        "Sorry, only admins can use `status`.",
    ]
    assert [e.answered_by for e in exchanges(database)] == [AnsweredBy.BOT]


async def test_the_application_owner_is_the_admin_when_none_is_configured(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    unconfigured: dict[str, Any] = {"discord_admin_ids": [], "discord_admin_role_ids": []}
    async with running_bot(discord, database, model, **unconfigured):
        await say(discord, "!status", author=APP_OWNER, mentions_bot=True)
        (owner_status,) = await direct_messages(discord, APP_OWNER)
        # Manage Server makes no one an admin.
        await say(discord, "!status", author=BOB, roles=(MANAGER_ROLE_ID,), mentions_bot=True)
        (moderator_status,) = await direct_messages(discord, BOB)

    # An application owned by a team: its members are the admins.
    discord.team_members = [ALICE]
    async with running_bot(discord, database, model, **unconfigured):
        await say(discord, "!status", author=ALICE, mentions_bot=True)
        (member_status,) = await direct_messages(discord, ALICE)
        await say(discord, "!status", author=APP_OWNER, mentions_bot=True)
        owner_texts = await direct_messages(discord, APP_OWNER, count=2)

    assert owner_status.startswith(f"Model: {model.version}")
    assert moderator_status == "Sorry, only admins can use `status`."
    assert member_status.startswith(f"Model: {model.version}")
    assert owner_texts[1] == "Sorry, only admins can use `status`."
    assert len(discord.requests_to("GET", "/oauth2/applications/@me")) == 2, "the one at each login"


async def test_an_admin_role_counts_only_in_its_own_guild(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(
        discord,
        database,
        model,
        discord_admin_ids=[],
        discord_admin_role_ids=[OTHER_ADMIN_ROLE_ID],
    ):
        # Bob holds the admin role of the other guild; in this one it is no role at all.
        await say(discord, "!status", author=BOB, roles=(OTHER_ADMIN_ROLE_ID,), mentions_bot=True)
        (here,) = await direct_messages(discord, BOB)
        await say(
            discord,
            "!status",
            author=BOB,
            roles=(OTHER_ADMIN_ROLE_ID,),
            channel_id=OTHER_CHANNEL_ID,
            mentions_bot=True,
        )
        (_, there) = await direct_messages(discord, BOB, count=2)
        # The application's owner is no admin once admins are configured.
        await say(discord, "!status", author=APP_OWNER, mentions_bot=True)
        (owner,) = await direct_messages(discord, APP_OWNER)

    assert here == owner == "Sorry, only admins can use `status`."
    assert there.startswith(f"Model: {model.version}")


async def test_a_command_runs_once_however_often_it_is_delivered(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[str] = []

    async def export(request: Any) -> str:
        runs.append(request.user_id)
        return f"export {len(runs)}"

    interaction = discord.interaction(user=ADMIN, group="chatbot-admin", subcommand="export")
    async with running_bot(discord, database, model, actions={Command.EXPORT: export}):
        command = await say(discord, "!export", author=ADMIN, mentions_bot=True)
        await direct_messages(discord, ADMIN)
        await discord.dispatch("INTERACTION_CREATE", interaction)
        await discord.wait_for(lambda: interaction_text(discord, interaction["token"]))

        # The RESUME replays both, as if the bot's last sequence number had been lost.
        discord.replay_from(0)
        await discord.drop_connection(code=4000)
        await discord.wait_for(lambda: discord.resumes == 1 and discord.connected)
        await discord.wait_for(
            lambda: caplog.text.count("already handled") >= 2, what="the replay handled"
        )

    # A new client on the same database gets them again.
    async with running_bot(discord, database, model, actions={Command.EXPORT: export}):
        await discord.dispatch("MESSAGE_CREATE", command)
        await discord.dispatch("INTERACTION_CREATE", interaction)
        await discord.wait_for(
            lambda: caplog.text.count("already handled") >= 4, what="the redelivery handled"
        )

    assert runs == [ADMIN_ID, ADMIN_ID], "once as !export, once as /chatbot-admin export"
    assert await direct_messages(discord, ADMIN) == ["export 1"]
    assert interaction_text(discord, interaction["token"]) == "export 2"
    assert stored(database) == []


async def test_an_agents_command_is_a_command_and_no_answer(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        (reply,) = await reply_to(discord, question)
        follow_up = await say(discord, "That link does not work for me.", reply_to=reply["id"])
        await reply_to(discord, follow_up)
        await say(discord, "!help", author=AGENT, reply_to=follow_up["id"])
        (help_text,) = await direct_messages(discord, AGENT)
        await bot.wait_until_idle()

    assert "`forget-me`" in help_text
    assert [e.answered_by for e in exchanges(database)] == [AnsweredBy.BOT, AnsweredBy.BOT]
    assert Role.HUMAN_AGENT not in {m.role for m in stored(database)}


# --------------------------------------------------------------------------- conversations (2)


async def test_a_reply_chain_longer_than_the_history_stays_one_conversation(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    # A chain of three begun before the bot connected; the bot loads at most two of them.
    first = discord.user_message(channel_id=GENERAL_CHANNEL_ID, author=ALICE, content="Hi all.")
    second = discord.user_message(
        channel_id=GENERAL_CHANNEL_ID, author=BOB, content="Hello.", reply_to=first["id"]
    )
    third = discord.user_message(
        channel_id=GENERAL_CHANNEL_ID,
        author=ALICE,
        content="I am locked out.",
        reply_to=second["id"],
    )
    async with running_bot(discord, database, model, history_turns=2):
        latest = await say(
            discord, RESET_QUESTION, author=BOB, reply_to=third["id"], mentions_bot=True
        )
        for turn in range(3):
            (answer,) = await reply_to(discord, latest)
            await reply_id_stored(discord, database, answer)
            latest = await say(discord, f"{REFUND_QUESTION} ({turn})", reply_to=answer["id"])
        await reply_to(discord, latest)
        # A reply to a person's message of the conversation belongs to it too.
        latest = await say(discord, RESET_QUESTION, author=BOB, reply_to=latest["id"])
        await reply_to(discord, latest)

    rows = stored(database)
    assert first["id"] not in {r.platform_message_id for r in rows}, "beyond the history limit"
    assert len(rows) == 2 + 5 * 2
    assert len({r.conversation_id for r in rows}) == 1
    fetches = discord.requests_to("GET", r"/channels/\d+/messages/\d+")
    assert {r.path.rsplit("/", 1)[1] for r in fetches} == {second["id"]}


async def test_a_thread_under_a_channel_with_training_off_gives_no_training_data(
    discord: FakeDiscord, database: Database, model: RecordingModel, tmp_path: Path
) -> None:
    async with running_bot(discord, database, model, actions=learning_actions(database, tmp_path)):
        await say(discord, "!training off", author=ADMIN, mentions_bot=True)
        (done,) = await direct_messages(discord, ADMIN)
        question = await say(discord, RESET_QUESTION, channel_id=THREAD_ID, mentions_bot=True)
        await reply_to(discord, question)

    assert done.startswith("Training is now off")
    with database.session() as session:
        (conversation,) = session.exec(select(ConversationRecord)).all()
    assert (conversation.channel, conversation.parent_channel) == (THREAD_ID, GENERAL_CHANNEL_ID)
    assert [e.for_training for e in exchanges(database)] == [False]


async def test_other_peoples_mentions_are_stored_as_mentions_not_names(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model) as bot:
        question = await say(
            discord,
            f"can <@{BOB['id']}> reset my password?",
            mentions_bot=True,
            mentions=(discord.bot_user, BOB),
        )
        await reply_to(discord, question)
        edited = {
            **question,
            "content": mention(f"can <@!{ALICE['id']}> or <@{BOB['id']}> do it?"),
            "mentions": [discord.bot_user, ALICE, BOB],
        }
        await discord.dispatch("MESSAGE_UPDATE", edited)
        await discord.wait_for(lambda: "do it" in stored(database)[0].text, what="the edit")
        await bot.wait_until_idle()

    assert model.prompts[0] == [
        {"role": "user", "content": f"can <@{BOB['id']}> reset my password?"}
    ]
    assert stored(database)[0].text == f"can <@!{ALICE['id']}> or <@{BOB['id']}> do it?"


# --------------------------------------------------------------------------- partial delivery


class FixedReply:
    """A model that always gives the same (long) reply: what the tiny model cannot be made to
    produce on demand."""

    version = "fixed"

    def __init__(self, text: str) -> None:
        self.text = text

    async def generate(self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> str:
        return self.text


LONG_REPLY = " ".join(f"Step {n}: click the link on the login page." for n in range(120))


async def test_a_failed_edit_of_a_streamed_reply_is_not_posted_again(
    discord: FakeDiscord, database: Database, tiny_model: ReplyGenerator
) -> None:
    edits = rf"/channels/{GENERAL_CHANNEL_ID}/messages/\d+"
    discord.fail("PATCH", edits, times=10_000)
    async with running_bot(discord, database, tiny_model, progress_interval=0.0) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        await discord.wait_for(lambda: send_errors(bot), what="the failed send")
        await bot.wait_until_idle()
        (error,) = send_errors(bot)

    (post,) = discord.bot_posts(GENERAL_CHANNEL_ID)
    assert post.body["content"] != RESET_ANSWER, "the streamed start of the reply"
    assert discord.requests_to("PATCH", edits), "it was edited (and that failed)"
    (shown,) = discord.replies_to(question["id"])
    assert isinstance(error, PartialDelivery) and error.message_id == shown["id"]

    # Once Discord takes edits again (here: after a restart), the retry finishes that message.
    discord.stop_failing()
    async with running_bot(discord, database, tiny_model):
        await discord.wait_for(
            lambda: discord.replies_to(question["id"])[0]["content"] == RESET_ANSWER,
            what="the queued reply to replace the streamed start",
        )
    assert len(discord.bot_posts(GENERAL_CHANNEL_ID)) == 1, "never posted a second time"
    assert stored(database)[-1].platform_message_id == shown["id"]


async def test_a_failed_later_chunk_does_not_post_the_reply_again(
    discord: FakeDiscord, database: Database
) -> None:
    chunks = f"/channels/{GENERAL_CHANNEL_ID}/messages"
    discord.fail("POST", chunks, after=1)
    async with running_bot(discord, database, FixedReply(LONG_REPLY)) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        await discord.wait_for(lambda: send_errors(bot), what="the failed send")
        await bot.wait_until_idle()
        (error,) = send_errors(bot)

    assert len(discord.bot_posts(GENERAL_CHANNEL_ID)) == 2, "the first chunk, then the failure"
    (first,) = discord.replies_to(question["id"])
    assert isinstance(error, PartialDelivery) and error.message_id == first["id"]


#: Three paragraphs, each under Discord's limit and any two over it: a reply of three chunks.
THREE_PARTS = "\n\n".join(
    f"Part {part}. " + "Open the settings page and choose the security tab. " * 30
    for part in (1, 2, 3)
)


def starts_part(part: int) -> Callable[[Any], bool]:
    """Whether a request's JSON body posts chunk ``part`` of :data:`THREE_PARTS`."""
    return lambda body: str(body.get("content", "")).startswith(f"Part {part}.")


@pytest.mark.parametrize("failing_parts", [(3,), (2, 3)], ids=["third-chunk", "again-on-retry"])
async def test_a_reply_failing_part_way_shows_each_chunk_once_after_the_retry(
    discord: FakeDiscord, database: Database, failing_parts: tuple[int, ...]
) -> None:
    # (3,): the third chunk fails once and the retry posts it. (2, 3): the second fails, and
    # the retry, having posted it, fails on the third; the next retry posts only that.
    posts = f"/channels/{GENERAL_CHANNEL_ID}/messages"
    for part in failing_parts:
        discord.fail_when("POST", posts, starts_part(part))
    async with running_bot(
        discord, database, FixedReply(THREE_PARTS), delivery_retry_seconds=0.05
    ) as bot:
        question = await say(discord, RESET_QUESTION, mentions_bot=True)
        await discord.wait_for(lambda: send_errors(bot), what="the failed send")
        await discord.wait_for(
            lambda: stored(database)[-1].delivery_state == DeliveryState.SENT,
            what="the queued rest of the reply posted",
        )

    chunks = split_reply(THREE_PARTS, limit=MESSAGE_LIMIT)
    assert len(chunks) == 3
    shown = discord.bot_messages(GENERAL_CHANNEL_ID)
    assert [message["content"] for message in shown] == chunks  # each chunk once, in order
    assert all(m["message_reference"]["message_id"] == question["id"] for m in shown)
    attempts = len(chunks) + len(failing_parts)
    assert len(discord.bot_posts(GENERAL_CHANNEL_ID)) == attempts, "no chunk posted twice"
    assert stored(database)[-1].platform_message_id == shown[0]["id"]


async def test_a_queued_reply_replaces_its_placeholder(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    store = Store(database)
    question = make_message(
        RESET_QUESTION, platform="discord", channel=GENERAL_CHANNEL_ID, message_id=snowflake()
    )
    user = await store.run(record_incoming, message=question)
    assert user is not None and user.id is not None
    answer, _ = await store.run(
        record_answer,
        user_message_id=user.id,
        text=LONG_REPLY,
        answered_by=AnsweredBy.BOT,
        author_id=BOT_ID,
        author_name="chatbot",
        model_version="v0",
    )
    assert answer.id is not None
    await store.run(set_delivery, answer_message_id=answer.id, state=DeliveryState.FAILED)
    # The start of the reply reached Discord before the bot went down.
    placeholder = discord.bot_message(
        channel_id=GENERAL_CHANNEL_ID, content="Step 0: click", reply_to=question.message_id
    )
    with database.session() as session:
        row = session.get(MessageRecord, user.id)
        assert row is not None
        row.reply_placeholder_id = placeholder["id"]
        session.add(row)
        session.commit()

    async with running_bot(discord, database, model):
        await discord.wait_for(
            lambda: stored(database)[-1].delivery_state == DeliveryState.SENT,
            what="the queued reply delivered",
        )

    (edit,) = discord.requests_to("PATCH", rf"/channels/{GENERAL_CHANNEL_ID}/messages/\d+")
    assert edit.path.endswith(placeholder["id"])
    posts = discord.bot_posts(GENERAL_CHANNEL_ID)
    chunks = [edit.body["content"]] + [post.body["content"] for post in posts]
    assert " ".join(chunks) == LONG_REPLY and len(chunks) >= 3
    assert {str(p.body["message_reference"]["message_id"]) for p in posts} == {question.message_id}
    assert stored(database)[-1].platform_message_id == placeholder["id"]


async def test_a_reply_queued_after_connecting_is_posted_without_a_reconnect(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    async with running_bot(discord, database, model, delivery_retry_seconds=0.05) as bot:
        await bot.wait_until_idle()  # the pass over the queue at connect is over
        # A reply queued now, as crash recovery queues the ones it answers.
        store = Store(database)
        question = make_message(
            RESET_QUESTION, platform="discord", channel=GENERAL_CHANNEL_ID, message_id=snowflake()
        )
        user = await store.run(record_incoming, message=question)
        assert user is not None and user.id is not None
        await store.run(
            record_answer,
            user_message_id=user.id,
            text=RESET_ANSWER,
            answered_by=AnsweredBy.BOT,
            author_id=BOT_ID,
            author_name="chatbot",
            model_version="v0",
            delivery=DeliveryState.FAILED,
        )
        await discord.wait_for(
            lambda: stored(database)[-1].delivery_state == DeliveryState.SENT,
            what="the queued reply posted",
        )

    [post] = discord.bot_posts(GENERAL_CHANNEL_ID)
    assert post.body["content"] == RESET_ANSWER
    assert str(post.body["message_reference"]["message_id"]) == question.message_id
    assert discord.connections == 1


# --------------------------------------------------------------------------- shutdown


class GatedModel:
    """The real model, answering only once ``release`` is set: a reply in flight."""

    def __init__(self, inner: ReplyGenerator) -> None:
        self.inner = inner
        self.version = inner.version
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> str | GeneratedReply:
        self.started.set()
        await self.release.wait()
        return await self.inner.generate(messages=messages, max_new_tokens=max_new_tokens)


async def test_request_stop_finishes_the_reply_in_flight_and_answers_nothing_new(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gated = GatedModel(model)
    bot, run = await start_bot(discord, database, gated)
    question = await say(discord, RESET_QUESTION, mentions_bot=True)
    await asyncio.wait_for(gated.started.wait(), 15)

    bot.request_stop(drain_within=30)
    late = await say(discord, REFUND_QUESTION, author=BOB, mentions_bot=True)
    await discord.wait_for(
        lambda: "is kept for the next start" in caplog.text, what="the late message kept"
    )
    assert not run.done(), "still draining"
    gated.release.set()
    assert await asyncio.wait_for(run, 15) == 0
    bot.request_stop(drain_within=30)  # a second call is harmless

    (reply,) = discord.replies_to(question["id"])
    assert reply["content"] == RESET_ANSWER
    assert discord.replies_to(late["id"]) == []
    # Discord never sends the late message again: stored, unanswered and claimed by nobody,
    # for the next start's recovery pass (tests/process/test_discord_crash_recovery.py).
    rows = {m.platform_message_id: m for m in stored(database)}
    assert set(rows) == {question["id"], reply["id"], late["id"]}
    assert (rows[late["id"]].answer_state, rows[late["id"]].answer_claimed_by) == (
        AnswerState.PENDING,
        None,
    )


async def test_a_deletion_while_draining_is_still_applied(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    """Discord never sends an event again: a person deleting a message while the bot stops
    expects it gone all the same (edits, deletions and ratings only touch the database)."""
    gated = GatedModel(model)
    bot, run = await start_bot(discord, database, gated)
    earlier = await say(discord, "My card is 4111 1111 1111 1111", mentions_bot=True)
    await asyncio.wait_for(gated.started.wait(), 15)
    bot.request_stop(drain_within=30)
    await discord.dispatch(
        "MESSAGE_DELETE",
        {"id": earlier["id"], "channel_id": GENERAL_CHANNEL_ID, "guild_id": GUILD_ID},
    )
    await discord.wait_for(
        lambda: stored(database)[0].deleted_at is not None, what="the deletion while draining"
    )
    gated.release.set()
    assert await asyncio.wait_for(run, 15) == 0
    assert stored(database)[0].text == ""


async def test_request_stop_waits_for_a_stuck_reply_at_most_drain_within(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    gated = GatedModel(model)
    bot, run = await start_bot(discord, database, gated)
    question = await say(discord, RESET_QUESTION, mentions_bot=True)
    await asyncio.wait_for(gated.started.wait(), 15)

    loop = asyncio.get_running_loop()
    began = loop.time()
    bot.request_stop(drain_within=0.3)
    assert await asyncio.wait_for(run, 15) == 0
    assert 0.3 <= loop.time() - began < 10
    gated.release.set()
    assert await bot.tasks.drain(within=0), "the stuck reply was stopped"

    assert discord.replies_to(question["id"]) == []
    # The question stays stored for crash recovery; no answer was made up.
    assert [m.platform_message_id for m in stored(database)] == [question["id"]]


# --------------------------------------------------------------------------- bad input


async def test_bad_input_is_logged_and_survived(
    discord: FakeDiscord,
    database: Database,
    model: RecordingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_bot(discord, database, model) as bot:
        attachment = {
            "id": snowflake(),
            "filename": "screenshot.png",
            "size": 1024,
            "url": "https://cdn.example/screenshot.png",
            "proxy_url": "https://cdn.example/screenshot.png",
        }
        only_attachment = await say(discord, "", mentions_bot=True, attachments=(attachment,))
        await discord.dispatch("SOMETHING_NEW", {"whatever": 1})
        broken = {
            k: v
            for k, v in discord.user_message(
                channel_id=GENERAL_CHANNEL_ID, author=ALICE, content="x"
            ).items()
            if k not in {"content", "author"}
        }
        await discord.dispatch("MESSAGE_CREATE", broken)
        await discord.dispatch("MESSAGE_CREATE", None)
        await discord.dispatch("MESSAGE_REACTION_ADD", {"emoji": "not an object"})
        await discord.send_raw("{this is not json")
        await discord.send_raw(json.dumps([1, 2, 3]))

        huge = "Please help. " * 8_000  # about 100 KB
        big = await say(discord, huge, mentions_bot=True)
        (reply,) = await reply_to(discord, big)
        await bot.wait_until_idle()

    assert discord.replies_to(only_attachment["id"]) == []
    assert reply["content"]
    assert discord.connections == 1, "the client never had to reconnect"
    assert "malformed Discord gateway payload" in caplog.text
    rows = {row.platform_message_id: row for row in stored(database)}
    assert rows[only_attachment["id"]].answer_state == AnswerState.IGNORED
    assert rows[big["id"]].text == huge.strip()
    assert rows[big["id"]].answer_state == AnswerState.ANSWERED


async def test_a_long_failed_reply_is_split_and_delivered_after_a_restart(
    discord: FakeDiscord, database: Database, model: RecordingModel
) -> None:
    # A reply that was generated and stored, but whose sending failed before the restart.
    store = Store(database)
    question = make_message(
        RESET_QUESTION, platform="discord", channel=GENERAL_CHANNEL_ID, message_id=snowflake()
    )
    user = await store.run(record_incoming, message=question)
    assert user is not None and user.id is not None
    long_reply = " ".join(f"Step {n}: click the link on the login page." for n in range(120))
    answer, _ = await store.run(
        record_answer,
        user_message_id=user.id,
        text=long_reply,
        answered_by=AnsweredBy.BOT,
        author_id=BOT_ID,
        author_name="chatbot",
        model_version="v0",
    )
    assert answer.id is not None
    await store.run(set_delivery, answer_message_id=answer.id, state=DeliveryState.FAILED)

    async with running_bot(discord, database, model):
        posts = await discord.wait_for(
            lambda: (p := discord.bot_posts(GENERAL_CHANNEL_ID)) and len(p) >= 3 and p,
            what="the stored reply",
        )

    chunks = [post.body["content"] for post in posts]
    assert all(len(chunk) <= MESSAGE_LIMIT for chunk in chunks)
    assert " ".join(chunks) == long_reply
    assert {str(p.body["message_reference"]["message_id"]) for p in posts} == {question.message_id}
    delivered = stored(database)[-1]
    assert delivered.delivery_state == DeliveryState.SENT
    assert delivered.platform_message_id == discord.bot_messages(GENERAL_CHANNEL_ID)[0]["id"]


@pytest.fixture(autouse=True)
def _adapter_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def test_a_retrains_progress_and_loss_curve_are_shown_in_the_channel(
    discord: FakeDiscord, database: Database, model: RecordingModel, tmp_path: Path
) -> None:
    """The model side is the real ModelControl over a real registry; only the training itself
    is a stand-in (it reports twice and has trained version 1, with its curve)."""
    from bot.learning.model_commands import ModelActions
    from model.registry import Registry
    from model.retrain import ModelControl, RetrainOutcome
    from model.train import LOSS_CURVE, plot_losses

    registry = Registry(tmp_path / "models", base=str(tmp_path))
    number, folder = registry.new_folder()
    plot_losses([(1, 2.0), (2, 1.0), (3, 0.5)], folder / LOSS_CURVE)
    registry.add(number, folder, {"promoted": True})

    class Training:
        async def retrain(self, *, requested_by: str, say: Any) -> RetrainOutcome:
            await say("Training started. 3 exchanges to train on")
            await say("Training: step 3/3, loss 0.500, 900 tokens/s")
            return RetrainOutcome(text="Promoted as version 1: fine.", promoted=True, version=1)

    control = ModelControl(retrainer=Training(), registry=registry, swap=None)  # type: ignore[arg-type]
    async with running_bot(discord, database, model, actions=ModelActions(control).actions()):
        asked = await say(discord, "!retrain", author=ADMIN, mentions_bot=True)
        progress, curve = await reply_to(discord, asked, count=2)
        (answer,) = await direct_messages(discord, ADMIN)

    assert progress["content"] == "Training finished. Promoted as version 1: fine."  # edited
    assert curve["content"] == "Loss curve of version 1"
    (attachment,) = curve["attachments"]
    assert attachment["filename"] == LOSS_CURVE and attachment["size"] > 1000
    assert answer == "Promoted as version 1: fine."
