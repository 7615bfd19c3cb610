"""A Slack thread's earlier messages, read when the bot is first called into the thread.

Someone mentioning the bot in a thread that was going on without it asks about that thread, so
its newest earlier messages become the question's context (stored before the bot answers).
Only people's messages count: not bots', not commands to the bot, not joins and the like.
Slack pages a thread oldest first with ``conversations.replies``; without the
``channels:history`` scope (or on any other API error) the bot answers from what it has.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from slack_sdk.errors import SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.routing import ContextLoader
from adapters.slack_format import (
    CONVERSATION_SUBTYPES,
    is_from_a_bot,
    stored_text,
    timestamp_of,
)
from adapters.slack_people import SlackPeople
from bot.commands import parse_bang_command
from bot.conversation import IncomingMessage, Role

logger = logging.getLogger(__name__)


class SlackThreadContext:
    """Loads a thread's newest earlier messages (at most ``history_limit``), ``page_size`` per
    ``conversations.replies`` call; :attr:`agent_ids` are human agents, not users."""

    def __init__(
        self,
        *,
        client: AsyncWebClient,
        people: SlackPeople,
        agent_ids: frozenset[str],
        history_limit: int,
        page_size: int = 200,
    ) -> None:
        self.client = client
        self.people = people
        self.agent_ids = agent_ids
        self.history_limit = history_limit
        self.page_size = page_size

    def loader(self, message: IncomingMessage, *, bot_user_id: str) -> ContextLoader:
        """Loads the messages of ``message``'s thread before it, oldest first, as turns of
        ``message``'s conversation (authors' display names looked up)."""

        async def load() -> list[IncomingMessage]:
            earlier = await self._earlier_messages(message, bot_user_id=bot_user_id)
            context = []
            for item in earlier:
                user_id, ts = str(item["user"]), str(item["ts"])
                context.append(
                    replace(
                        message,
                        author_id=user_id,
                        author_name=(await self.people.user(user_id)).name,
                        role=Role.HUMAN_AGENT if user_id in self.agent_ids else Role.USER,
                        text=stored_text(str(item.get("text") or ""), bot_user_id=bot_user_id),
                        timestamp=timestamp_of(ts),
                        message_id=ts,
                        event_id=None,
                        mentions_bot=False,
                    )
                )
            return context

        return load

    async def _earlier_messages(
        self, message: IncomingMessage, *, bot_user_id: str
    ) -> list[dict[str, Any]]:
        # Slack pages a thread oldest first; a long thread's newest turns are on its last
        # pages, so every page up to the question is read and only the newest are kept.
        kept: deque[dict[str, Any]] = deque(maxlen=self.history_limit)
        cursor: str | None = None
        while True:
            try:
                response = await self.client.conversations_replies(
                    channel=message.channel,
                    ts=message.thread,
                    limit=self.page_size,
                    cursor=cursor,
                )
            except SlackClientError as error:
                # Without channels:history the bot still answers, from what it has.
                logger.warning("Slack: could not read thread %s: %s", message.thread, error)
                break
            reached_question = False
            for earlier in response.get("messages") or []:
                if earlier.get("ts") == message.message_id:
                    reached_question = True  # the rest came after it
                    break
                if _is_context_turn(earlier, bot_user_id=bot_user_id):
                    kept.append(earlier)
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if reached_question or not response.get("has_more") or cursor is None:
                break
        return list(kept)


def _is_context_turn(earlier: Mapping[str, Any], *, bot_user_id: str) -> bool:
    """A person's message in a thread, not a command to the bot."""
    is_human_turn = earlier.get("subtype") in CONVERSATION_SUBTYPES
    has_ids = isinstance(earlier.get("ts"), str) and isinstance(earlier.get("user"), str)
    if not (is_human_turn and has_ids) or is_from_a_bot(earlier, bot_user_id=bot_user_id):
        return False
    return (
        parse_bang_command(stored_text(str(earlier.get("text") or ""), bot_user_id=bot_user_id))
        is None
    )
