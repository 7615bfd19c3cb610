"""One routing decision for every platform.

A platform module translates a platform event into the shared format (a :class:`MessageEvent`
for messages, plain arguments for edits, deletions and ratings) and says how to send text back
(a :class:`Replier`); the :class:`Router` decides, in one order for every platform, what the
event is, and hands it to the pipeline or to the commands:

1. ignored: the bot's own messages, other bots, chatter the bot is not part of;
2. a command (``!word``): deduplicated in the database, then run; the reply goes to the asker
   alone (``Replier.send_private``). An agent's command is a command, never an answer;
3. a human agent's answer in a bot conversation (not addressed to the bot): stored as the
   answer to the newest question;
4. a conversation turn: earlier context is stored first when the bot is new to the
   conversation, then the reply pipeline answers it.

The module also holds what both platforms share around the decision: tracking the tasks of the
events being handled (so a shutdown can drain them) and posting the queue of stored replies
that could not be sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from adapters.base import MessageHandler
from bot.commands import CommandRequest, Commands, parse_bang_command
from bot.conversation import IncomingMessage, Role
from bot.service import PartialDelivery
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)


class Route(StrEnum):
    """What the router made of a message."""

    IGNORED = "ignored"
    DUPLICATE_COMMAND = "duplicate command"  # a command delivery that already ran
    COMMAND = "command"
    AGENT_ANSWER = "agent answer"
    TURN = "turn"


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A platform message in the shared format, with the facts only the platform knows."""

    message: IncomingMessage  # role USER; the bot's own leading mention removed from the text
    from_bot: bool = False  # written by this bot or another bot
    is_addressed: bool = False  # a DM, a mention of the bot, a reply to one of its messages
    in_thread: bool = False  # in a thread or reply chain the bot may already be part of
    bot_owns_thread: bool = False  # a thread the bot started (Discord)
    author_is_agent: bool = False  # a human agent who answers on the bot's behalf
    author_is_admin: bool = False  # a configured admin (shared model and data)
    author_manages_channel: bool = False  # a moderator of this server (channel-local commands)
    replied_to: str | None = None  # platform id of the message this one replies to


class Replier(Protocol):
    """How one message is answered on its platform."""

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        """Post (or finish streaming) the reply; returns the platform id of the message that
        carries it (the one rated)."""
        ...

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        """Show the reply while it is generated (``""``: a placeholder or typing indicator);
        returns the platform id of the placeholder or partial reply once one is posted."""
        ...

    async def send_private(self, *, text: str) -> None:
        """Answer a command so that only the asker sees it (ephemeral, or a DM)."""
        ...

    async def attach(self, *, path: Path, text: str) -> None:
        """Post a file (a retrain's loss curve) with a line of text in the conversation."""
        ...


#: Loads the earlier messages of a conversation the bot is called into (oldest first).
ContextLoader = Callable[[], Awaitable[Sequence[IncomingMessage]]]

#: Adds to an event what costs the platform a call (the author's display name, whether they
#: moderate the channel); run only for events that are not ignored.
EventEnricher = Callable[[MessageEvent], Awaitable[MessageEvent]]


class RoutedHandler(MessageHandler, Protocol):
    """The pipeline as the router uses it: it also stores context without answering."""

    async def remember(self, message: IncomingMessage) -> bool: ...


@runtime_checkable
class DeferringHandler(Protocol):
    """A pipeline that can keep a message for the next start (see :meth:`Router.defer`)."""

    async def defer(self, message: IncomingMessage) -> bool: ...


