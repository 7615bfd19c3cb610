"""The router's decision table, driven directly: a recording handler and replier stand in for
the pipeline and the platform (the platform tests drive the same router end to end), commands
run on a real database."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from adapters.routing import EventTasks, MessageEvent, Route, Router
from bot.commands import Command, CommandRequest, Commands
from bot.conversation import IncomingMessage, Role
from bot.service import Outcome, PipelineResult, ProgressSink, ReplySender
from bot.storage import Database, Store, UndeliveredReply
from tests.conftest import make_message


@dataclass
class RecordingHandler:
    """The pipeline's surface, recording what the router hands it."""

    conversations_with_bot: set[str] = field(default_factory=set)  # threads the bot is in
    handled: list[IncomingMessage] = field(default_factory=list)
    remembered: list[IncomingMessage] = field(default_factory=list)
    agent_answers: list[IncomingMessage] = field(default_factory=list)

    async def handle(
        self, message: IncomingMessage, *, send: ReplySender, progress: ProgressSink | None = None
    ) -> PipelineResult:
        self.handled.append(message)
        await send(text=f"answer to {message.text}", in_reply_to=message)
        return PipelineResult(Outcome.ANSWERED)

    async def remember(self, message: IncomingMessage) -> bool:
        self.remembered.append(message)
        return True

    async def agent_answered(self, message: IncomingMessage) -> bool:
        self.agent_answers.append(message)
        return True

    async def bot_is_in_conversation(self, message: IncomingMessage) -> bool:
        return message.thread in self.conversations_with_bot

    async def message_edited(
        self, *, platform: str, channel: str, message_id: str, text: str
    ) -> bool:
        return True

    async def message_deleted(self, *, platform: str, channel: str, message_id: str) -> bool:
        return True

    async def rating_added(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool:
        return True

    async def rating_removed(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool:
        return True

    async def undelivered_replies(self, *, platform: str) -> list[UndeliveredReply]:
        return []

    async def reply_delivered(self, *, answer_id: int, platform_message_id: str | None) -> None:
        return None

    async def reply_not_delivered(self, *, answer_id: int) -> None:
        return None

    async def reply_partly_delivered(
        self, *, answer_id: int, message_id: str, chunks_sent: int
    ) -> None:
        return None


@dataclass
class RecordingReplier:
    sent: list[str] = field(default_factory=list)
    private: list[str] = field(default_factory=list)
    shown: list[tuple[str, str]] = field(default_factory=list)  # progress: (text, message id)

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        self.sent.append(text)
        return "reply-1"

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        self.shown.append((text, in_reply_to.message_id))
        return "placeholder-1"

    async def send_private(self, *, text: str) -> None:
        self.private.append(text)

    async def attach(self, *, path: Path, text: str) -> None:
        self.private.append(f"{text}: {path.name}")


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'chatbot.db'}")
    database.upgrade()
    yield database
    database.dispose()


def router_on(database: Database, handler: RecordingHandler) -> tuple[Router, list[CommandRequest]]:
    """A router whose ``training`` and ``correct`` commands record the request they got."""
    requests: list[CommandRequest] = []

    async def record(request: CommandRequest) -> str:
        requests.append(request)
        return f"ran {request.command}"

    commands = Commands(
        store=Store(database),
        model_version=lambda: "v1",
        actions={Command.TRAINING: record, Command.CORRECT: record},
    )
    return Router(handler=handler, commands=commands), requests


def event(text: str = "How do I reset my password?", **facts: object) -> MessageEvent:
    role = facts.pop("role", Role.USER)
    thread = str(facts.pop("thread", "T1"))
    message = make_message(text, platform="slack", thread=thread, role=role)  # type: ignore[arg-type]
    return MessageEvent(message=message, **facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "text", "route"),
    [
        ({"from_bot": True, "is_addressed": True}, "hi", Route.IGNORED),
        ({"is_addressed": True, "role": Role.ASSISTANT}, "hi", Route.IGNORED),
        ({}, "channel chatter", Route.IGNORED),
        ({"in_thread": True, "thread": "not-the-bots"}, "chatter in a thread", Route.IGNORED),
        ({"in_thread": True, "thread": "bot-thread"}, "a follow-up", Route.TURN),
        ({"bot_owns_thread": True, "thread": "new"}, "in the bot's thread", Route.TURN),
        ({"is_addressed": True}, "a question", Route.TURN),
        ({"is_addressed": True}, "!help", Route.COMMAND),
        ({}, "!help", Route.IGNORED),  # a command nobody addressed to the bot
        ({"in_thread": True, "thread": "bot-thread"}, "!status", Route.COMMAND),
        # An agent's command is a command, never an answer.
        (
            {"in_thread": True, "thread": "bot-thread", "author_is_agent": True},
            "!help",
            Route.COMMAND,
        ),
        (
            {"in_thread": True, "thread": "bot-thread", "author_is_agent": True},
            "Refunds take 30 days.",
            Route.AGENT_ANSWER,
        ),
        # An agent asking the bot itself is a turn like anyone's.
        (
            {
                "in_thread": True,
                "thread": "bot-thread",
                "author_is_agent": True,
                "is_addressed": True,
            },
            "What is the refund policy?",
            Route.TURN,
        ),
    ],
)
async def test_the_decision_table(
    sqlite_database: Database, facts: dict[str, object], text: str, route: Route
) -> None:
    handler = RecordingHandler(conversations_with_bot={"bot-thread"})
    router, _ = router_on(sqlite_database, handler)
    assert await router.decide(event(text, **facts)) == route


