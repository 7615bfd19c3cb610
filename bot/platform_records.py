"""What the pipeline records of platform events other than the messages it answers: edits,
deletions, ratings, context it is shown, agents' answers, and the delivery of queued replies.

:class:`bot.service.ReplyPipeline` is one of these; the adapters call these methods on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from bot.contracts import PipelineOptions
from bot.conversation import IncomingMessage, Role
from bot.storage import (
    AnswerState,
    DeliveryState,
    StorageError,
    Store,
    UndeliveredReply,
    bot_is_in_conversation,
    mark_message_deleted,
    record_agent_answer,
    record_incoming,
    remove_rating,
    set_delivery,
    set_rating,
    undelivered_replies,
    update_message_text,
)
from bot.storage.delivery import queue_partial_reply

logger = logging.getLogger(__name__)


class PlatformRecords:
    """Stores what platforms report besides the messages to answer (``store``, ``options``
    are the pipeline's)."""

    store: Store
    options: PipelineOptions

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
        # Stored as ignored in the same commit: not addressed to the bot, nothing waits for an
        # answer (a crash must not leave it looking unanswered to recovery).
        stored = await self.store.run(record_incoming, message=message, state=AnswerState.IGNORED)
        return stored is not None and stored.id is not None

    async def defer(self, message: IncomingMessage) -> bool:
        """Store ``message`` for the next instance to answer, without answering it: for a
        message that arrives while this instance stops (a platform that never redelivers it).

        It is stored pending and claimed by nobody, so the next recovery pass (of any
        instance) answers it while it is younger than ``unanswered_max_age`` and queues the
        reply; a later delivery of it is a duplicate. Returns ``False`` when nothing is left to
        answer: a duplicate, an empty message (stored as ignored), a message that is not a
        user's, or one over ``max_message_chars`` (its refusal is owed live, so it is not
        stored).
        """
        if message.role != Role.USER or len(message.text) > self.options.max_message_chars:
            return False
        stored = await self.store.run(record_incoming, message=message)
        return stored is not None and stored.answer_state == AnswerState.PENDING

    async def agent_answered(self, message: IncomingMessage) -> bool:
        """A human agent's reply in a bot conversation, stored as the answer it gives."""
        return await self.store.run(record_agent_answer, message=message) is not None

    async def bot_is_in_conversation(self, message: IncomingMessage) -> bool:
        """Whether the bot already answered in ``message``'s thread / reply chain."""
        return await self.store.run(bot_is_in_conversation, message=message)

    async def undelivered_replies(self, *, platform: str) -> list[UndeliveredReply]:
        """Claim stored replies whose sending failed, for the adapter to send again; report
        each with ``reply_delivered`` or ``reply_not_delivered``."""
        claiming = asyncio.ensure_future(
            self.store.run(
                undelivered_replies,
                platform=platform,
                pending_grace_seconds=self.options.delivery_grace,
            )
        )
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

    async def reply_partly_delivered(
        self, *, answer_id: int, message_id: str, chunks_sent: int
    ) -> None:
        """A claimed queued reply got further but not to its end (see
        :class:`PartialDelivery`): back into the queue with how far it got."""
        await self._queue_partial(answer_id, message_id, chunks_sent)

    # ------------------------------------------------------------------ delivery bookkeeping

    async def _queue_partial(self, answer_id: int, placeholder_id: str, chunks_sent: int) -> None:
        # The progress must reach the database, or the retry would post again the chunks
        # that are already on the platform.
        await self._record(
            f"queue reply {answer_id}",
            queue_partial_reply,
            answer_message_id=answer_id,
            placeholder_id=placeholder_id,
            chunks_sent=chunks_sent,
        )

    async def _set_delivery(
        self, answer_id: int, state: DeliveryState, platform_id: str | None
    ) -> None:
        await self._record(
            f"record delivery of reply {answer_id}",
            set_delivery,
            answer_message_id=answer_id,
            state=state,
            platform_message_id=platform_id,
        )

    async def _record(self, what: str, function: Callable[..., object], **kwargs: Any) -> None:
        """Write bookkeeping that must survive a cancellation under way (shielded); a database
        that is gone costs a warning, not the reply."""
        try:
            await asyncio.shield(self.store.run(function, **kwargs))
        except StorageError:
            logger.warning("could not %s (database unavailable)", what)