class Router:
    """Decides what a platform event is and hands it on (see the module docstring)."""

    def __init__(self, *, handler: RoutedHandler, commands: Commands) -> None:
        self.handler = handler
        self.commands = commands

    async def decide(self, event: MessageEvent) -> Route:
        """The route for ``event``, without acting on it."""
        message = event.message
        if event.from_bot or message.role != Role.USER:
            return Route.IGNORED
        in_conversation = (
            event.is_addressed
            or event.bot_owns_thread
            or (event.in_thread and await self.handler.bot_is_in_conversation(message))
        )
        if not in_conversation:
            return Route.IGNORED
        if parse_bang_command(message.text) is not None:
            return Route.COMMAND
        if event.author_is_agent and not event.is_addressed:
            return Route.AGENT_ANSWER
        return Route.TURN

    async def route(
        self,
        event: MessageEvent,
        *,
        reply: Replier,
        load_context: ContextLoader | None = None,
        enrich: EventEnricher | None = None,
    ) -> Route:
        """Decide and act: run the command, store the agent's answer, or answer the turn.

        ``enrich`` completes an event that is not ignored before it is acted on, so that
        chatter the bot is not part of costs the platform no lookups.
        """
        decision = await self.decide(event)
        if decision != Route.IGNORED and enrich is not None:
            event = await enrich(event)
        message = event.message
        if decision == Route.COMMAND:
            word, arguments = parse_bang_command(message.text) or ("help", "")
            request = CommandRequest(
                command=word,
                arguments=arguments,
                platform=message.platform,
                workspace=message.workspace,
                channel=message.channel,
                thread=message.thread,
                user_id=message.author_id,
                user_name=message.author_name,
                user_is_admin=event.author_is_admin,
                user_manages_channel=event.author_manages_channel,
                replied_to=event.replied_to,
                message_id=message.message_id,
                progress=partial(_show_progress, reply, message),
                attach=partial(_attach, reply),
            )
            text = await self.run_command(
                request, delivery_key=f"message:{message.channel}:{message.message_id}"
            )
            if text is None:
                return Route.DUPLICATE_COMMAND
            await reply.send_private(text=text)
            return decision
        if decision == Route.AGENT_ANSWER:
            stored = await self.handler.agent_answered(replace(message, role=Role.HUMAN_AGENT))
            logger.info(
                "%s: agent %s answered in %s (%s)",
                message.platform,
                message.author_id,
                message.thread or message.channel,
                "stored" if stored else "duplicate or nothing to answer",
            )
            return decision
        if decision == Route.TURN:
            if load_context is not None and not await self.handler.bot_is_in_conversation(message):
                for earlier in await load_context():
                    await self.handler.remember(earlier)
            result = await self.handler.handle(message, send=reply.send, progress=reply.progress)
            logger.info(
                "%s: message %s in %s: %s",
                message.platform,
                message.message_id,
                message.channel,
                result.outcome,
            )
        return decision

    async def defer(
        self, event: MessageEvent, *, load_context: ContextLoader | None = None
    ) -> bool:
        """While stopping: keep a conversation turn for the next start instead of answering it
        (for a platform that never sends the event again); ``True`` when it was kept.

        The cheap part of :meth:`route` only: the decision, the earlier context when the bot
        is new to the conversation, and the message stored unclaimed, so the next instance's
        recovery pass answers it. Nothing is generated; commands and agents' answers are not
        taken (they are not stored as questions).
        """
        handler = self.handler
        if not isinstance(handler, DeferringHandler) or await self.decide(event) != Route.TURN:
            return False
        message = event.message
        if load_context is not None and not await handler.bot_is_in_conversation(message):
            for earlier in await load_context():
                await handler.remember(earlier)
        return await handler.defer(message)

    async def run_command(self, request: CommandRequest, *, delivery_key: str) -> str | None:
        """Run a command once per delivery; ``None`` when this delivery already ran.

        ``delivery_key`` names the delivery on its platform: the message for ``!word``
        commands, the trigger or interaction id for slash commands.
        """
        from bot.storage import claim_command

        first = await self.commands.store.run(
            claim_command,
            platform=request.platform,
            delivery_key=delivery_key,
            command=request.command,
        )
        if not first:
            logger.info("%s: command delivery %s already handled", request.platform, delivery_key)
            return None
        return await self.commands.run(request)

    # ------------------------------------------------------------------ other events

    async def edited(self, *, platform: str, channel: str, message_id: str, text: str) -> bool:
        """A person edited a message; ``False`` when it was never stored."""
        return await self.handler.message_edited(
            platform=platform, channel=channel, message_id=message_id, text=text
        )

    async def deleted(self, *, platform: str, channel: str, message_id: str) -> bool:
        """A message was deleted; it leaves the history and every future export."""
        return await self.handler.message_deleted(
            platform=platform, channel=channel, message_id=message_id
        )

    async def rated(
        self,
        *,
        platform: str,
        channel: str,
        message_id: str,
        rater_id: str,
        value: int,
        added: bool,
    ) -> bool:
        """A 👍 (+1) / 👎 (-1) added to or removed from a bot reply; ``False`` when the message
        is no stored answer."""
        change = self.handler.rating_added if added else self.handler.rating_removed
        return await change(
            platform=platform,
            channel=channel,
            answer_message_id=message_id,
            rater_id=rater_id,
            value=value,
        )


