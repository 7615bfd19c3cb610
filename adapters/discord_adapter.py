"""The Discord adapter (discord.py): DMs, mentions, reply chains, threads, feedback, commands.

This module only translates: a Discord message becomes a :class:`adapters.routing.MessageEvent`
(edits, deletions and reactions become plain arguments), and a :class:`_Reply` says how to
answer it. What an event *is* (ignored, a command, a human agent's answer, a conversation turn)
is decided by :class:`adapters.routing.Router`, the same for every platform.

The bot takes part in DMs, messages that mention it, replies to its own messages, and messages
in a thread it started or already answered in. A conversation is a DM channel, a thread, or a
reply chain keyed by its root message. A reply to a message already stored joins that message's
conversation, so a chain longer than the history stays one conversation; for a reply to
messages not stored yet the chain is followed (at most ``HISTORY_TURNS`` messages), and what it
reaches is stored as context before the bot answers. Messages in a thread also carry the
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
  ``retrain``, ``rollback``) needs a configured admin: a user in ``DISCORD_ADMIN_IDS``, a member
  holding a ``DISCORD_ADMIN_ROLE_IDS`` role *in the guild the command came from* (role ids are
  per guild), or, when neither setting is configured, the owner of the bot's application (or
  the accepted admins and developers of the team owning it), fetched from Discord at ready.

Discord hides ``/chatbot-admin`` from members without Manage Server (``default_permissions``);
every command is checked again at run time, since server admins can change who sees a command.

Developer portal: enable the Message Content privileged intent. Bot permissions: View Channels,
Send Messages, Send Messages in Threads, Read Message History, Add Reactions; scopes ``bot`` and
``applications.commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import discord
from discord import app_commands

from adapters.discord_gateway import point_discord_py_at
from adapters.routing import (
    EventTasks,
    MessageEvent,
    RoutedHandler,
    Router,
    deliver_queued_replies,
)
from bot.commands import (
    ADMIN_ONLY,
    DESCRIPTIONS,
    Command,
    CommandRequest,
    Commands,
    parse_bang_command,
)
from bot.config import Settings
from bot.conversation import IncomingMessage, Platform, Role
from bot.replies import split_reply
from bot.service import PartialDelivery
from bot.storage import UndeliveredReply, conversation_thread_of

logger = logging.getLogger(__name__)

PLATFORM = Platform.DISCORD.value
MESSAGE_LIMIT = 2000  # characters per Discord message
REPLY_WAIT = 60.0  # seconds a reaction waits for replies in flight before giving up
TYPING_REFRESH = 8.0  # seconds; Discord shows "typing…" for about 10 s per trigger
RATINGS = {"👍": 1, "👎": -1}
CLOSE_DRAIN = 5.0  # seconds the messages kept while closing get to reach the database
LANDED_SCAN = 50  # messages after a question searched for a queued reply already posted
#: What a failed REST call raises: Discord's answer, or the connection to it.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (discord.HTTPException, aiohttp.ClientError)
DM_REFUSED = (
    "I couldn't send you the answer as a direct message. Allow direct messages from this "
    "server's members (Privacy Settings) and ask again, or use `/chatbot`."
)
_EMOJI_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")  # skin tones, variation selector
_ANSWERED_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
_THREAD_TYPES = frozenset(
    {
        discord.ChannelType.public_thread,
        discord.ChannelType.private_thread,
        discord.ChannelType.news_thread,
    }
)
_OWNING_TEAM_ROLES = frozenset({discord.TeamMemberRole.admin, discord.TeamMemberRole.developer})

#: The pipeline as this adapter uses it (kept under its old name for callers).
DiscordHandler = RoutedHandler


def discord_intents() -> discord.Intents:
    """Guilds, guild and DM messages with their content, and reactions."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    intents.guild_reactions = True
    intents.dm_reactions = True
    return intents


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
        self.store = commands.store
        self.tasks = EventTasks(platform=PLATFORM)
        self.admin_ids = frozenset(settings.discord_admin_ids)
        self.admin_role_ids = frozenset(settings.discord_admin_role_ids)
        self.agent_ids = frozenset(settings.discord_agent_ids)
        self.agent_role_ids = frozenset(settings.discord_agent_role_ids)
        self.history_limit = settings.history_turns
        self.client = _ChatbotClient(adapter=self, guild_ready_timeout=guild_ready_timeout)
        self._replying: set[asyncio.Task[Any]] = set()
        self._owner_ids: frozenset[str] | None = None
        self._owner_lock = asyncio.Lock()
        self._stopping: asyncio.Task[None] | None = None
        self.retry_interval = (
            settings.delivery_retry_seconds if retry_interval is None else retry_interval
        )
        self._retry_loop: asyncio.Task[None] | None = None

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
                await self.client.start(self.settings.discord_bot_token)
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
        if not await self.tasks.drain(within=drain_within):
            # What they stored stays in the database, for crash recovery to finish.
            stopped = await self.tasks.cancel()
            logger.warning(
                "discord: %d event%s still running after %ss were stopped",
                stopped,
                "" if stopped == 1 else "s",
                drain_within,
            )
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

    def take_message(self, message: discord.Message) -> None:
        """Answer ``message`` in a tracked task; while stopping, keep it for the next start
        (Discord never sends it again)."""
        if self.tasks.accepting:
            self.take(self.on_message(message), what="message")
        else:
            self.tasks.spawn(self.keep_for_later(message), what="late message", even_if_closed=True)

    async def keep_for_later(self, message: discord.Message) -> None:
        """While stopping: store a message the bot would answer, unanswered and claimed by
        nobody, for the recovery pass of the next start (see :meth:`Router.defer`)."""
        if message.type not in _ANSWERED_TYPES:
            return
        event, earlier = await self.translate(message)

        async def load_context() -> list[IncomingMessage]:
            return await self._context(message, earlier, event)

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
        if not self.admin_ids and not self.admin_role_ids:
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
        if message.type not in _ANSWERED_TYPES:
            return  # joins, pins, thread-created notices: nothing anyone said
        event, earlier = await self.translate(message)
        reply = _Reply(message=message)

        async def load_context() -> list[IncomingMessage]:
            return await self._context(message, earlier, event)

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
        is_direct = _is_direct(message.channel)
        text = self._plain_text(message.content)
        reference = _reply_reference(message)

        channel: Any = message.channel
        chain: list[discord.Message] = []
        parent_channel = ""
        if not from_bot:
            channel = await self._resolved_channel(message)
        is_thread = isinstance(channel, discord.Thread)
        if is_direct:
            thread = ""
        elif is_thread:
            thread = str(channel.id)
            parent_channel = str(channel.parent_id)
        elif from_bot:
            thread = str(message.id)  # never routed: no need to find its chain
        else:
            chain, thread = await self._reply_chain(message)

        parent = _referenced(reference)
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
            author_manages_channel=is_command and _manages_guild(author, guild_id=guild_id),
            replied_to=str(reference.message_id) if reference is not None else None,
        )
        return event, chain

    async def _resolved_channel(self, message: discord.Message) -> Any:
        """The message's channel; a guild channel missing from the cache is fetched (threads)."""
        channel = message.channel
        if isinstance(channel, discord.PartialMessageable) and channel.guild_id is not None:
            try:
                return await self.client.fetch_channel(channel.id)
            except discord.HTTPException as error:
                logger.warning("could not fetch Discord channel %s: %s", channel.id, error)
        return channel

    async def _reply_chain(self, message: discord.Message) -> tuple[list[discord.Message], str]:
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
        while (reference := _reply_reference(current)) is not None:
            parent_id = str(reference.message_id)
            known = await self.store.run(
                conversation_thread_of,
                platform=PLATFORM,
                channel=str(message.channel.id),
                platform_message_id=parent_id,
            )
            if known is not None:
                return chain, known
            root = parent_id
            if len(chain) >= self.history_limit:
                break
            parent = _referenced(reference)
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

    async def _context(
        self, message: discord.Message, chain: Sequence[discord.Message], event: MessageEvent
    ) -> list[IncomingMessage]:
        """The earlier human messages of ``event``'s conversation, oldest first: its reply
        chain, or the thread's or DM's recent messages."""
        incoming = event.message
        earlier = list(chain)
        if not earlier and (incoming.is_direct or incoming.parent_channel):
            earlier = await self._recent_messages(message)
        guild_id = message.guild.id if message.guild else None
        context = []
        for found in reversed(earlier):
            if found.author.bot or found.type not in _ANSWERED_TYPES:
                continue  # our own replies are stored already; other bots are not turns
            text = self._plain_text(found.content)
            if parse_bang_command(text) is not None:
                continue  # commands to the bot are not conversation
            is_agent = self.user_is_agent(found.author, guild_id=guild_id)
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

    def _plain_text(self, content: str) -> str:
        """Content without the bot's own mention. Other people's mentions stay as Discord
        writes them (``<@123…>``): a display name would put a person's name into the stored
        text, which the export's ``<USER>`` redaction cannot recognise."""
        bot_id = self.client.user.id if self.client.user else 0
        text = re.sub(rf"<@!?{bot_id}>", "", content)
        return re.sub(r"[ \t]{2,}", " ", text).strip()

    # ------------------------------------------------------------------ who is who

    def user_is_agent(self, user: discord.abc.User, *, guild_id: int | None) -> bool:
        """A human agent: listed by id, or holding an agent role in this guild."""
        if str(user.id) in self.agent_ids:
            return True
        return bool(self.agent_role_ids & _role_ids_in(user, guild_id=guild_id))

    async def user_is_admin(self, user: discord.abc.User, *, guild_id: int | None) -> bool:
        """A configured admin (see the module docstring): may change the shared model and its
        data. ``guild_id``: the guild the command came from (``None`` for DMs)."""
        if str(user.id) in self.admin_ids:
            return True
        if self.admin_role_ids & _role_ids_in(user, guild_id=guild_id):
            return True
        if self.admin_ids or self.admin_role_ids:
            return False
        return str(user.id) in await self.application_owner_ids()

    async def application_owner_ids(self) -> frozenset[str]:
        """Who owns the bot's application, cached: discord.py fetches the application at login;
        when it could not, Discord is asked here (and again next time while it cannot tell)."""
        async with self._owner_lock:
            if self._owner_ids is None:
                info = self.client.application
                if info is None:
                    try:
                        info = await self.client.application_info()
                    except TRANSIENT_ERRORS as error:
                        logger.warning(
                            "could not fetch the Discord application's owners: %s", error
                        )
                        return frozenset()
                self._owner_ids = _owners(info)
            return self._owner_ids

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
            post=self._post_queued,
            transient_errors=TRANSIENT_ERRORS,
        )

    async def _post_queued(self, pending: UndeliveredReply) -> str | None:
        """Post one queued reply: edit its placeholder (the start of it already on Discord)
        when it has one, then post the remaining chunks as replies to the question."""
        channel = self.client.get_partial_messageable(int(pending.channel))
        chunks = split_reply(pending.text, limit=MESSAGE_LIMIT) or ["…"]
        first_id: str | None = None
        if not pending.placeholder_id:
            # Posted before, with no id recorded (the bot died while Discord answered): the
            # messages already there are the reply's start; only the rest is posted.
            landed = await self._landed(channel, pending, chunks)
            if landed:
                first_id, chunks = landed[0], chunks[len(landed) :]
        if pending.placeholder_id:
            try:
                await channel.get_partial_message(int(pending.placeholder_id)).edit(
                    content=chunks[0]
                )
            except discord.NotFound:
                logger.warning(
                    "the start of reply %d was deleted from Discord; posting it in full",
                    pending.answer_id,
                )
            else:
                first_id, chunks = pending.placeholder_id, chunks[1:]
        reference = (
            discord.MessageReference(
                message_id=int(pending.in_reply_to),
                channel_id=int(pending.channel),
                fail_if_not_exists=False,
            )
            if pending.in_reply_to
            else None
        )
        for chunk in chunks:
            sent = await channel.send(
                chunk,
                reference=reference,  # type: ignore[arg-type]
                allowed_mentions=_allowed_mentions(ping=first_id is None),
            )
            first_id = first_id or str(sent.id)
        return first_id

    async def _landed(
        self, channel: discord.PartialMessageable, pending: UndeliveredReply, chunks: list[str]
    ) -> list[str]:
        """The ids of the bot's messages replying to ``pending``'s question that already show
        its first chunks, in order (none when it has no question or Discord cannot tell)."""
        bot_user = self.client.user
        if not pending.in_reply_to or bot_user is None:
            return []
        question = int(pending.in_reply_to)
        replies: list[discord.Message] = []
        try:
            # Replies follow their question closely: the messages right after it suffice.
            async for message in channel.history(limit=LANDED_SCAN, after=discord.Object(question)):
                reference = message.reference
                if message.author.id == bot_user.id and (
                    reference is not None and reference.message_id == question
                ):
                    replies.append(message)
        except discord.HTTPException as error:
            # Posting the reply (perhaps twice) beats losing it.
            logger.warning("could not look for reply %d on Discord: %s", pending.answer_id, error)
            return []
        landed: list[str] = []
        for message, chunk in zip(replies, chunks, strict=False):
            if message.content != chunk:
                break
            landed.append(str(message.id))
        return landed


