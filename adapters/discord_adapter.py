"""The Discord adapter (discord.py): DMs, mentions, reply chains, threads, feedback, commands.

This module only translates: a Discord message becomes a :class:`adapters.routing.MessageEvent`
(edits, deletions and reactions become plain arguments), and a
:class:`adapters.discord_replies.DiscordReply` says how to answer it
(:mod:`adapters.discord_client` holds the discord.py client and its commands). What an event
*is* (ignored, a command, a human agent's answer, a conversation turn) is decided by
:class:`adapters.routing.Router`, the same for every platform.

The bot takes part in DMs, messages that mention it, replies to its own messages, and messages
in a thread it started or already answered in. A conversation is a DM channel, a thread, or a
reply chain keyed by its root message; :mod:`adapters.discord_conversations` finds it, and the
earlier messages stored as context before the bot answers. Messages in a thread also carry the
thread's parent channel, so a channel's ``training off`` covers its threads. Mentions of other
people are stored as Discord writes them (``<@123…>``), never as names; the bot's own mention is
dropped.

Replies reference the message they answer, are split at 2,000 characters, show a typing
indicator while generating (its first trigger sent before generation starts) and, when the
model streams, are edited as the text grows (at most once per
``PipelineOptions.progress_interval``). When the start of a reply is on Discord but the
rest cannot be sent, the sender raises :class:`bot.service.PartialDelivery`, and the retry edits
that message rather than posting the reply a second time. Stored replies not posted yet (a
crash, an outage, crash recovery) go out at every (re)connect and every
``DELIVERY_RETRY_SECONDS``; one whose first message was never recorded is first looked for
among the bot's replies to its question, so a post that reached Discord just before a crash is
not posted again. A message the bot would answer that arrives while it stops is stored,
unanswered, for the next start (Discord never sends it again). 👍/👎 reactions on a reply are
ratings. Edits and deletions are applied to the stored history.

Commands: ``/chatbot help|forget-me`` for everyone, ``/chatbot-admin <command>`` for admins, or
the same words as ``!word`` messages to the bot. Each delivery runs once (deduplicated in the
database, so a RESUME replay or a restart never runs it twice). Answers go to the asker alone:
slash commands answer ephemerally, ``!word`` in a server is answered by DM. Who may run what:

- Manage Server (for a member of the guild the command came from): only ``training off|on``,
  which touches that guild's channels alone;
- everything touching the shared model or its data (``status``, ``export``, ``correct``,
  ``retrain``, ``rollback``) needs a configured admin (by id, by role in the guild the command
  came from, or the application's owners; see :mod:`adapters.discord_people`).

Discord hides ``/chatbot-admin`` from members without Manage Server (``default_permissions``);
every command is checked again at run time, since server admins can change who sees a command.

Developer portal: enable the Message Content privileged intent; without it the bot says how,
and serves what Discord still shows it (DMs, mentions). At ready it logs its invite link, with
the scopes and permissions it needs (:mod:`adapters.discord_setup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine
from typing import Any

import discord

from adapters.discord_client import ChatbotClient
from adapters.discord_conversations import (
    ANSWERED_TYPES,
    DiscordConversations,
    plain_text,
    referenced,
    reply_reference,
)
from adapters.discord_gateway import point_discord_py_at
from adapters.discord_people import DiscordPeople, manages_guild
from adapters.discord_replies import (
    MESSAGE_LIMIT,
    TRANSIENT_ERRORS,
    DiscordReply,
    post_queued_reply,
)
from adapters.discord_replies import is_direct as channel_is_direct
from adapters.discord_setup import MESSAGE_CONTENT_OFF, invite_url
from adapters.routing import (
    EventTasks,
    MessageEvent,
    RoutedHandler,
    Router,
    deliver_queued_replies,
)
from bot.commands import (
    Command,
    CommandRequest,
    Commands,
    parse_bang_command,
)
from bot.config import Settings
from bot.conversation import IncomingMessage, Platform, Role
from bot.replies import split_reply
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

PLATFORM = Platform.DISCORD.value
REPLY_WAIT = 60.0  # seconds a reaction waits for replies in flight before giving up
RATINGS = {"👍": 1, "👎": -1}
CLOSE_DRAIN = 5.0  # seconds the messages kept while closing get to reach the database
_EMOJI_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")  # skin tones, variation selector
_THREAD_TYPES = frozenset(
    {
        discord.ChannelType.public_thread,
        discord.ChannelType.private_thread,
        discord.ChannelType.news_thread,
    }
)


def rating_for(emoji: discord.PartialEmoji) -> int | None:
    """+1 for 👍, -1 for 👎 (any skin tone), ``None`` for any other reaction."""
    if not emoji.is_unicode_emoji():
        return None
    return RATINGS.get(_EMOJI_MODIFIERS.sub("", emoji.name or ""))


class DiscordAdapter:
    """Serves the bot on Discord until :meth:`request_stop` (or a fatal gateway error)."""

    name = "discord"

    def __init__(
        self,
        *,
        settings: Settings,
        handler: RoutedHandler,
        commands: Commands,
        guild_ready_timeout: float = 2.0,
        retry_interval: float | None = None,
    ) -> None:
        """``guild_ready_timeout``: how long discord.py waits for more guilds before READY;
        ``retry_interval``: the seconds between two passes over the queue of stored replies
        not posted yet, besides the pass at every (re)connect (``DELIVERY_RETRY_SECONDS`` by
        default)."""
        self.settings = settings
        self.router = Router(handler=handler, commands=commands)
        self.tasks = EventTasks(platform=PLATFORM)
        self.client = ChatbotClient(adapter=self, guild_ready_timeout=guild_ready_timeout)
        self.people = DiscordPeople(client=self.client, settings=settings)
        self.conversations = DiscordConversations(
            client=self.client,
            store=commands.store,
            people=self.people,
            history_limit=settings.history_turns,
        )
        self._replying: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self.retry_interval = (
            settings.delivery_retry_seconds if retry_interval is None else retry_interval
        )
        self._retry_loop: asyncio.Task[None] | None = None
        self._invite_shown = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Connect and serve; 0 after :meth:`request_stop`, 2 when Discord refuses the bot."""
        if self._stopping is not None:
            return 0
        point_discord_py_at(
            api_url=self.settings.discord_api_url, gateway_url=self.settings.discord_gateway_url
        )
        try:
            async with self.client:
                await self.client.login(self.settings.discord_bot_token)
                try:
                    await self.client.connect()
                except discord.PrivilegedIntentsRequired:
                    if self._stopping is not None:
                        raise
                    # Discord still sends the content of DMs and of messages that mention the
                    # bot: serve those rather than exit (and be restarted, and exit again).
                    logger.warning(MESSAGE_CONTENT_OFF)
                    self.client.stop_asking_for_message_content()
                    await self.client.connect()
        except discord.LoginFailure:
            logger.error("Discord refused DISCORD_BOT_TOKEN; check the token in the portal")
            return 2
        except discord.PrivilegedIntentsRequired:
            logger.error(
                "Discord refused the Message Content intent; enable it for the bot in the "
                "developer portal (Bot → Privileged Gateway Intents)"
            )
            return 2
        finally:
            await self._stop_retrying()
        if self._stopping is not None:
            await self._stopping
        return 0

    def request_stop(self, *, drain_within: float) -> None:
        """Take no new events, let the replies in flight finish (at most ``drain_within``
        seconds), then disconnect; :meth:`run` returns 0. Safe to call twice."""
        if self._stopping is not None:
            return
        self.tasks.close()
        logger.warning("discord: stopping; finishing the replies in flight first")
        self._stopping = asyncio.get_running_loop().create_task(self._stop(drain_within))

    async def close(self, *, drain_within: float = 30.0) -> None:
        """:meth:`request_stop`, and wait until the client is closed."""
        self.request_stop(drain_within=drain_within)
        assert self._stopping is not None
        await self._stopping

    async def _stop(self, drain_within: float) -> None:
        await self._stop_retrying()
        # Connected while draining: the replies in flight still stream their edits.
        await self.tasks.finish(within=drain_within)
        await self.client.close()
        # Messages read just before the connection closed are still being kept for later.
        await self.tasks.drain(within=CLOSE_DRAIN)

    async def wait_until_ready(self) -> None:
        await self.client.wait_until_ready()

    async def wait_until_idle(self, *, within: float = 30.0) -> None:
        """Wait until the events received so far are handled (or ``within`` seconds pass)."""
        await self.tasks.drain(within=within)

    def take(self, work: Coroutine[Any, Any, None], *, what: str) -> None:
        """Handle one event in a tracked task (refused, with a log line, once stopping)."""
        self.tasks.spawn(work, what=what)

    def take_change(self, work: Coroutine[Any, Any, None], *, what: str) -> None:
        """Apply an edit, a deletion or a rating in a tracked task, while stopping too: they
        only touch the database, and Discord never sends them again (a deletion lost would
        keep what a person took back)."""
        self.tasks.spawn(work, what=what, even_if_closed=True)

    def take_message(self, message: discord.Message) -> None:
        """Answer ``message`` in a tracked task; while stopping, keep it for the next start
        (Discord never sends it again)."""
        if not message.content and not self.client.reads_message_content:
            return  # without the intent Discord withholds the text: nothing to answer
        if self.tasks.accepting:
            self.take(self.on_message(message), what="message")
        else:
            self.tasks.spawn(self.keep_for_later(message), what="late message", even_if_closed=True)

    async def keep_for_later(self, message: discord.Message) -> None:
        """While stopping: store a message the bot would answer, unanswered and claimed by
        nobody, for the recovery pass of the next start (see :meth:`Router.defer`)."""
        if message.type not in ANSWERED_TYPES:
            return
        event, earlier = await self.translate(message)

        async def load_context() -> list[IncomingMessage]:
            return await self.conversations.context(message, earlier, event)

        if await self.router.defer(event, load_context=load_context):
            logger.warning(
                "discord: stopping, so message %s is kept for the next start to answer",
                message.id,
            )
        elif not event.from_bot:
            logger.info("discord: stopping, so message %s was not taken", message.id)

    async def ready(self) -> None:
        """After (re)connecting: learn who owns the application, post the queued replies,
        and keep posting them every ``retry_interval`` (the replies recovery answers later)."""
        application_id = self.client.application_id
        if application_id is not None and not self._invite_shown:
            self._invite_shown = True
            logger.warning("Discord: add the bot to a server with %s", invite_url(application_id))
        if not self.people.admins_configured:
            await self.application_owner_ids()
        if self._retry_loop is None and self._stopping is None:
            self._retry_loop = asyncio.create_task(self._retry_queued_forever())
        await self.deliver_queued()

    async def _stop_retrying(self) -> None:
        retrying, self._retry_loop = self._retry_loop, None
        if retrying is not None:
            # A queued reply it was posting goes back into the queue (deliver_queued_replies).
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying

    async def _retry_queued_forever(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.deliver_queued()
            except Exception:
                logger.exception("discord: the retry queue pass failed")

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        if message.type not in ANSWERED_TYPES:
            return  # joins, pins, thread-created notices: nothing anyone said
        event, earlier = await self.translate(message)
        reply = DiscordReply(message=message)

        async def load_context() -> list[IncomingMessage]:
            return await self.conversations.context(message, earlier, event)

        task = asyncio.current_task()
        if task is not None:
            self._replying.add(task)
        try:
            await self.router.route(event, reply=reply, load_context=load_context)
        finally:
            reply.stop_typing()
            if task is not None:
                self._replying.discard(task)

    async def translate(
        self, message: discord.Message
    ) -> tuple[MessageEvent, list[discord.Message]]:
        """``message`` in the shared format, with the unstored messages of its reply chain
        (nearest first) for context."""
        bot_id = self.client.user.id if self.client.user else 0
        author = message.author
        from_bot = author.bot or author.id == bot_id
        guild_id = message.guild.id if message.guild else None
        is_direct = channel_is_direct(message.channel)
        text = self._plain_text(message.content)
        reference = reply_reference(message)

        channel: Any = message.channel
        chain: list[discord.Message] = []
        parent_channel = ""
        if not from_bot:
            channel = await self.conversations.resolved_channel(message)
        is_thread = isinstance(channel, discord.Thread)
        if is_direct:
            thread = ""
        elif is_thread:
            thread = str(channel.id)
            parent_channel = str(channel.parent_id)
        elif from_bot:
            thread = str(message.id)  # never routed: no need to find its chain
        else:
            chain, thread = await self.conversations.reply_chain(message)

        parent = referenced(reference)
        is_command = parse_bang_command(text) is not None
        incoming = IncomingMessage(
            platform=PLATFORM,
            workspace=str(guild_id or ""),
            channel=str(channel.id),
            thread=thread,
            author_id=str(author.id),
            author_name=author.display_name,
            role=Role.USER,
            text=text,
            timestamp=message.created_at,
            message_id=str(message.id),
            is_direct=is_direct,
            mentions_bot=any(user.id == bot_id for user in message.mentions),
            parent_channel=parent_channel,
        )
        event = MessageEvent(
            message=incoming,
            from_bot=from_bot,
            is_addressed=is_direct
            or incoming.mentions_bot
            or (parent is not None and parent.author.id == bot_id),
            in_thread=is_thread or reference is not None,
            bot_owns_thread=is_thread and getattr(channel, "owner_id", None) == bot_id,
            author_is_agent=not from_bot and self.user_is_agent(author, guild_id=guild_id),
            # Only commands need these; the owner lookup may take a REST call.
            author_is_admin=is_command and await self.user_is_admin(author, guild_id=guild_id),
            author_manages_channel=is_command and manages_guild(author, guild_id=guild_id),
            replied_to=str(reference.message_id) if reference is not None else None,
        )
        return event, chain

    def _plain_text(self, content: str) -> str:
        return plain_text(content, bot_id=self.client.user.id if self.client.user else 0)

    # ------------------------------------------------------------------ who is who

    def user_is_agent(self, user: discord.abc.User, *, guild_id: int | None) -> bool:
        """A human agent (see :mod:`adapters.discord_people`)."""
        return self.people.user_is_agent(user, guild_id=guild_id)

    async def user_is_admin(self, user: discord.abc.User, *, guild_id: int | None) -> bool:
        """A configured admin (see :mod:`adapters.discord_people`); ``guild_id``: the guild
        the command came from (``None`` for DMs)."""
        return await self.people.user_is_admin(user, guild_id=guild_id)

    async def application_owner_ids(self) -> frozenset[str]:
        """Who owns the bot's application (cached; see :mod:`adapters.discord_people`)."""
        return await self.people.application_owner_ids()

    # ------------------------------------------------------------------ edits, deletions, ratings

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data: dict[str, Any] = dict(payload.data)
        author = data.get("author") or {}
        if "content" not in data or author.get("bot"):
            return  # embeds resolving, or our own streamed edits
        await self.router.edited(
            platform=PLATFORM,
            channel=str(payload.channel_id),
            message_id=str(payload.message_id),
            text=self._plain_text(str(data["content"])),
        )

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.router.deleted(
            platform=PLATFORM, channel=str(payload.channel_id), message_id=str(payload.message_id)
        )

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            await self.router.deleted(
                platform=PLATFORM, channel=str(payload.channel_id), message_id=str(message_id)
            )

    async def on_raw_reaction(
        self, payload: discord.RawReactionActionEvent, *, added: bool
    ) -> None:
        bot_user = self.client.user
        value = rating_for(payload.emoji)
        if value is None or bot_user is None or payload.user_id == bot_user.id:
            return
        if payload.message_author_id not in (None, bot_user.id):
            return  # only the bot's replies are rated

        async def rate_once() -> bool:
            return await self.router.rated(
                platform=PLATFORM,
                channel=str(payload.channel_id),
                message_id=str(payload.message_id),
                rater_id=str(payload.user_id),
                value=value,
                added=added,
            )

        if await rate_once() or payload.message_author_id != bot_user.id:
            return
        # A reply is on Discord before its id is stored (while it streams, say): try again once
        # the replies being sent now are stored.
        replying = set(self._replying)
        if replying:
            await asyncio.wait(replying, timeout=REPLY_WAIT)
            await rate_once()

    # ------------------------------------------------------------------ slash commands

    async def slash_command(
        self, interaction: discord.Interaction, command: Command, *, arguments: str = ""
    ) -> None:
        """``/chatbot <command>`` or ``/chatbot-admin <command>``, answered only to the user."""
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
        except discord.HTTPException as error:
            # Discord refuses a second acknowledgement (a redelivered interaction, answered
            # already) and a late one (expired): nobody would see the answer, so do not run it.
            logger.warning("Discord interaction %s not acknowledged: %s", interaction.id, error)
            return
        user = interaction.user
        guild_id = interaction.guild_id
        channel_type = getattr(interaction.channel, "type", None)
        request = CommandRequest(
            command=command.value,
            arguments=arguments.strip(),
            platform=PLATFORM,
            workspace=str(guild_id or ""),
            channel=str(interaction.channel_id or ""),
            # In a thread, the thread is the conversation (``correct`` finds its last answer).
            thread=str(interaction.channel_id) if channel_type in _THREAD_TYPES else "",
            user_id=str(user.id),
            user_name=user.display_name,
            user_is_admin=await self.user_is_admin(user, guild_id=guild_id),
            # Discord computes these for the member in this channel; absent in DMs.
            user_manages_channel=guild_id is not None and interaction.permissions.manage_guild,
        )
        answer = await self.router.run_command(
            request, delivery_key=f"interaction:{interaction.id}"
        )
        if answer is None:
            return  # this delivery ran (and was answered) before
        chunks = split_reply(answer, limit=MESSAGE_LIMIT) or ["Done."]
        await interaction.edit_original_response(content=chunks[0])
        for chunk in chunks[1:]:
            await interaction.followup.send(chunk, ephemeral=True)

    # ------------------------------------------------------------------ retry queue

    async def deliver_queued(self) -> None:
        """Post stored replies whose sending failed earlier (after a restart or outage)."""
        await deliver_queued_replies(
            self.router.handler,
            platform=PLATFORM,
            post=self.post_queued_reply,
            transient_errors=TRANSIENT_ERRORS,
        )

    async def post_queued_reply(self, pending: UndeliveredReply) -> str | None:
        """Post one queued reply; returns the id of its first message (the one rated)."""
        bot_user = self.client.user
        return await post_queued_reply(
            self.client, pending, bot_user_id=bot_user.id if bot_user else None
        )
