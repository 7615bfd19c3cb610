"""The reply pipeline every adapter uses.

dedupe → store the incoming message → load the conversation history → format → generate →
store the reply and the exchange → hand the reply to the adapter to send.

The incoming message is committed before generation starts, so a failure later loses nothing:
the user gets a short apology, one trace is logged, and the message stays marked unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from bot.conversation import IncomingMessage, Role, to_chat_messages
from bot.storage import (
    AnsweredBy,
    AnswerState,
    DeliveryState,
    StorageError,
    Store,
    UndeliveredReply,
    bot_is_in_conversation,
    conversation_history,
    mark_message_deleted,
    record_agent_answer,
    record_answer,
    record_incoming,
    remove_rating,
    set_answer_state,
    set_delivery,
    set_rating,
    undelivered_replies,
    update_message_text,
)

logger = logging.getLogger(__name__)

APOLOGY = (
    "Sorry, something went wrong while I was answering. "
    "Your message is saved; please try again in a moment."
)
STORAGE_APOLOGY = (
    "Sorry, I can't reach my database right now, so I can't answer. Please try again in a moment."
)


class ReplyGenerator(Protocol):
    """Turns chat messages into the bot's reply (the model service implements this)."""

    version: str

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> str: ...


@runtime_checkable
class StreamingReplyGenerator(ReplyGenerator, Protocol):
    """A generator that can also yield its reply piece by piece as it is produced."""

    def stream(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> AsyncIterator[str]: ...


class PartialDelivery(Exception):
    """Raised by a :class:`ReplySender` that put the start of a reply on the platform (the
    message ``message_id``) but not all of it: the retry edits that message and sends the
    rest, so the reply is never posted twice."""

    def __init__(self, message_id: str, reason: str = "") -> None:
        super().__init__(f"reply only partly sent (first message {message_id}): {reason}")
        self.message_id = message_id


class ReplySender(Protocol):
    """Sends text back to where ``in_reply_to`` came from; returns the platform's message id."""

    async def __call__(self, *, text: str, in_reply_to: IncomingMessage) -> str | None: ...


class ProgressSink(Protocol):
    """Shows a reply while it is generated (a placeholder, then edits).

    Called once with ``text=""`` before generation starts, then with the text so far at most
    once per ``PipelineOptions.progress_interval`` seconds; the final text goes to the sender.
    Returns the platform id of the placeholder or partial reply once one is posted (``None``
    before that, or when the platform shows progress without a message, e.g. typing).
    """

    async def __call__(self, *, text: str, in_reply_to: IncomingMessage) -> str | None: ...


class Outcome(StrEnum):
    ANSWERED = "answered"
    DUPLICATE = "duplicate"  # already handled: no second reply
    IGNORED = "ignored"  # nothing to answer
    REFUSED = "refused"  # refused with a reason, told to the user
    FAILED = "failed"  # apologised; the message stays unanswered


@dataclass(frozen=True, slots=True)
class PipelineResult:
    outcome: Outcome
    reply: str | None = None
    message_id: int | None = None  # our database id of the incoming message
    exchange_id: int | None = None
    delivered: bool = False


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """The settings the pipeline needs (taken from :class:`bot.config.Settings`)."""

    system_prompt: str = ""
    max_new_tokens: int = 128
    history_turns: int = 20
    max_message_chars: int = 1_000_000
    bot_id: str = "chatbot"
    bot_name: str = "chatbot"
    progress_interval: float = 1.0  # seconds between streamed edits (platform rate limits)


class ReplyPipeline:
    """One async pipeline shared by every adapter."""

    def __init__(
        self, *, store: Store, generator: ReplyGenerator, options: PipelineOptions
    ) -> None:
        self.store = store
        self.generator = generator
        self.options = options

    async def handle(
        self,
        message: IncomingMessage,
        *,
        send: ReplySender,
        progress: ProgressSink | None = None,
    ) -> PipelineResult:
        """Answer ``message`` once, however often it is delivered.

        With ``progress``, the reply is streamed to it while it is generated (when the model
        can stream); ``send`` always gets the final text.
        """
        if len(message.text) > self.options.max_message_chars:
            reason = (
                f"Sorry, your message is too long for me ({len(message.text):,} characters; "
                f"the limit is {self.options.max_message_chars:,})."
            )
            logger.warning(
                "refused a %d-character message from %s", len(message.text), message.platform
            )
            delivered = await self._send_quietly(send, reason, message)
            return PipelineResult(Outcome.REFUSED, reply=reason, delivered=delivered)

        # Dedupe and store, committed before anything can fail later.
        try:
            stored = await self.store.run(record_incoming, message=message)
        except StorageError:
            logger.exception("could not store an incoming %s message", message.platform)
            delivered = await self._send_quietly(send, STORAGE_APOLOGY, message)
            return PipelineResult(Outcome.FAILED, reply=STORAGE_APOLOGY, delivered=delivered)
        if stored is None:
            logger.info(
                "duplicate delivery of %s message %s ignored", message.platform, message.message_id
            )
            return PipelineResult(Outcome.DUPLICATE)
        assert stored.id is not None
        if message.role != Role.USER or not message.text.strip():
            return PipelineResult(Outcome.IGNORED, message_id=stored.id)

        # History → prompt messages → generation.
        try:
            turns = await self.store.run(
                conversation_history,
                conversation_id=stored.conversation_id,
                up_to_message_id=stored.id,
                limit=self.options.history_turns,
            )
            chat = to_chat_messages(turns, system_prompt=self.options.system_prompt)
            reply = (await self._generate(chat, message, progress)).strip()
            if not reply:
                raise ValueError("the model produced an empty reply")
            answer, exchange = await self.store.run(
                record_answer,
                user_message_id=stored.id,
                text=reply,
                answered_by=AnsweredBy.BOT,
                author_id=self.options.bot_id,
                author_name=self.options.bot_name,
                model_version=self.generator.version,
            )
        except Exception:
            logger.exception("failed to answer %s message %s", message.platform, message.message_id)
            await self._mark_unanswered(stored.id)
            delivered = await self._send_quietly(send, APOLOGY, message)
            return PipelineResult(
                Outcome.FAILED, reply=APOLOGY, message_id=stored.id, delivered=delivered
            )

        # Send; the reply is already stored, so a failed send can be retried later.
        assert answer.id is not None
        try:
            platform_id = await send(text=reply, in_reply_to=message)
        except Exception:
            logger.exception(
                "failed to send the reply to %s message %s", message.platform, message.message_id
            )
            await self._set_delivery(answer.id, DeliveryState.FAILED, None)
            return PipelineResult(
                Outcome.ANSWERED, reply=reply, message_id=stored.id, exchange_id=exchange.id
            )
        await self._set_delivery(answer.id, DeliveryState.SENT, platform_id)
        return PipelineResult(
            Outcome.ANSWERED,
            reply=reply,
            message_id=stored.id,
            exchange_id=exchange.id,
            delivered=True,
        )

    async def _generate(
        self,
        chat: list[dict[str, str]],
        message: IncomingMessage,
        progress: ProgressSink | None,
    ) -> str:
        limit = self.options.max_new_tokens
        if progress is None:
            return await self.generator.generate(messages=chat, max_new_tokens=limit)
        await self._progress_quietly(progress, "", message)
        if not isinstance(self.generator, StreamingReplyGenerator):
            return await self.generator.generate(messages=chat, max_new_tokens=limit)
        text = ""
        shown = ""
        last_update = time.monotonic()
        async for piece in self.generator.stream(messages=chat, max_new_tokens=limit):
            text += piece
            now = time.monotonic()
            if now - last_update >= self.options.progress_interval and text.strip() != shown:
                shown = text.strip()
                last_update = now
                await self._progress_quietly(progress, shown, message)
        return text

    async def _progress_quietly(
        self, progress: ProgressSink, text: str, message: IncomingMessage
    ) -> None:
        # A failed placeholder or edit must not cost the reply itself.
        try:
            await progress(text=text, in_reply_to=message)
        except Exception as error:
            logger.warning("could not show reply progress on %s: %s", message.platform, error)

    # ------------------------------------------------------------------ other platform events

    async def message_edited(
        self, *, platform: str, channel: str, message_id: str, text: str
    ) -> bool:
        """A platform edit; ``False`` when the message was never stored."""
        return await self.store.run(
            update_message_text,
            platform=platform,
            channel=channel,
            platform_message_id=message_id,
            text=text,
        )

    async def message_deleted(self, *, platform: str, channel: str, message_id: str) -> bool:
        """A platform deletion: the message leaves the history and every future export."""
        return await self.store.run(
            mark_message_deleted, platform=platform, channel=channel, platform_message_id=message_id
        )

    async def rating_added(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool:
        """A 👍 (+1) or 👎 (-1) on a bot reply; ``False`` when it is not a stored answer."""
        return await self.store.run(
            set_rating,
            platform=platform,
            channel=channel,
            answer_message_id=answer_message_id,
            rater_id=rater_id,
            value=value,
        )

    async def rating_removed(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool:
        return await self.store.run(
            remove_rating,
            platform=platform,
            channel=channel,
            answer_message_id=answer_message_id,
            rater_id=rater_id,
            value=value,
        )

    async def remember(self, message: IncomingMessage) -> bool:
        """Store ``message`` as context without answering it; ``False`` for a duplicate.

        For messages the bot was not asked about but should see, such as the earlier messages
        of a reply chain or thread it is then called into.
        """
        stored = await self.store.run(record_incoming, message=message)
        if stored is None or stored.id is None:
            return False
        if stored.answer_state == AnswerState.PENDING.value:
            # Not addressed to the bot: nothing is waiting for an answer.
            await self.store.run(set_answer_state, message_id=stored.id, state=AnswerState.IGNORED)
        return True

    async def agent_answered(self, message: IncomingMessage) -> bool:
        """A human agent's reply in a bot conversation, stored as the answer it gives."""
        return await self.store.run(record_agent_answer, message=message) is not None

    async def bot_is_in_conversation(self, message: IncomingMessage) -> bool:
        """Whether the bot already answered in ``message``'s thread / reply chain."""
        return await self.store.run(bot_is_in_conversation, message=message)

    async def undelivered_replies(self, *, platform: str) -> list[UndeliveredReply]:
        """Claim stored replies whose sending failed, for the adapter to send again; report
        each with ``reply_delivered`` or ``reply_not_delivered``."""
        claiming = asyncio.ensure_future(self.store.run(undelivered_replies, platform=platform))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # The claims are made in a worker thread that finishes regardless: give them back
            # rather than leave them claimed by nobody.
            for reply in await claiming:
                await self._set_delivery(reply.answer_id, DeliveryState.FAILED, None)
            raise

    async def reply_delivered(self, *, answer_id: int, platform_message_id: str | None) -> None:
        await self._set_delivery(answer_id, DeliveryState.SENT, platform_message_id)

    async def reply_not_delivered(self, *, answer_id: int) -> None:
        """A claimed queued reply still could not be sent: back into the queue."""
        await self._set_delivery(answer_id, DeliveryState.FAILED, None)

    async def _send_quietly(self, send: ReplySender, text: str, message: IncomingMessage) -> bool:
        try:
            await send(text=text, in_reply_to=message)
        except Exception:
            logger.exception("failed to send a notice to %s", message.platform)
            return False
        return True

    async def _mark_unanswered(self, message_id: int) -> None:
        try:
            await self.store.run(
                set_answer_state, message_id=message_id, state=AnswerState.UNANSWERED
            )
        except StorageError:
            logger.warning(
                "could not mark message %d unanswered (database unavailable)", message_id
            )

    async def _set_delivery(
        self, answer_id: int, state: DeliveryState, platform_id: str | None
    ) -> None:
        try:
            await self.store.run(
                set_delivery,
                answer_message_id=answer_id,
                state=state,
                platform_message_id=platform_id,
            )
        except StorageError:
            logger.warning(
                "could not record delivery of reply %d (database unavailable)", answer_id
            )