class _Reply:
    """How one Discord message is answered: typing, the streamed and split reply, and private
    answers to commands (the router's :class:`adapters.routing.Replier`)."""

    def __init__(self, *, message: discord.Message) -> None:
        self.message = message
        self.first: discord.Message | None = None
        self._typing: asyncio.Task[None] | None = None

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        """Typing first (no message, so no id), then the first chunk, posted and edited."""
        if not text:
            await self._start_typing()
            return str(self.first.id) if self.first is not None else None
        shown = split_reply(text, limit=MESSAGE_LIMIT)[0]
        if self.first is None:
            self.first = await self._post(shown, ping=True)
        elif self.first.content != shown:
            self.first = await self.first.edit(content=shown)
        return str(self.first.id)

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str:
        """Post (or finish streaming) the reply; the id of its first message, which carries it.

        Raises :class:`PartialDelivery` when its start is on Discord but not all of it.
        """
        self.stop_typing()
        chunks = split_reply(text, limit=MESSAGE_LIMIT) or ["…"]
        if self.first is None:
            self.first = await self._post(chunks[0], ping=True)  # fails: nothing was posted
        first_id = str(self.first.id)
        try:
            if self.first.content != chunks[0]:
                self.first = await self.first.edit(content=chunks[0])
            for chunk in chunks[1:]:
                await self._post(chunk, ping=False)
        except Exception as error:
            raise PartialDelivery(first_id, str(error)) from error
        return first_id

    async def send_private(self, *, text: str) -> None:
        """In a DM, reply there; in a server, send the answer to the asker as a DM."""
        chunks = split_reply(text, limit=MESSAGE_LIMIT) or ["Done."]
        if _is_direct(self.message.channel):
            for index, chunk in enumerate(chunks):
                await self._post(chunk, ping=index == 0)
            return
        try:
            direct = await self.message.author.create_dm()
            for chunk in chunks:
                await direct.send(chunk, allowed_mentions=_allowed_mentions(ping=False))
        except discord.Forbidden as error:
            # The asker does not take DMs from server members: say so, not what was asked.
            logger.warning("could not DM Discord user %s: %s", self.message.author.id, error)
            await self._post(DM_REFUSED, ping=True)

    async def _post(self, text: str, *, ping: bool) -> discord.Message:
        return await self.message.channel.send(
            text,
            reference=self.message.to_reference(fail_if_not_exists=False),
            allowed_mentions=_allowed_mentions(ping=ping),
        )

    async def _start_typing(self) -> None:
        if self._typing is not None:
            return
        # The first trigger is awaited, like Slack's placeholder: the indicator is up before
        # generation starts, and a stop at this point leaves nothing behind on Discord.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.message.channel.typing()
        self._typing = asyncio.create_task(self._keep_typing())

    def stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None

    async def _keep_typing(self) -> None:
        # Typing is cosmetic: whatever stops it (Discord, the connection, a closed client)
        # must not surface as an error.
        with contextlib.suppress(*TRANSIENT_ERRORS, RuntimeError):
            while True:
                await asyncio.sleep(TYPING_REFRESH)  # one trigger is shown for about 10 s
                await self.message.channel.typing()


