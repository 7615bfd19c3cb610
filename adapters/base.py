"""The adapter contract.

An adapter turns platform events into :class:`bot.conversation.IncomingMessage` at the edge,
hands them to a :class:`MessageHandler` (the reply pipeline) and sends text back. Nothing
platform-shaped goes past the adapter.
"""

from __future__ import annotations

from typing import Protocol

from bot.conversation import IncomingMessage
from bot.service import PipelineResult, ReplySender


class MessageHandler(Protocol):
    """What adapters call for every incoming message (``bot.service.ReplyPipeline``)."""

    async def handle(self, message: IncomingMessage, *, send: ReplySender) -> PipelineResult: ...


class Adapter(Protocol):
    """A running connection to one platform."""

    name: str

    async def run(self) -> int:
        """Serve until stopped or the input ends; return a process exit status."""
        ...
