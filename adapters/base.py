"""The adapter contract.

An adapter turns platform events into :class:`bot.conversation.IncomingMessage` at the edge,
hands them to a :class:`MessageHandler` (the reply pipeline) and sends text back. Nothing
platform-shaped goes past the adapter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from bot.conversation import IncomingMessage
from bot.service import PipelineResult, ProgressSink, ReplySender
from bot.storage import UndeliveredReply


class MessageHandler(Protocol):
    """What adapters call for platform events (``bot.service.ReplyPipeline`` implements it)."""

    async def handle(
        self,
        message: IncomingMessage,
        *,
        send: ReplySender,
        progress: ProgressSink | None = None,
    ) -> PipelineResult: ...

    async def message_edited(
        self, *, platform: str, channel: str, message_id: str, text: str
    ) -> bool: ...

    async def message_deleted(self, *, platform: str, channel: str, message_id: str) -> bool: ...

    async def rating_added(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool: ...

    async def rating_removed(
        self, *, platform: str, channel: str, answer_message_id: str, rater_id: str, value: int
    ) -> bool: ...

    async def agent_answered(self, message: IncomingMessage) -> bool: ...

    async def bot_is_in_conversation(self, message: IncomingMessage) -> bool: ...

    async def undelivered_replies(self, *, platform: str) -> list[UndeliveredReply]: ...

    async def reply_delivered(self, *, answer_id: int, platform_message_id: str | None) -> None: ...

    async def reply_not_delivered(self, *, answer_id: int) -> None: ...

    async def reply_partly_delivered(
        self, *, answer_id: int, message_id: str, chunks_sent: int
    ) -> None:
        """A queued reply got further but not to its end: back into the queue, with how many
        chunks are complete (``bot.service.PartialDelivery``)."""
        ...


class Adapter(Protocol):
    """A running connection to one platform."""

    name: str

    async def run(self) -> int:
        """Serve until :meth:`request_stop` or the input ends; return a process exit status."""
        ...

    def request_stop(self, *, drain_within: float) -> None:
        """Stop taking new events, let the replies in flight finish (at most ``drain_within``
        seconds), close the connection; :meth:`run` then returns 0. Safe to call twice."""
        ...


@runtime_checkable
class ConnectsFirst(Protocol):
    """An adapter that connects before it serves (Discord's gateway): its platform's state
    (guilds, channels, members) arrives only then."""

    async def wait_until_ready(self) -> None:
        """Return once connected and the platform's first state is in."""
        ...
