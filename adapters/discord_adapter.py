"""The Discord adapter (discord.py): DMs, mentions, reply chains, threads, feedback, commands.

This module only translates: a Discord message becomes a :class:`adapters.routing.MessageEvent`
(edits, deletions and reactions become plain arguments), and a
:class:`adapters.discord_replies.DiscordReply` says how to answer it
(:mod:`adapters.discord_client` holds the discord.py client and its commands). What an event
*is* (ignored, a command, a human agent's answer, a conversation turn) is decided by
:class:`adapters.routing.Router`, the same for every platform.

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

Developer portal: enable the Message Content privileged intent; without it the bot says how,
and serves what Discord still shows it (DMs, mentions). At ready it logs its invite link, with
the scopes and permissions it needs (:mod:`adapters.discord_setup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

import discord

from adapters.discord_client import ChatbotClient
from adapters.discord_gateway import point_discord_py_at
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
from bot.storage import UndeliveredReply, conversation_thread_of

logger = logging.getLogger(__name__)

PLATFORM = Platform.DISCORD.value
REPLY_WAIT = 60.0  # seconds a reaction waits for replies in flight before giving up
RATINGS = {"👍": 1, "👎": -1}
CLOSE_DRAIN = 5.0  # seconds the messages kept while closing get to reach the database
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
        self.client = ChatbotClient(adapter=self, guild_ready_timeout=guild_ready_timeout)
        self._replying: set[asyncio.Task[Any]] = set()
        self._owner_ids: frozenset[str] | None = None
        self._owner_lock = asyncio.Lock()
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
        application_id = self.client.application_id
        if application_id is not None and not self._invite_shown:
            self._invite_shown = True
            logger.warning("Discord: add the bot to a server with %s", invite_url(application_id))
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
        reply = DiscordReply(message=message)

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
        is_direct = channel_is_direct(message.channel)
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
            post=self.post_queued_reply,
            transient_errors=TRANSIENT_ERRORS,
        )

    async def post_queued_reply(self, pending: UndeliveredReply) -> str | None:
        """Post one queued reply; returns the id of its first message (the one rated)."""
        bot_user = self.client.user
        return await post_queued_reply(
            self.client, pending, bot_user_id=bot_user.id if bot_user else None
        )


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
