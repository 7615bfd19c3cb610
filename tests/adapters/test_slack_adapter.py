"""The Slack adapter end to end: the real Bolt app and slack_sdk client against a fake Slack.

HTTP mode is driven by signed requests on loopback, Socket Mode by a fake websocket server; the
replies come from the real tiny model through the real pipeline and database (SQLite and
PostgreSQL). Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlmodel import select

from adapters.slack_adapter import SlackAdapter
from adapters.slack_format import SLACK_MESSAGE_LIMIT
from adapters.slack_replies import PLACEHOLDER, ThreadReply
from bot.commands import Commands
from bot.config import ConfigurationError, Settings
from bot.contracts import UNFINISHED, GeneratedReply
from bot.learning import Exporter, ExportOptions, LearningActions, Pseudonymizer
from bot.replies import split_reply
from bot.service import APOLOGY, PartialDelivery, PipelineOptions, ReplyGenerator, ReplyPipeline
from bot.storage import (
    AnsweredBy,
    ChannelSettingRecord,
    Database,
    DeliveryState,
    ExchangeRecord,
    HandledCommandRecord,
    MessageRecord,
    RatingRecord,
    Store,
    UndeliveredReply,
)
from model.corpus import SEED_EXCHANGES
from model.prompt import format_prompt
from tests.conftest import make_message
from tests.fakes.slack_api import (
    BOT_ID,
    BOT_USER_ID,
    FakeSlackWebApi,
    FakeSocketModeServer,
    event_callback,
    signed_headers,
    slash_command_form,
)

RESET_QUESTION, RESET_ANSWER = SEED_EXCHANGES[0]
REFUND_QUESTION, REFUND_ANSWER = SEED_EXCHANGES[1]
SECRET = "test-signing-secret"
ADMIN = "UADMIN"
AGENT = "UAGENT"
USER = "U1"
WORKSPACE_ADMIN = "UWSADMIN"  # a Slack workspace admin, not in SLACK_ADMIN_IDS
CHANNEL = "C1"


# --------------------------------------------------------------------------- harness


def slack_settings(api: FakeSlackWebApi, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "slack_bot_token": "xoxb-test",
        "slack_app_token": "",
        "slack_signing_secret": SECRET,
        "slack_port": 0,
        "slack_api_url": api.url,
        "slack_admin_ids": [ADMIN],
        "slack_agent_ids": [AGENT],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def build_pipeline(
    database: Database,
    generator: ReplyGenerator,
    *,
    progress_interval: float = 1.0,
    placeholder_delay: float = 0.0,
) -> ReplyPipeline:
    # The placeholder goes up before generating unless a test asks for the delay.
    return ReplyPipeline(
        store=Store(database),
        generator=generator,
        options=PipelineOptions(
            max_new_tokens=64,
            progress_interval=progress_interval,
            placeholder_delay=placeholder_delay,
        ),
    )


@dataclass
class SlackHarness:
    """A started adapter in HTTP mode, the fake Web API it talks to, and a way to post to it."""

    adapter: SlackAdapter
    api: FakeSlackWebApi
    pipeline: ReplyPipeline
    http: aiohttp.ClientSession

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}/slack/events"

    async def post(
        self, body: str | bytes, *, headers: Mapping[str, str] | None = None, **signing: Any
    ) -> tuple[int, str]:
        all_headers = signed_headers(body, secret=SECRET, **signing)
        all_headers.update(headers or {})
        async with self.http.post(self.events_url, data=body, headers=all_headers) as response:
            return response.status, await response.text()

    async def event(
        self, event: dict[str, Any], *, event_id: str | None = None, retry: int = 0
    ) -> int:
        """Deliver one event the way Slack does; returns the HTTP status of the ack."""
        body = json.dumps(event_callback(event, event_id=event_id))
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        status, _ = await self.post(body, headers=headers if retry else None)
        return status

    async def command(self, text: str, *, user_id: str, trigger_id: str | None = None) -> int:
        body = slash_command_form(
            text=text, user_id=user_id, response_url=self.api.response_url, trigger_id=trigger_id
        )
        status, _ = await self.post(body, content_type="application/x-www-form-urlencoded")
        return status

    def ephemeral_texts(self, *, to: str | None = None) -> list[str]:
        return [call["text"] for call in self.api.ephemerals() if to is None or call["user"] == to]

    def slash_answers(self) -> list[str]:
        return [call.params["text"] for call in self.api.calls_of("response_url")]

    async def settled(self) -> None:
        await self.adapter.drain()

    def rows(self, model: Any) -> list[Any]:
        with self.pipeline.store.database.session() as session:
            return list(session.exec(select(model)).all())


@pytest.fixture
async def api() -> AsyncIterator[FakeSlackWebApi]:
    fake = FakeSlackWebApi()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_adapter(
    api: FakeSlackWebApi,
    pipeline: ReplyPipeline,
    *,
    commands: Commands | None = None,
    thread_page_size: int = 200,
    **settings: Any,
) -> SlackAdapter:
    return SlackAdapter(
        settings=slack_settings(api, **settings),
        handler=pipeline,
        commands=commands
        or Commands(store=pipeline.store, model_version=lambda: pipeline.generator.version),
        host="127.0.0.1",
        retry_interval=0.2,
        thread_page_size=thread_page_size,
    )


async def start_adapter(
    api: FakeSlackWebApi,
    pipeline: ReplyPipeline,
    *,
    commands: Commands | None = None,
    thread_page_size: int = 200,
    **settings: Any,
) -> SlackAdapter:
    adapter = make_adapter(
        api, pipeline, commands=commands, thread_page_size=thread_page_size, **settings
    )
    await adapter.start()
    return adapter


def learning_commands(pipeline: ReplyPipeline, directory: Path) -> Commands:
    """The commands as the bot wires them: export, forget-me, correct and training work."""
    exporter = Exporter(
        database=pipeline.store.database,
        options=ExportOptions(directory=directory, create_directory=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(b"k"),
    )
    learning = LearningActions(
        store=pipeline.store, exporter=exporter, pseudonymize=Pseudonymizer(b"k")
    )
    return Commands(
        store=pipeline.store,
        model_version=lambda: pipeline.generator.version,
        actions=learning.actions(),
    )


@pytest.fixture
async def slack(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> AsyncIterator[SlackHarness]:
    async with running_slack(build_pipeline(database, tiny_model), api, http_session) as harness:
        yield harness


@contextlib.asynccontextmanager
async def running_slack(
    pipeline: ReplyPipeline, api: FakeSlackWebApi, http: aiohttp.ClientSession
) -> AsyncIterator[SlackHarness]:
    """A started adapter serving ``pipeline`` against ``api``; stopped on the way out."""
    adapter = await start_adapter(api, pipeline)
    try:
        yield SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http)
    finally:
        await adapter.stop()


def mention(text: str, *, ts: str, user: str = USER, thread_ts: str | None = None) -> dict:
    event = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts,
        "channel": CHANNEL,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def channel_message(
    text: str, *, ts: str, user: str = USER, thread_ts: str | None = None, channel: str = CHANNEL
) -> dict:
    event = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "channel_type": "im" if channel.startswith("D") else "channel",
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


# --------------------------------------------------------------------------- conversations


async def test_a_mention_gets_one_reply_in_its_thread(slack: SlackHarness) -> None:
    assert await slack.event(mention(RESET_QUESTION, ts="1700000001.000100")) == 200
    await slack.settled()

    (reply,) = slack.api.posted()
    assert reply["channel"] == CHANNEL
    assert reply["thread_ts"] == "1700000001.000100"
    # A placeholder went up first and was edited into the reply.
    assert reply["posted_text"] == PLACEHOLDER
    assert reply["text"] == RESET_ANSWER
    stored = {row.role: row for row in slack.rows(MessageRecord)}
    assert stored["user"].text == RESET_QUESTION  # the @-mention is not part of the question
    assert stored["user"].author_name == f"Person {USER}"
    assert stored["assistant"].delivery_state == DeliveryState.SENT.value
    assert stored["assistant"].platform_message_id == reply["ts"]


async def test_a_quick_reply_is_posted_once_without_a_placeholder(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> None:
    # Ready before the placeholder delay: one chat.postMessage with the reply, no
    # placeholder to post and then edit (half the Web API calls, which Slack rate-limits).
    pipeline = build_pipeline(database, tiny_model, placeholder_delay=30.0)
    async with running_slack(pipeline, api, http_session) as slack:
        assert await slack.event(mention(RESET_QUESTION, ts="1700000001.000100")) == 200
        await slack.settled()

    (reply,) = slack.api.posted()
    assert reply["thread_ts"] == "1700000001.000100"
    assert reply["posted_text"] == reply["text"] == RESET_ANSWER  # never edited
    assert len(slack.api.calls_of("chat.postMessage", ok_only=False)) == 1
    assert slack.api.calls_of("chat.update", ok_only=False) == []
    stored = {row.role: row for row in slack.rows(MessageRecord)}
    assert stored["assistant"].platform_message_id == reply["ts"]
    assert stored["user"].reply_placeholder_id is None


async def test_replies_reuse_one_connection_to_the_web_api(slack: SlackHarness) -> None:
    # slack_sdk opens (and closes) a connection per call unless it is given a session: with
    # TLS to slack.com that is a handshake per placeholder and per edit.
    for n in range(4):
        assert await slack.event(mention(RESET_QUESTION, ts=f"1700000001.00010{n}")) == 200
        await slack.settled()

    assert len(slack.api.posted()) == 4
    assert len(slack.api.calls) >= 8  # auth.test, then a post and an edit per reply
    assert len(slack.api.connections) == 1, slack.api.connections


async def test_the_ack_does_not_wait_for_generation(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()

    class GatedModel:
        """The tiny model, held back until the test opens the gate."""

        version = tiny_model.version

        async def generate(
            self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
        ) -> str | GeneratedReply:
            await gate.wait()
            return await tiny_model.generate(messages=messages, max_new_tokens=max_new_tokens)

    pipeline = build_pipeline(database, GatedModel())
    adapter = await start_adapter(api, pipeline)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    try:
        started = time.monotonic()
        assert await harness.event(mention(RESET_QUESTION, ts="1700000002.000100")) == 200
        assert time.monotonic() - started < 3.0
        await api.wait_for(lambda: len(api.posted()) == 1, what="the placeholder")
        assert api.posted()[0]["text"] == PLACEHOLDER  # acked, still generating
        gate.set()
        await harness.settled()
        assert [m["text"] for m in api.posted()] == [RESET_ANSWER]
    finally:
        gate.set()
        await adapter.stop()


async def test_a_follow_up_in_the_thread_needs_no_mention(slack: SlackHarness) -> None:
    root = "1700000010.000100"
    await slack.event(mention(RESET_QUESTION, ts=root))
    await slack.settled()
    # Channel chatter outside the thread is not for the bot.
    await slack.event(channel_message(REFUND_QUESTION, ts="1700000011.000100"))
    await slack.event(channel_message(REFUND_QUESTION, ts="1700000012.000100", thread_ts=root))
    await slack.settled()

    replies = slack.api.posted()
    assert [reply["thread_ts"] for reply in replies] == [root, root]
    assert [reply["text"] for reply in replies] == [RESET_ANSWER, REFUND_ANSWER]
    user_texts = [row.text for row in slack.rows(MessageRecord) if row.role == "user"]
    assert user_texts == [RESET_QUESTION, REFUND_QUESTION]


async def test_a_direct_message_is_a_conversation_of_its_own(slack: SlackHarness) -> None:
    await slack.event(channel_message(RESET_QUESTION, ts="1700000020.000100", channel="D9"))
    await slack.settled()

    (reply,) = slack.api.posted()
    assert reply["channel"] == "D9"
    assert "thread_ts" not in reply  # a DM answer goes in the DM, not in a thread
    assert reply["text"] == RESET_ANSWER
    (user_message,) = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert user_message.is_direct


async def test_a_mention_inside_a_thread_brings_the_thread_into_the_history(
    slack: SlackHarness,
) -> None:
    root, mention_ts = "1700000025.000100", "1700000027.000100"
    slack.api.threads[root] = [
        {"type": "message", "user": "U2", "text": "I cannot log in since today.", "ts": root},
        {"type": "message", "user": "U3", "text": "Same here.", "ts": "1700000026.000100"},
        {"type": "message", "user": "U3", "text": "!help", "ts": "1700000026.000200"},
        {
            "type": "message",
            "subtype": "bot_message",
            "bot_id": "B0OTHER",
            "text": "Status: all systems green",
            "ts": "1700000026.000300",
        },
        {"type": "message", "user": USER, "text": RESET_QUESTION, "ts": mention_ts},
        {"type": "message", "user": "U4", "text": "Written later.", "ts": "1700000028.000100"},
    ]
    await slack.event(mention(RESET_QUESTION, ts=mention_ts, thread_ts=root))
    await slack.settled()

    (reply,) = slack.api.posted()
    assert reply["thread_ts"] == root
    assert reply["text"] not in ("", PLACEHOLDER)
    users = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert [row.text for row in users] == [
        "I cannot log in since today.",
        "Same here.",
        RESET_QUESTION,
    ]
    assert len({row.conversation_id for row in slack.rows(MessageRecord)}) == 1
    assert [row.answer_state for row in users] == ["ignored", "ignored", "answered"]


async def test_thread_history_pages_through_the_thread_and_keeps_the_newest_turns(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> None:
    root, mention_ts = "1700000029.000000", "1700000029.999999"
    earlier = [
        {
            "type": "message",
            "user": f"U{n % 3 + 2}",
            "text": f"note {n}",
            "ts": f"1700000029.{n:06d}",
        }
        for n in range(129)
    ]
    earlier[0]["ts"] = root
    api.threads[root] = [
        *earlier,
        {"type": "message", "user": USER, "text": RESET_QUESTION, "ts": mention_ts},
    ]  # 130 messages: three pages of 50
    pipeline = build_pipeline(database, tiny_model)
    adapter = await start_adapter(api, pipeline, thread_page_size=50, history_turns=20)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    try:
        await harness.event(mention(RESET_QUESTION, ts=mention_ts, thread_ts=root))
        await harness.settled()
    finally:
        await adapter.stop()

    pages = api.calls_of("conversations.replies")
    assert [call.params.get("cursor") for call in pages] == [None, "50", "100"]
    texts = [row.text for row in harness.rows(MessageRecord) if row.role == "user"]
    assert texts == [f"note {n}" for n in range(109, 129)] + [RESET_QUESTION]


# --------------------------------------------------------------------------- exactly once


async def test_a_retried_event_gets_one_reply(slack: SlackHarness) -> None:
    event = mention(RESET_QUESTION, ts="1700000030.000100")
    assert await slack.event(event, event_id="EvRETRY1") == 200
    await slack.settled()
    # Slack did not see the ack in time and sends it again, twice.
    assert await slack.event(event, event_id="EvRETRY1", retry=1) == 200
    assert await slack.event(event, event_id="EvRETRY1", retry=2) == 200
    await slack.settled()

    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]
    assert len(slack.rows(MessageRecord)) == 2  # the question and the answer


async def test_a_mention_delivered_as_app_mention_and_message_gets_one_reply(
    slack: SlackHarness,
) -> None:
    as_mention = mention(RESET_QUESTION, ts="1700000040.000100")
    as_message = {**as_mention, "type": "message", "channel_type": "channel"}
    statuses = await asyncio.gather(slack.event(as_mention), slack.event(as_message))
    await slack.settled()

    assert statuses == [200, 200]
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]


async def test_a_restarted_instance_does_not_answer_a_redelivery(
    slack: SlackHarness, tiny_model: ReplyGenerator
) -> None:
    event = mention(RESET_QUESTION, ts="1700000045.000100")
    await slack.event(event, event_id="EvRESTART")
    await slack.settled()
    await slack.adapter.stop()

    # A second instance on the same database, as after a restart or behind a load balancer.
    pipeline = build_pipeline(slack.pipeline.store.database, tiny_model)
    other = SlackHarness(
        adapter=await start_adapter(slack.api, pipeline),
        api=slack.api,
        pipeline=pipeline,
        http=slack.http,
    )
    try:
        await other.event(event, event_id="EvRESTART", retry=1)
        await other.settled()
    finally:
        await other.adapter.stop()
    assert len(slack.api.posted()) == 1


async def test_the_bots_own_and_other_bots_messages_get_no_reply(slack: SlackHarness) -> None:
    own = {**mention(RESET_QUESTION, ts="1700000050.000100"), "user": BOT_USER_ID}
    own_dm = {
        **channel_message(RESET_QUESTION, ts="1700000051.000100", channel="D9"),
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
    }
    other_bot = {
        **channel_message(f"<@{BOT_USER_ID}> {RESET_QUESTION}", ts="1700000052.000100"),
        "subtype": "bot_message",
        "bot_id": "B0OTHER",
        "username": "another bot",
    }
    app_user_bot = {**mention(RESET_QUESTION, ts="1700000053.000100"), "bot_id": "B0OTHER"}
    for event in (own, own_dm, other_bot, app_user_bot):
        assert await slack.event(event) == 200
    await slack.settled()

    assert slack.api.posted() == []
    assert slack.rows(MessageRecord) == []


# --------------------------------------------------------------------------- edits, deletions


async def test_edits_update_and_deletions_remove_the_stored_text(slack: SlackHarness) -> None:
    ts = "1700000060.000100"
    await slack.event(mention(RESET_QUESTION, ts=ts))
    await slack.settled()
    edit = {
        "type": "message",
        "subtype": "message_changed",
        "channel": CHANNEL,
        "ts": "1700000061.000100",
        "message": {
            "type": "message",
            "user": USER,
            "text": f"<@{BOT_USER_ID}> {RESET_QUESTION[:-1]} on <https://example.com|the site>?",
            "ts": ts,
            "edited": {"user": USER, "ts": "1700000061.000000"},
        },
        "previous_message": {"type": "message", "user": USER, "text": RESET_QUESTION, "ts": ts},
    }
    assert await slack.event(edit) == 200
    await slack.settled()
    (question,) = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert question.text == "How do I reset my password on the site (https://example.com)?"
    assert question.edited_at is not None

    deletion = {
        "type": "message",
        "subtype": "message_deleted",
        "channel": CHANNEL,
        "ts": "1700000062.000100",
        "deleted_ts": ts,
        "previous_message": edit["message"],
    }
    assert await slack.event(deletion) == 200
    await slack.settled()
    (question,) = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert question.deleted_at is not None
    assert question.text == ""
    assert len(slack.api.posted()) == 1  # neither event is a turn to answer


async def test_an_unfurl_or_thread_update_is_not_an_edit(slack: SlackHarness) -> None:
    ts = "1700000065.000100"
    await slack.event(mention(RESET_QUESTION, ts=ts))
    await slack.settled()
    text = f"<@{BOT_USER_ID}> {RESET_QUESTION}"
    unfurl = {
        "type": "message",
        "subtype": "message_changed",
        "channel": CHANNEL,
        "ts": "1700000066.000100",
        "message": {"type": "message", "user": USER, "text": text, "ts": ts, "reply_count": 1},
        "previous_message": {"type": "message", "user": USER, "text": text, "ts": ts},
    }
    await slack.event(unfurl)
    await slack.settled()
    (question,) = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert question.edited_at is None


# --------------------------------------------------------------------------- feedback


def reaction(kind: str, name: str, *, ts: str, user: str = USER) -> dict:
    return {
        "type": kind,
        "user": user,
        "reaction": name,
        "item_user": BOT_USER_ID,
        "item": {"type": "message", "channel": CHANNEL, "ts": ts},
        "event_ts": "1700000099.000100",
    }


async def test_thumbs_on_a_reply_rate_the_exchange_and_removing_them_unrates(
    slack: SlackHarness,
) -> None:
    await slack.event(mention(RESET_QUESTION, ts="1700000070.000100"))
    await slack.settled()
    (reply,) = slack.api.posted()

    await slack.event(reaction("reaction_added", "+1", ts=reply["ts"]))
    await slack.event(reaction("reaction_added", "-1::skin-tone-3", ts=reply["ts"], user="U2"))
    await slack.event(reaction("reaction_added", "tada", ts=reply["ts"], user="U3"))
    await slack.settled()
    ratings = {row.rater_id: row.value for row in slack.rows(RatingRecord)}
    assert ratings == {USER: 1, "U2": -1}
    (exchange,) = slack.rows(ExchangeRecord)
    assert {row.exchange_id for row in slack.rows(RatingRecord)} == {exchange.id}

    await slack.event(reaction("reaction_removed", "+1", ts=reply["ts"]))
    await slack.settled()
    assert {row.rater_id: row.value for row in slack.rows(RatingRecord)} == {"U2": -1}


async def test_a_reaction_on_a_user_message_rates_nothing(slack: SlackHarness) -> None:
    ts = "1700000075.000100"
    await slack.event(mention(RESET_QUESTION, ts=ts))
    await slack.settled()
    on_question = {**reaction("reaction_added", "+1", ts=ts, user="U2"), "item_user": USER}
    await slack.event(on_question)
    await slack.settled()
    assert slack.rows(RatingRecord) == []


# --------------------------------------------------------------------------- human agents


async def test_an_agent_reply_in_a_bot_thread_is_stored_as_the_answer(slack: SlackHarness) -> None:
    root = "1700000080.000100"
    await slack.event(mention(RESET_QUESTION, ts=root))
    await slack.settled()
    await slack.event(channel_message(REFUND_QUESTION, ts="1700000081.000100", thread_ts=root))
    await slack.settled()
    agent_text = "Refunds within 30 days; write to billing and mention your order number."
    await slack.event(
        channel_message(agent_text, ts="1700000082.000100", thread_ts=root, user=AGENT)
    )
    await slack.settled()

    assert len(slack.api.posted()) == 2  # the bot did not answer the agent
    agent_exchanges = [
        row for row in slack.rows(ExchangeRecord) if row.answered_by == AnsweredBy.HUMAN_AGENT
    ]
    assert len(agent_exchanges) == 1
    messages = {row.id: row for row in slack.rows(MessageRecord)}
    assert messages[agent_exchanges[0].user_message_id].text == REFUND_QUESTION
    assert messages[agent_exchanges[0].answer_message_id].text == agent_text
    assert messages[agent_exchanges[0].answer_message_id].role == "human_agent"


# --------------------------------------------------------------------------- commands


async def test_slash_commands_answer_admins_and_refuse_others(
    slack: SlackHarness, caplog: pytest.LogCaptureFixture
) -> None:
    assert await slack.command("status", user_id=ADMIN) == 200
    assert await slack.command("retrain", user_id=USER) == 200
    assert await slack.command("forget-me", user_id=USER) == 200
    assert await slack.command("", user_id=USER) == 200
    await slack.settled()

    answers = [call.params for call in slack.api.calls_of("response_url")]
    assert len(answers) == 4
    assert all(answer["response_type"] == "ephemeral" for answer in answers)
    texts = sorted(answer["text"] for answer in answers)
    status = next(text for text in texts if text.startswith("Model:"))
    assert slack.pipeline.generator.version in status
    assert "messages: 0" in status
    assert any("only admins" in text and "retrain" in text for text in texts)
    assert any("not available yet" in text and "forget-me" in text for text in texts)
    assert any(text.startswith("Commands:") for text in texts)  # no word: the help
    assert any("refused admin command retrain" in r.getMessage() for r in caplog.records)
    assert slack.api.posted() == []  # nothing public


async def test_bang_commands_are_answered_to_the_asker_alone_in_the_thread(
    slack: SlackHarness,
) -> None:
    admin_status = mention("!status", ts="1700000090.000100", user=ADMIN)
    await asyncio.gather(
        slack.event(admin_status),
        # The same message again as a `message` event: still one answer.
        slack.event({**admin_status, "type": "message", "channel_type": "channel"}),
        slack.event(mention("!rollback", ts="1700000091.000100")),
        slack.event(channel_message("!help", ts="1700000092.000100", channel="D9")),
    )
    await slack.settled()

    assert slack.api.posted() == []  # nothing public: status and refusals are the asker's
    answers = {
        (call["channel"], call.get("thread_ts"), call["user"]): call["text"]
        for call in slack.api.ephemerals()
    }
    assert len(slack.api.ephemerals()) == 3
    assert answers[(CHANNEL, "1700000090.000100", ADMIN)].startswith("Model:")
    assert "only admins" in answers[(CHANNEL, "1700000091.000100", USER)]
    assert answers[("D9", None, USER)].startswith("Commands:")
    assert slack.rows(MessageRecord) == []  # commands are not conversation turns


async def test_a_bang_command_redelivered_after_a_restart_runs_once(
    slack: SlackHarness, tiny_model: ReplyGenerator
) -> None:
    event = mention("!status", ts="1700000093.000100", user=ADMIN)
    await slack.event(event, event_id="EvCOMMAND")
    await slack.settled()
    await slack.adapter.stop()

    # A new adapter and pipeline on the same database get the same event again.
    pipeline = build_pipeline(slack.pipeline.store.database, tiny_model)
    other = SlackHarness(
        adapter=await start_adapter(slack.api, pipeline),
        api=slack.api,
        pipeline=pipeline,
        http=slack.http,
    )
    try:
        await other.event(event, event_id="EvCOMMAND", retry=1)
        await other.event({**event, "type": "message", "channel_type": "channel"})
        await other.settled()
    finally:
        await other.adapter.stop()
    assert len(slack.ephemeral_texts(to=ADMIN)) == 1
    assert len(slack.rows(HandledCommandRecord)) == 1


async def test_a_replayed_slash_command_runs_once(slack: SlackHarness) -> None:
    body = slash_command_form(
        text="forget-me", user_id=USER, response_url=slack.api.response_url, trigger_id="7.8.9"
    )
    form = "application/x-www-form-urlencoded"
    assert (await slack.post(body, content_type=form))[0] == 200
    # The same body again inside the signature window, signed afresh: a replay.
    replayed = await slack.post(body, content_type=form, timestamp=int(time.time()) - 30)
    assert replayed[0] == 200
    await slack.command("help", user_id=USER)  # another trigger runs
    await slack.settled()

    answers = slack.slash_answers()
    assert len(answers) == 2
    assert sorted(answers)[0].startswith("Commands:")  # the help; forget-me ran once
    assert sorted(answers)[1] == "`forget-me` is not available yet."


async def test_a_workspace_admin_may_switch_training_but_not_touch_the_shared_model(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    api.users[WORKSPACE_ADMIN] = {
        "id": WORKSPACE_ADMIN,
        "name": "wendy",
        "is_admin": True,
        "profile": {"display_name": "Wendy"},
    }
    api.users["UOWNER"] = {"id": "UOWNER", "is_owner": True, "profile": {"display_name": "O"}}
    pipeline = build_pipeline(database, tiny_model)
    adapter = await start_adapter(api, pipeline, commands=learning_commands(pipeline, tmp_path))
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    try:
        root = "1700000095.000100"
        await harness.event(mention(RESET_QUESTION, ts=root))
        await harness.settled()
        await harness.event(mention("!training off", ts="1700000095.000200", user=WORKSPACE_ADMIN))
        await harness.settled()
        await harness.event(
            channel_message(
                "!correct Better.", ts="1700000095.000300", thread_ts=root, user=WORKSPACE_ADMIN
            )
        )
        await harness.settled()
        for word, user in [
            ("export", WORKSPACE_ADMIN),
            ("status", WORKSPACE_ADMIN),
            ("correct Better.", WORKSPACE_ADMIN),
            ("training on", USER),  # a member is no channel admin
            ("training on", "UOWNER"),  # a workspace owner is
        ]:
            await harness.command(word, user_id=user)
            await harness.settled()
    finally:
        await adapter.stop()

    mine = harness.ephemeral_texts(to=WORKSPACE_ADMIN)
    assert len(mine) == 2
    assert mine[0].startswith("Training is now off in this channel")
    assert mine[1] == "Sorry, only admins can use `correct`."
    answers = harness.slash_answers()
    assert answers[:4] == [
        "Sorry, only admins can use `export`.",
        "Sorry, only admins can use `status`.",
        "Sorry, only admins can use `correct`.",
        "Sorry, only admins can use `training`.",
    ]
    # A workspace owner may turn it back on.
    assert answers[4].startswith("Training is back on in this channel")
    assert not any(row.answered_by == AnsweredBy.CORRECTION for row in harness.rows(ExchangeRecord))
    (setting,) = harness.rows(ChannelSettingRecord)
    assert (setting.channel, setting.training_opt_out, setting.updated_by) == (
        CHANNEL,
        False,
        "UOWNER",
    )


async def test_an_agents_command_runs_as_a_command_and_is_no_answer(slack: SlackHarness) -> None:
    root = "1700000096.000100"
    await slack.event(mention(RESET_QUESTION, ts=root))
    await slack.settled()
    await slack.event(channel_message("!help", ts="1700000096.000200", thread_ts=root, user=AGENT))
    await slack.settled()

    (answer,) = slack.ephemeral_texts(to=AGENT)
    assert answer.startswith("Commands:")
    assert len(slack.api.posted()) == 1  # the bot's answer to the question, nothing more
    assert [row.answered_by for row in slack.rows(ExchangeRecord)] == [AnsweredBy.BOT]
    assert not any(row.role == "human_agent" for row in slack.rows(MessageRecord))


async def test_correct_in_a_thread_corrects_the_bots_last_answer_there(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    pipeline = build_pipeline(database, tiny_model)
    adapter = await start_adapter(api, pipeline, commands=learning_commands(pipeline, tmp_path))
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    root, other_root = "1700000097.000100", "1700000098.000100"
    better = "Go to Settings, then Security, then Reset password."
    try:
        await harness.event(mention(RESET_QUESTION, ts=root))
        await harness.event(mention(REFUND_QUESTION, ts=other_root))
        await harness.settled()
        await harness.event(
            channel_message(
                f"!correct {better}", ts="1700000097.000300", thread_ts=root, user=ADMIN
            )
        )
        await harness.settled()
    finally:
        await adapter.stop()

    assert harness.ephemeral_texts(to=ADMIN) == [
        "Thanks, I stored your correction; it will be used for training."
    ]
    messages = {row.id: row for row in harness.rows(MessageRecord)}
    (correction,) = [
        row for row in harness.rows(ExchangeRecord) if row.answered_by == AnsweredBy.CORRECTION
    ]
    assert messages[correction.user_message_id].text == RESET_QUESTION  # that thread's question
    assert messages[correction.answer_message_id].text == better


# --------------------------------------------------------------------------- delivery


async def test_a_rate_limited_post_is_retried_by_the_sdk(slack: SlackHarness) -> None:
    slack.api.rate_limit("chat.postMessage", times=1, retry_after="0")
    await slack.event(mention(RESET_QUESTION, ts="1700000100.000100"))
    await slack.settled()

    statuses = [call.status for call in slack.api.calls_of("chat.postMessage", ok_only=False)]
    assert statuses == [429, 200]
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]


async def test_a_reply_that_cannot_be_posted_is_posted_from_the_queue_after_a_restart(
    slack: SlackHarness, tiny_model: ReplyGenerator
) -> None:
    root = "1700000110.000100"
    slack.api.fail("chat.postMessage", times=100, status=500, error="internal_error")
    await slack.event(mention(RESET_QUESTION, ts=root))
    await slack.settled()
    await slack.adapter.stop()
    assert slack.api.posted() == []
    (answer,) = [row for row in slack.rows(MessageRecord) if row.role == "assistant"]
    assert answer.delivery_state == DeliveryState.FAILED.value

    # Slack is back; a new instance on the same database posts the queued reply once.
    slack.api.fail("chat.postMessage", times=0)
    database = slack.pipeline.store.database
    for _ in range(2):
        adapter = await start_adapter(slack.api, build_pipeline(database, tiny_model))
        await slack.api.wait_for(lambda: len(slack.api.posted()) == 1, what="the queued reply")
        await asyncio.sleep(0.3)  # more than one retry_interval: a second pass posts nothing
        await adapter.stop()

    (reply,) = slack.api.posted()
    assert reply["thread_ts"] == root
    assert reply["text"] == RESET_ANSWER
    (answer,) = [row for row in slack.rows(MessageRecord) if row.role == "assistant"]
    assert answer.delivery_state == DeliveryState.SENT.value
    assert answer.platform_message_id == reply["ts"]


async def test_a_failed_edit_of_the_placeholder_is_retried_as_an_edit_not_a_second_post(
    slack: SlackHarness,
) -> None:
    question = make_message(platform="slack", channel=CHANNEL, thread="1.2")
    writer = ThreadReply(client=slack.adapter.client, channel=CHANNEL, thread_ts="1.2", asker=USER)
    placeholder_ts = await writer.progress(text="", in_reply_to=question)
    assert placeholder_ts == slack.api.posted()[0]["ts"]
    slack.api.fail("chat.update", times=1, status=500)
    with pytest.raises(PartialDelivery) as raised:
        await writer.send(text=RESET_ANSWER, in_reply_to=question)
    assert raised.value.message_id == placeholder_ts

    # The retry queue gets the reply with its placeholder and edits it into the reply.
    queued = UndeliveredReply(
        answer_id=1,
        platform="slack",
        workspace="T0TEAM",
        channel=CHANNEL,
        thread="1.2",
        in_reply_to=question.message_id,
        text=RESET_ANSWER,
        placeholder_id=placeholder_ts,
    )
    assert await slack.adapter.post_queued_reply(queued) == placeholder_ts
    (reply,) = slack.api.posted()
    assert reply["text"] == RESET_ANSWER


@pytest.mark.parametrize("thread", ["1700000300.000100", ""], ids=["thread", "dm"])
async def test_a_queued_reply_that_already_landed_is_not_posted_again(
    slack: SlackHarness, thread: str
) -> None:
    # Posted without a placeholder (a quick reply), and the bot died before it recorded the
    # ts: the retry finds the reply in the thread (or the DM) after its question.
    question_ts = "1700000300.000100"
    long_reply = " ".join([RESET_ANSWER] * 100)  # three chunks
    chunks = split_reply(long_reply, limit=SLACK_MESSAGE_LIMIT)
    assert len(chunks) == 3
    writer = ThreadReply(
        client=slack.adapter.client, channel=CHANNEL, thread_ts=thread or None, asker=USER
    )
    slack.api.fail(  # the third chunk
        "chat.postMessage", times=1, status=500, when=lambda p: p.get("text") == chunks[2]
    )
    question = make_message(platform="slack", channel=CHANNEL, thread=thread)
    with pytest.raises(PartialDelivery):
        await writer.send(text=long_reply, in_reply_to=question)
    landed = [m["ts"] for m in slack.api.posted()]
    assert len(landed) == 2

    queued = UndeliveredReply(
        answer_id=1,
        platform="slack",
        workspace="T0TEAM",
        channel=CHANNEL,
        thread=thread,
        in_reply_to=question_ts,
        text=long_reply,
    )
    assert await slack.adapter.post_queued_reply(queued) == landed[0]
    shown = [m["text"] for m in slack.api.posted()]
    assert shown == chunks  # each chunk once: only the missing third was posted


async def test_a_queued_reply_is_posted_when_what_landed_is_something_else(
    slack: SlackHarness,
) -> None:
    # The bot's earlier message after the question is another text: not this reply.
    writer = ThreadReply(client=slack.adapter.client, channel=CHANNEL, thread_ts=None, asker=USER)
    question = make_message(platform="slack", channel=CHANNEL, thread="")
    await writer.send(text="an earlier answer", in_reply_to=question)
    queued = UndeliveredReply(
        answer_id=1,
        platform="slack",
        workspace="T0TEAM",
        channel=CHANNEL,
        thread="",
        in_reply_to="1700000300.000100",
        text=RESET_ANSWER,
    )
    ts = await slack.adapter.post_queued_reply(queued)
    assert [m["text"] for m in slack.api.posted()] == ["an earlier answer", RESET_ANSWER]
    assert ts == slack.api.posted()[1]["ts"]


async def test_a_reply_whose_final_edit_fails_is_finished_by_editing_not_reposting(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> None:
    class WholeReplies:
        """The tiny model without streaming: a placeholder, then one final edit."""

        version = tiny_model.version

        async def generate(
            self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
        ) -> str | GeneratedReply:
            return await tiny_model.generate(messages=messages, max_new_tokens=max_new_tokens)

    api.fail("chat.update", times=1, status=500)
    pipeline = build_pipeline(database, WholeReplies())
    adapter = await start_adapter(api, pipeline)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    try:
        await harness.event(mention(RESET_QUESTION, ts="1700000105.000100"))
        await harness.settled()
        # The retry queue edits the placeholder into the reply.
        await api.wait_for(
            lambda: [m["text"] for m in api.posted()] == [RESET_ANSWER], what="the edited reply"
        )
        await api.wait_for(
            lambda: any(
                row.delivery_state == DeliveryState.SENT.value
                for row in harness.rows(MessageRecord)
                if row.role == "assistant"
            ),
            what="the reply marked sent",
        )
    finally:
        await adapter.stop()

    (reply,) = api.posted()  # one message: no second full post
    assert reply["posted_text"] == PLACEHOLDER
    assert [call.status for call in api.calls_of("chat.update", ok_only=False)] == [500, 200]
    (answer,) = [row for row in harness.rows(MessageRecord) if row.role == "assistant"]
    assert answer.platform_message_id == reply["ts"]


async def test_a_failed_later_chunk_is_a_partial_delivery(slack: SlackHarness) -> None:
    sentence = "Open the settings page and choose the security tab to change it. "
    long_text = sentence * (SLACK_MESSAGE_LIMIT // len(sentence) + 5)  # two chunks
    question = make_message(platform="slack", channel=CHANNEL, thread="1.2")
    writer = ThreadReply(client=slack.adapter.client, channel=CHANNEL, thread_ts="1.2", asker=USER)
    await writer.progress(text="", in_reply_to=question)
    slack.api.fail("chat.postMessage", times=1, status=500)
    with pytest.raises(PartialDelivery) as raised:
        await writer.send(text=long_text, in_reply_to=question)
    (first,) = slack.api.posted()
    assert raised.value.message_id == first["ts"]
    assert first["text"] != PLACEHOLDER  # the start of the reply is there


class FixedReply:
    """Always the same reply (no streaming): a placeholder, then the final text."""

    version = "fixed"

    def __init__(self, text: str) -> None:
        self.text = text

    async def generate(self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> str:
        return self.text


#: Three paragraphs, each under Slack's limit and any two over it: a reply of three chunks.
THREE_PARTS = "\n\n".join(
    f"Part {part}. " + "Open the settings page and choose the security tab. " * 45
    for part in (1, 2, 3)
)


def starts_part(part: int, *, key: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a Web API call's ``key`` parameter holds chunk ``part`` of :data:`THREE_PARTS`."""
    return lambda params: str(params.get(key, "")).startswith(f"Part {part}.")