async def test_each_route_acts_and_only_a_turn_reaches_the_pipeline(
    sqlite_database: Database,
) -> None:
    handler = RecordingHandler(conversations_with_bot={"bot-thread"})
    router, _ = router_on(sqlite_database, handler)
    replier = RecordingReplier()

    assert await router.route(event("chatter"), reply=replier) == Route.IGNORED
    assert await router.route(event("!help", is_addressed=True), reply=replier) == Route.COMMAND
    agent = event(
        "Refunds take 30 days.", in_thread=True, thread="bot-thread", author_is_agent=True
    )
    assert await router.route(agent, reply=replier) == Route.AGENT_ANSWER
    assert await router.route(event("A question?", is_addressed=True), reply=replier) == Route.TURN

    assert [message.text for message in handler.handled] == ["A question?"]
    assert replier.sent == ["answer to A question?"]
    assert len(replier.private) == 1 and replier.private[0].startswith("Commands:")
    assert [(m.text, m.role) for m in handler.agent_answers] == [
        ("Refunds take 30 days.", Role.HUMAN_AGENT)
    ]


async def test_a_command_delivery_runs_once_even_through_another_router(
    database: Database,
) -> None:
    first, requests = router_on(database, RecordingHandler())
    second, _ = router_on(database, RecordingHandler())  # another instance, same database
    replier = RecordingReplier()
    command = event("!training off", is_addressed=True, author_is_admin=True)

    assert await first.route(command, reply=replier) == Route.COMMAND
    assert await second.route(command, reply=replier) == Route.DUPLICATE_COMMAND
    assert await first.route(command, reply=replier) == Route.DUPLICATE_COMMAND
    assert replier.private == ["ran training"]
    assert len(requests) == 1


async def test_a_command_request_carries_the_thread_the_reply_and_the_admin_facts(
    sqlite_database: Database,
) -> None:
    router, requests = router_on(sqlite_database, RecordingHandler())
    command = event(
        "!correct A better answer.",
        thread="T9",
        is_addressed=True,
        author_is_admin=True,
        replied_to="bot-reply-7",
    )
    await router.route(command, reply=RecordingReplier())

    (request,) = requests
    assert (request.command, request.arguments) == ("correct", "A better answer.")
    assert (request.thread, request.replied_to) == ("T9", "bot-reply-7")
    assert request.message_id == command.message.message_id
    assert request.user_is_admin and not request.user_manages_channel


async def test_a_long_commands_progress_is_shown_in_its_conversation(
    sqlite_database: Database,
) -> None:
    """The same for every platform: progress goes through the platform's placeholder (posted
    once, then edited: Slack chat.update, a Discord message edit) in the command's thread."""
    router, requests = router_on(sqlite_database, RecordingHandler())
    command = event(
        "!correct A better answer.", thread="T9", is_addressed=True, author_is_admin=True
    )
    replier = RecordingReplier()
    await router.route(command, reply=replier)
    (request,) = requests
    assert request.progress is not None
    await request.progress("step 1/10")
    await request.progress("step 10/10")
    message_id = command.message.message_id
    assert replier.shown == [("step 1/10", message_id), ("step 10/10", message_id)]


async def test_enrich_runs_only_for_events_that_are_not_ignored_and_its_facts_count(
    sqlite_database: Database,
) -> None:
    router, requests = router_on(sqlite_database, RecordingHandler())
    replier = RecordingReplier()
    enriched: list[str] = []

    async def as_moderator(routed: MessageEvent) -> MessageEvent:
        enriched.append(routed.message.text)
        return replace(
            routed,
            message=replace(routed.message, author_name="Wendy"),
            author_manages_channel=True,
        )

    await router.route(event("!training off"), reply=replier, enrich=as_moderator)  # chatter
    await router.route(
        event("!training off", is_addressed=True), reply=replier, enrich=as_moderator
    )

    assert enriched == ["!training off"]  # once: the ignored one cost no lookup
    (request,) = requests
    assert request.user_manages_channel and request.user_name == "Wendy"
    assert replier.private == ["ran training"]


async def test_context_is_loaded_only_when_the_bot_is_new_to_the_conversation(
    sqlite_database: Database,
) -> None:
    handler = RecordingHandler(conversations_with_bot={"bot-thread"})
    router, _ = router_on(sqlite_database, handler)
    loads: list[str] = []
    earlier = make_message("Earlier in the thread.", platform="slack", thread="new-thread")

    async def load_context() -> list[IncomingMessage]:
        loads.append("loaded")
        return [earlier]

    new = event("A question?", is_addressed=True, thread="new-thread")
    known = event("A follow-up?", is_addressed=True, thread="bot-thread")
    await router.route(new, reply=RecordingReplier(), load_context=load_context)
    await router.route(known, reply=RecordingReplier(), load_context=load_context)

    assert loads == ["loaded"]
    assert handler.remembered == [earlier]
    assert [m.text for m in handler.handled] == ["A question?", "A follow-up?"]


async def test_event_tasks_refuse_once_closed_drain_within_a_limit_and_cancel_the_rest() -> None:
    tasks = EventTasks(platform="slack")
    finished = asyncio.Event()
    stuck = asyncio.Event()

    async def quick() -> None:
        finished.set()

    async def forever() -> None:
        await stuck.wait()

    assert tasks.spawn(quick(), what="message")
    assert tasks.spawn(forever(), what="message")
    tasks.close()
    assert not tasks.accepting
    assert not tasks.spawn(quick(), what="message")  # refused, and the coroutine closed
    assert await tasks.drain(within=0.05) is False
    assert finished.is_set()
    assert await tasks.cancel() == 1
    assert await tasks.drain(within=0.05) is True