class _ChatbotClient(discord.Client):
    """discord.Client wired to the adapter, with the ``/chatbot`` command groups."""

    def __init__(self, *, adapter: DiscordAdapter, guild_ready_timeout: float) -> None:
        super().__init__(
            intents=discord_intents(),
            allowed_mentions=_allowed_mentions(ping=True),
            guild_ready_timeout=guild_ready_timeout,
        )
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)
        everyone = app_commands.Group(name="chatbot", description="Talk to the chat bot")
        admins = app_commands.Group(
            name="chatbot-admin",
            description="Manage the chat bot (admins)",
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        for command in Command:
            group = admins if command in ADMIN_ONLY else everyone
            group.add_command(self._slash(command))
        self.tree.add_command(everyone)
        self.tree.add_command(admins)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]

    def _slash(self, command: Command) -> app_commands.Command[Any, ..., None]:
        @app_commands.describe(arguments="what follows the command word, if it takes any")
        async def callback(interaction: discord.Interaction, arguments: str = "") -> None:
            if not self.adapter.tasks.accepting:
                logger.warning("discord: stopping, so a slash command was not taken")
                return
            # discord.py runs this in a task of its own: tracked so a shutdown waits for it.
            untrack = self.adapter.tasks.track_current()
            try:
                await self.adapter.slash_command(interaction, command, arguments=arguments)
            finally:
                untrack()

        return app_commands.Command(
            name=command.value, description=DESCRIPTIONS[command][:100], callback=callback
        )

    async def setup_hook(self) -> None:
        try:
            await self.tree.sync()
        except discord.HTTPException as error:
            logger.warning("could not register the /chatbot commands with Discord: %s", error)

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        logger.error("Discord command failed", exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            text = "Sorry, that command failed. The error is logged."
            if interaction.response.is_done():
                await interaction.edit_original_response(content=text)
            else:
                await interaction.response.send_message(text, ephemeral=True)

    # Each event is handled in a task of the adapter's (tracked, refused once stopping).

    async def on_ready(self) -> None:
        self.adapter.take(self.adapter.ready(), what="ready")

    async def on_resumed(self) -> None:
        self.adapter.take(self.adapter.deliver_queued(), what="resume")

    async def on_message(self, message: discord.Message) -> None:
        self.adapter.take_message(message)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        self.adapter.take(self.adapter.on_raw_message_edit(payload), what="edit")

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.adapter.take(self.adapter.on_raw_message_delete(payload), what="deletion")

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        self.adapter.take(self.adapter.on_raw_bulk_message_delete(payload), what="deletion")

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        self.adapter.take(self.adapter.on_raw_reaction(payload, added=True), what="reaction")

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        self.adapter.take(
            self.adapter.on_raw_reaction(payload, added=False), what="reaction removal"
        )

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        logger.exception("unhandled error in Discord event %s", event_method)


def _is_direct(channel: Any) -> bool:
    if isinstance(channel, discord.DMChannel | discord.GroupChannel):
        return True
    return isinstance(channel, discord.PartialMessageable) and channel.guild_id is None


def _reply_reference(message: discord.Message) -> discord.MessageReference | None:
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


def _referenced(reference: discord.MessageReference | None) -> discord.Message | None:
    """The message a reference points to, when the gateway included it or it is cached."""
    if reference is None:
        return None
    if isinstance(reference.resolved, discord.Message):
        return reference.resolved
    return reference.cached_message


def _role_ids_in(user: Any, *, guild_id: int | None) -> frozenset[str]:
    """The ids of ``user``'s roles in the guild ``guild_id``: none in DMs, and never a role of
    another guild (role ids are per guild)."""
    if guild_id is None or not isinstance(user, discord.Member) or user.guild.id != guild_id:
        return frozenset()
    return frozenset(str(role.id) for role in user.roles if role.guild.id == guild_id)


def _manages_guild(user: Any, *, guild_id: int | None) -> bool:
    """Manage Server in the guild the message came from (channel-local commands only)."""
    return (
        guild_id is not None
        and isinstance(user, discord.Member)
        and user.guild.id == guild_id
        and user.guild_permissions.manage_guild
    )


def _owners(info: discord.AppInfo) -> frozenset[str]:
    """The application's owner, or, for a team's application, its accepted admins and
    developers (as discord.py's own ``is_owner`` counts them) and the team's owner."""
    if info.team is None:
        return frozenset({str(info.owner.id)})
    members = {
        str(member.id)
        for member in info.team.members
        if member.membership_state == discord.TeamMembershipState.accepted
        and member.role in _OWNING_TEAM_ROLES
    }
    if info.team.owner_id is not None:
        members.add(str(info.team.owner_id))
    return frozenset(members)


def _allowed_mentions(*, ping: bool) -> discord.AllowedMentions:
    # Model output must never ping @everyone, roles or users; only the asker, once.
    return discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=ping)
