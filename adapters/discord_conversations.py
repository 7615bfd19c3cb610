"""Which conversation a Discord message belongs to, and the earlier messages that are its context.

A conversation is a DM channel, a thread, or a reply chain keyed by its root message. A reply
to a message already stored joins that message's conversation, so a chain longer than the
history stays one conversation; for a reply to messages not stored yet the chain is followed
(at most ``HISTORY_TURNS`` messages), and what it reaches becomes the context stored before the
bot answers. In a thread or a DM without a chain, the context is the channel's recent messages.
Only people's messages are context: not bots' (the bot's own replies are stored already), not
commands to the bot, not joins and the like.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import discord

from adapters.discord_people import DiscordPeople
from adapters.routing import MessageEvent
from bot.commands import parse_bang_command
from bot.conversation import IncomingMessage, Platform, Role
from bot.storage import Store, conversation_thread_of

logger = logging.getLogger(__name__)

#: The message types that are someone saying something (not joins, pins, thread notices).
ANSWERED_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


class DiscordConversations:
    """Finds a message's conversation and context, reading at most ``history_limit`` earlier
    messages (through ``client`` when the gateway did not include them)."""

    def __init__(
        self,
        *,
        client: discord.Client,
        store: Store,
        people: DiscordPeople,
        history_limit: int,
    ) -> None:
        self.client = client
        self.store = store
        self.people = people
        self.history_limit = history_limit

    async def resolved_channel(self, message: discord.Message) -> Any:
        """The message's channel; a guild channel missing from the cache is fetched (threads)."""
        channel = message.channel
        if isinstance(channel, discord.PartialMessageable) and channel.guild_id is not None:
            try:
                return await self.client.fetch_channel(channel.id)
            except discord.HTTPException as error:
                logger.warning("could not fetch Discord channel %s: %s", channel.id, error)
        return channel

    async def reply_chain(self, message: discord.Message) -> tuple[list[discord.Message], str]:
        """The unstored messages ``message`` replies to, nearest first, and its conversation's
        root.

        A reply to a stored message takes that message's conversation: no walk, and a chain
        longer than the history stays one conversation. Otherwise ``message.reference`` is
        followed through at most ``history_limit`` messages (fetching what the gateway did not
        include) until a stored one; the last id reached is the root. A message that cannot be
        fetched ends the chain with a warning; its id still serves as the root, so the
        conversation stays the same once it is reachable.
        """
        chain: list[discord.Message] = []
        root = str(message.id)
        current = message
        while (reference := reply_reference(current)) is not None:
            parent_id = str(reference.message_id)
            known = await self.store.run(
                conversation_thread_of,
                platform=Platform.DISCORD.value,
                channel=str(message.channel.id),
                platform_message_id=parent_id,
            )
            if known is not None:
                return chain, known
            root = parent_id
            if len(chain) >= self.history_limit:
                break
            parent = referenced(reference)
            if parent is None:
                try:
                    parent = await message.channel.fetch_message(int(parent_id))
                except discord.HTTPException as error:
                    logger.warning(
                        "reply chain of Discord message %s is partial: could not fetch %s (%s)",
                        message.id,
                        parent_id,
                        error,
                    )
                    break
            chain.append(parent)
            current = parent
        return chain, root

    async def context(
        self, message: discord.Message, chain: Sequence[discord.Message], event: MessageEvent
    ) -> list[IncomingMessage]:
        """The earlier human messages of ``event``'s conversation, oldest first: its reply
        chain, or the thread's or DM's recent messages."""
        incoming = event.message
        earlier = list(chain)
        if not earlier and (incoming.is_direct or incoming.parent_channel):
            earlier = await self._recent_messages(message)
        guild_id = message.guild.id if message.guild else None
        bot_id = self.client.user.id if self.client.user else 0
        context = []
        for found in reversed(earlier):
            if found.author.bot or found.type not in ANSWERED_TYPES:
                continue  # our own replies are stored already; other bots are not turns
            text = plain_text(found.content, bot_id=bot_id)
            if parse_bang_command(text) is not None:
                continue  # commands to the bot are not conversation
            is_agent = self.people.user_is_agent(found.author, guild_id=guild_id)
            context.append(
                replace(
                    incoming,
                    author_id=str(found.author.id),
                    author_name=found.author.display_name,
                    role=Role.HUMAN_AGENT if is_agent else Role.USER,
                    text=text,
                    timestamp=found.created_at,
                    message_id=str(found.id),
                    mentions_bot=False,
                )
            )
        return context

    async def _recent_messages(self, message: discord.Message) -> list[discord.Message]:
        """The thread's or DM's messages before ``message``, newest first (may be partial)."""
        found: list[discord.Message] = []
        try:
            async for earlier in message.channel.history(limit=self.history_limit, before=message):
                found.append(earlier)
        except discord.HTTPException as error:
            logger.warning("history before Discord message %s is partial: %s", message.id, error)
        return found


def plain_text(content: str, *, bot_id: int) -> str:
    """Content without the bot's own mention. Other people's mentions stay as Discord writes
    them (``<@123…>``): a display name would put a person's name into the stored text, which
    the export's ``<USER>`` redaction cannot recognise."""
    text = re.sub(rf"<@!?{bot_id}>", "", content)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def reply_reference(message: discord.Message) -> discord.MessageReference | None:
    """``message``'s reference when it replies to a message of the same channel."""
    reference = message.reference
    if (
        reference is None
        or reference.message_id is None
        or reference.type is not discord.MessageReferenceType.reply
        or reference.channel_id != message.channel.id
    ):
        return None
    return reference


def referenced(reference: discord.MessageReference | None) -> discord.Message | None:
    """The message a reference points to, when the gateway included it or it is cached."""
    if reference is None:
        return None
    if isinstance(reference.resolved, discord.Message):
        return reference.resolved
    return reference.cached_message