@pytest.mark.parametrize("failing_parts", [(3,), (2, 3)], ids=["third-chunk", "again-on-retry"])
async def test_a_reply_failing_part_way_shows_each_chunk_once_after_the_retry(
    database: Database,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
    failing_parts: tuple[int, ...],
) -> None:
    # (3,): the third chunk fails once and the retry posts it. (2, 3): the second fails, and
    # the retry, having posted it, fails on the third; the next retry posts only that.
    for part in failing_parts:
        api.fail(
            "chat.postMessage",
            times=1,
            status=500,
            when=starts_part(part, key="text"),
        )
    pipeline = build_pipeline(database, FixedReply(THREE_PARTS))
    adapter = await start_adapter(api, pipeline)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)

    def answer() -> MessageRecord:
        (row,) = [row for row in harness.rows(MessageRecord) if row.role == "assistant"]
        return row

    try:
        await harness.event(mention(RESET_QUESTION, ts="1700000107.000100"))
        await harness.settled()
        await api.wait_for(
            lambda: answer().delivery_state == DeliveryState.SENT.value, what="the reply sent"
        )
    finally:
        await adapter.stop()

    chunks = split_reply(THREE_PARTS, limit=SLACK_MESSAGE_LIMIT)
    assert len(chunks) == 3
    failed = [
        call for call in api.calls_of("chat.postMessage", ok_only=False) if call.status != 200
    ]
    assert len(failed) == len(failing_parts)
    posted = api.posted()
    assert [message["text"] for message in posted] == chunks  # each chunk once, in order
    assert posted[0]["posted_text"] == PLACEHOLDER
    assert answer().platform_message_id == posted[0]["ts"]