class EventTasks:
    """The tasks of the events being handled: started, tracked, drained on shutdown."""

    def __init__(self, *, platform: str) -> None:
        self.platform = platform
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def accepting(self) -> bool:
        return not self._closed

    def spawn(
        self, work: Coroutine[Any, Any, None], *, what: str, even_if_closed: bool = False
    ) -> bool:
        """Handle ``work`` in a tracked task; ``False`` (and ``work`` discarded) once closed.

        ``even_if_closed``: taken after :meth:`close` too, for cheap work that keeps an event
        for later (:meth:`drain` waits for it like the rest).
        """
        if self._closed and not even_if_closed:
            work.close()
            logger.warning("%s: stopping, so a %s was not taken", self.platform, what)
            return False
        task = asyncio.create_task(self._logged(work, what=what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def track_current(self) -> Callable[[], None]:
        """Track the running task (for events a library already runs in a task of its own);
        returns the function that stops tracking it."""
        task = asyncio.current_task()
        if task is None:
            return lambda: None
        self._tasks.add(task)
        return lambda: self._tasks.discard(task)

    def close(self) -> None:
        """Stop taking new events; the ones in flight go on."""
        self._closed = True

    async def drain(self, *, within: float | None = None) -> bool:
        """Wait for the events in flight; ``False`` when some were still running ``within``
        seconds later (they are left running)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while True:
            pending = {task for task in self._tasks if task is not asyncio.current_task()}
            if not pending:
                return True
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            if timeout == 0.0:
                return False
            await asyncio.wait(pending, timeout=timeout)

    async def cancel(self) -> int:
        """Cancel the events still in flight (a drain ran out of time); returns how many.

        What they stored stays in the database for crash recovery to finish or give up on.
        """
        pending = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    async def finish(self, *, within: float | None) -> None:
        """Drain for at most ``within`` seconds, then cancel what still runs (its stored
        messages stay in the database for crash recovery to finish)."""
        if await self.drain(within=within):
            return
        stopped = await self.cancel()
        logger.warning(
            "%s: %d event%s still running after %ss were stopped",
            self.platform,
            stopped,
            "" if stopped == 1 else "s",
            within,
        )

    async def _logged(self, work: Awaitable[None], *, what: str) -> None:
        try:
            await work
        except Exception:
            logger.exception("%s: failed to handle a %s", self.platform, what)


#: Posts one queued reply on its platform (replacing its placeholder when it has one);
#: returns the platform id of the message that carries it.
QueuedReplyPoster = Callable[[UndeliveredReply], Awaitable[str | None]]


async def deliver_queued_replies(
    handler: MessageHandler,
    *,
    platform: str,
    post: QueuedReplyPoster,
    transient_errors: tuple[type[BaseException], ...],
) -> int:
    """Post the stored replies of ``platform`` that were not sent yet; returns how many went.

    Each reply is claimed in the database first, so instances sharing it never both post one.
    A reply that fails with one of ``transient_errors`` goes back into the queue; so does one
    interrupted by anything else (a bug, a cancelled task), which is then re-raised. One that
    got part of the way (:class:`bot.service.PartialDelivery`) goes back with its progress,
    so the next pass posts only what is still missing.
    """
    delivered = 0
    for reply in await handler.undelivered_replies(platform=platform):
        try:
            platform_id = await post(reply)
        except PartialDelivery as partial:
            logger.warning(
                "%s: reply %d was posted only in part: %s", platform, reply.answer_id, partial
            )
            await handler.reply_partly_delivered(
                answer_id=reply.answer_id,
                message_id=partial.message_id,
                chunks_sent=partial.chunks_sent,
            )
            continue
        except transient_errors as error:
            logger.warning(
                "%s: reply %d still cannot be posted: %s", platform, reply.answer_id, error
            )
            await handler.reply_not_delivered(answer_id=reply.answer_id)
            continue
        except BaseException:
            await asyncio.shield(handler.reply_not_delivered(answer_id=reply.answer_id))
            raise
        await handler.reply_delivered(answer_id=reply.answer_id, platform_message_id=platform_id)
        delivered += 1
    if delivered:
        logger.warning(
            "%s: posted %d queued repl%s", platform, delivered, "y" if delivered == 1 else "ies"
        )
    return delivered


async def _show_progress(reply: Replier, message: IncomingMessage, text: str) -> None:
    """A long command's progress, posted in the conversation and then edited."""
    await reply.progress(text=text, in_reply_to=message)


async def _attach(reply: Replier, path: Path, text: str) -> None:
    await reply.attach(path=path, text=text)