async def test_a_long_reply_is_split_at_slacks_limit(slack: SlackHarness) -> None:
    sentence = "Open the settings page and choose the security tab to change it. "
    long_text = sentence * (2 * SLACK_MESSAGE_LIMIT // len(sentence) + 5)
    question = make_message(platform="slack", channel=CHANNEL, thread="1.2")
    writer = ThreadReply(client=slack.adapter.client, channel=CHANNEL, thread_ts="1.2", asker=USER)
    await writer.progress(text="", in_reply_to=question)
    first_ts = await writer.send(text=long_text, in_reply_to=question)

    chunks = slack.api.posted()
    assert len(chunks) == 3
    assert chunks[0]["ts"] == first_ts
    assert all(chunk["thread_ts"] == "1.2" for chunk in chunks)
    assert all(len(chunk["text"]) <= SLACK_MESSAGE_LIMIT for chunk in chunks)
    assert all(chunk["text"].endswith(".") for chunk in chunks)  # cut at sentence ends
    assert " ".join(chunk["text"] for chunk in chunks) == long_text.strip()


async def test_a_streamed_reply_edits_the_placeholder_then_shows_the_full_text(
    slack: SlackHarness,
) -> None:
    # The pipeline calls progress with "" and then the text so far, marked unfinished (at
    # most once per progress_interval); this is the Slack side of that contract.
    question = make_message(platform="slack", channel=CHANNEL, thread="1.2")
    writer = ThreadReply(client=slack.adapter.client, channel=CHANNEL, thread_ts="1.2", asker=USER)
    words = RESET_ANSWER.split(" ")
    await writer.progress(text="", in_reply_to=question)
    await writer.progress(text=" ".join(words[:3]) + UNFINISHED, in_reply_to=question)
    await writer.progress(text=" ".join(words[:6]) + UNFINISHED, in_reply_to=question)
    rated_ts = await writer.send(text=RESET_ANSWER, in_reply_to=question)

    (reply,) = slack.api.posted()
    assert reply["posted_text"] == PLACEHOLDER
    assert reply["ts"] == rated_ts
    edits = [call.params["text"] for call in slack.api.calls_of("chat.update")]
    assert edits == [
        " ".join(words[:3]) + UNFINISHED,
        " ".join(words[:6]) + UNFINISHED,
        RESET_ANSWER,
    ]
    assert reply["text"] == RESET_ANSWER


async def test_a_mention_streams_into_the_placeholder_end_to_end(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
) -> None:
    pipeline = build_pipeline(database, tiny_model, progress_interval=0.0)
    async with running_slack(pipeline, api, http_session) as harness:
        await harness.event(mention(RESET_QUESTION, ts="1700000140.000100"))
        await harness.settled()

    (reply,) = api.posted()
    assert reply["posted_text"] == PLACEHOLDER and reply["text"] == RESET_ANSWER
    edits = [call.params["text"] for call in api.calls_of("chat.update")]
    assert len(edits) >= 2 and edits[-1] == RESET_ANSWER  # partial edits, then the whole reply
    assert all(RESET_ANSWER.startswith(edit.removesuffix(" …")) for edit in edits[:-1])


async def test_a_model_failure_gets_an_apology_in_the_thread(
    database: Database, api: FakeSlackWebApi, http_session: aiohttp.ClientSession
) -> None:
    class BrokenModel:
        version = "broken"

        async def generate(
            self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
        ) -> str:
            raise RuntimeError("out of memory")

    async with running_slack(build_pipeline(database, BrokenModel()), api, http_session) as harness:
        await harness.event(mention(RESET_QUESTION, ts="1700000130.000100"))
        await harness.settled()
    (reply,) = api.posted()
    assert reply["thread_ts"] == "1700000130.000100"
    assert reply["text"] == APOLOGY


async def test_mentions_are_stored_as_ids_and_names_are_looked_up_once_per_author(
    slack: SlackHarness,
) -> None:
    slack.api.users["U7"] = {"id": "U7", "name": "ada", "profile": {"display_name": "Ada L."}}
    slack.api.users["U8"] = {"id": "U8", "name": "jane", "profile": {"display_name": "Jane Doe"}}
    root = "1700000140.000100"
    await slack.event(mention(RESET_QUESTION, ts=root, user="U7"))
    await slack.settled()
    asked = f"<@U8|jane> asks: {REFUND_QUESTION} cc <@U7>"
    await slack.event(channel_message(asked, ts="1700000141.0001", thread_ts=root))
    await slack.settled()
    await slack.event(channel_message("Thanks!", ts="1700000142.0001", thread_ts=root, user="U7"))
    await slack.settled()

    # Authors are looked up once each; a mentioned person is not looked up at all.
    looked_up = [call.params["user"] for call in slack.api.calls_of("users.info")]
    assert sorted(looked_up) == sorted(["U7", USER])
    users = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert users[1].text == f"<@U8> asks: {REFUND_QUESTION} cc <@U7>"
    assert not any("Jane" in row.text or "Ada" in row.text for row in slack.rows(MessageRecord))
    assert [row.author_name for row in users] == ["Ada L.", f"Person {USER}", "Ada L."]


# --------------------------------------------------------------------------- bad input


async def test_bad_signatures_and_stale_timestamps_get_401(slack: SlackHarness) -> None:
    body = json.dumps(event_callback(mention(RESET_QUESTION, ts="1700000150.000100")))
    forged = {"X-Slack-Signature": "v0=" + "0" * 64}
    assert (await slack.post(body, headers=forged))[0] == 401
    six_minutes_ago = int(time.time()) - 6 * 60
    assert (await slack.post(body, timestamp=six_minutes_ago))[0] == 401
    assert (await slack.post(body, headers={"X-Slack-Request-Timestamp": "soon"}))[0] == 401
    unsigned = await slack.http.post(slack.events_url, data=body)
    assert unsigned.status == 401
    unsigned.release()
    await slack.settled()
    assert slack.api.posted() == []
    assert slack.rows(MessageRecord) == []


async def test_malformed_and_unknown_requests_are_refused_and_the_app_keeps_serving(
    slack: SlackHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    status, _ = await slack.post('{"type": "event_callback", "event": ')
    assert status == 400
    assert (await slack.post(b"\xff\xfe not utf-8"))[0] == 400
    unknown = event_callback({"type": "made_up_event", "ts": "1700000160.000100"})
    status, _ = await slack.post(json.dumps(unknown))
    assert 400 <= status < 500
    no_user = {"type": "message", "channel": CHANNEL, "ts": "1700000161.000100", "text": "hi"}
    assert await slack.event({**no_user, "channel_type": "im"}) == 200
    await slack.settled()
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "malformed" in logged
    assert "made_up_event" in logged or "Unhandled" in logged

    # Still serving.
    await slack.event(mention(RESET_QUESTION, ts="1700000162.000100"))
    await slack.settled()
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]


async def test_the_url_verification_challenge_is_answered(slack: SlackHarness) -> None:
    challenge = {"token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    status, body = await slack.post(json.dumps({**challenge, "type": "url_verification"}))
    assert status == 200
    assert challenge["challenge"] in body


async def test_a_100_kb_message_is_answered(slack: SlackHarness) -> None:
    filler = "Some context about my account. " * (100_000 // 31)
    text = f"{filler}{RESET_QUESTION}"
    assert len(text) >= 100_000
    assert await slack.event(mention(text, ts="1700000170.000100")) == 200
    await slack.settled()

    (reply,) = slack.api.posted()
    assert reply["thread_ts"] == "1700000170.000100"
    assert reply["text"] not in ("", PLACEHOLDER)
    (question,) = [row for row in slack.rows(MessageRecord) if row.role == "user"]
    assert question.text == text


def test_missing_credentials_are_a_clear_configuration_error() -> None:
    api = FakeSlackWebApi()
    with pytest.raises(ConfigurationError, match="SLACK_APP_TOKEN"):
        SlackAdapter(
            settings=slack_settings(api, slack_signing_secret=""),
            handler=None,  # type: ignore[arg-type]
            commands=None,  # type: ignore[arg-type]
        )


async def test_a_rejected_token_is_a_clear_configuration_error(
    database: Database, tiny_model: ReplyGenerator, api: FakeSlackWebApi
) -> None:
    api.fail("auth.test", times=1, error="invalid_auth")
    with pytest.raises(ConfigurationError, match="invalid_auth"):
        await start_adapter(api, build_pipeline(database, tiny_model))


# --------------------------------------------------------------------------- Socket Mode


async def test_socket_mode_end_to_end(
    database: Database, tiny_model: ReplyGenerator, api: FakeSlackWebApi
) -> None:
    socket_server = FakeSocketModeServer()
    await socket_server.start()
    api.socket_url = socket_server.url
    pipeline = build_pipeline(database, tiny_model)
    adapter = await start_adapter(
        api, pipeline, slack_app_token="xapp-test", slack_signing_secret=""
    )
    try:
        await socket_server.wait_connected()
        assert api.calls_of("apps.connections.open")
        root = "1700000180.000100"
        event = event_callback(mention(RESET_QUESTION, ts=root), event_id="EvSOCKET")
        first = await socket_server.send(kind="events_api", payload=event)
        await socket_server.wait_for_ack(first)
        # Slack redelivers over the socket when an ack is late: still one reply.
        again = await socket_server.send(kind="events_api", payload=event, retry_attempt=1)
        await socket_server.wait_for_ack(again)
        await api.wait_for(
            lambda: [m["text"] for m in api.posted()] == [RESET_ANSWER], what="the reply"
        )
        command = {
            "command": "/chatbot",
            "text": "status",
            "user_id": ADMIN,
            "user_name": "admin",
            "team_id": "T0TEAM",
            "channel_id": CHANNEL,
            "response_url": api.response_url,
        }
        envelope = await socket_server.send(kind="slash_commands", payload=command)
        await socket_server.wait_for_ack(envelope)
        await api.wait_for(lambda: bool(api.calls_of("response_url")), what="the status")
        await adapter.drain()
    finally:
        await adapter.stop()
        await socket_server.close()

    (reply,) = api.posted()
    assert reply["thread_ts"] == root
    assert api.calls_of("response_url")[0].params["text"].startswith("Model:")


async def test_a_rejected_app_token_or_a_busy_port_is_a_clear_configuration_error(
    slack: SlackHarness,
) -> None:
    slack.api.fail("apps.connections.open", times=1, error="invalid_auth")
    with pytest.raises(ConfigurationError, match="SLACK_APP_TOKEN: invalid_auth"):
        await start_adapter(slack.api, slack.pipeline, slack_app_token="xapp-revoked")
    with pytest.raises(ConfigurationError, match="SLACK_PORT"):
        await start_adapter(slack.api, slack.pipeline, slack_port=slack.adapter.port)


# --------------------------------------------------------------------------- stopping


async def test_request_stop_drains_the_reply_in_flight_and_refuses_new_events(
    database: Database,
    tiny_model: ReplyGenerator,
    api: FakeSlackWebApi,
    http_session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()

    class GatedModel:
        version = tiny_model.version

        async def generate(
            self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
        ) -> str | GeneratedReply:
            await gate.wait()
            return await tiny_model.generate(messages=messages, max_new_tokens=max_new_tokens)

    pipeline = build_pipeline(database, GatedModel())
    adapter = make_adapter(api, pipeline)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    running = asyncio.create_task(adapter.run())
    try:
        await api.wait_for(lambda: adapter.port is not None, what="the HTTP listener")
        await harness.event(mention(RESET_QUESTION, ts="1700000190.000100"))
        await api.wait_for(lambda: len(api.posted()) == 1, what="the placeholder")

        adapter.request_stop(drain_within=30.0)
        adapter.request_stop(drain_within=30.0)  # twice is fine
        # New requests get 503, so that Slack delivers them again (to another instance).
        assert await harness.event(mention(REFUND_QUESTION, ts="1700000191.000100")) == 503
        assert not running.done()
        gate.set()
        assert await asyncio.wait_for(running, 30) == 0
    finally:
        gate.set()
        if not running.done():
            running.cancel()
    assert [message["text"] for message in api.posted()] == [RESET_ANSWER]
    questions = [row.text for row in harness.rows(MessageRecord) if row.role == "user"]
    assert questions == [RESET_QUESTION]


async def test_request_stop_gives_up_on_replies_that_outlast_the_drain(
    database: Database, api: FakeSlackWebApi, http_session: aiohttp.ClientSession
) -> None:
    class StuckModel:
        version = "stuck"

        async def generate(
            self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
        ) -> str:
            await asyncio.Event().wait()
            return ""

    pipeline = build_pipeline(database, StuckModel())
    adapter = make_adapter(api, pipeline)
    harness = SlackHarness(adapter=adapter, api=api, pipeline=pipeline, http=http_session)
    running = asyncio.create_task(adapter.run())
    try:
        await api.wait_for(lambda: adapter.port is not None, what="the HTTP listener")
        await harness.event(mention(RESET_QUESTION, ts="1700000192.000100"))
        await api.wait_for(lambda: len(api.posted()) == 1, what="the placeholder")
        started = time.monotonic()
        adapter.request_stop(drain_within=0.3)
        assert await asyncio.wait_for(running, 10) == 0
        assert time.monotonic() - started < 5
    finally:
        if not running.done():
            running.cancel()
    (question,) = [row for row in harness.rows(MessageRecord) if row.role == "user"]
    assert question.answer_state != "answered"  # left for crash recovery, not half-answered


async def test_request_stop_closes_socket_mode_and_run_returns_0(
    database: Database, tiny_model: ReplyGenerator, api: FakeSlackWebApi
) -> None:
    socket_server = FakeSocketModeServer()
    await socket_server.start()
    api.socket_url = socket_server.url
    adapter = make_adapter(
        api,
        build_pipeline(database, tiny_model),
        slack_app_token="xapp-test",
        slack_signing_secret="",
    )
    running = asyncio.create_task(adapter.run())
    try:
        await socket_server.wait_connected()
        adapter.request_stop(drain_within=5.0)
        assert await asyncio.wait_for(running, 10) == 0
        await socket_server.wait_disconnected()
    finally:
        if not running.done():
            running.cancel()
        await socket_server.close()
