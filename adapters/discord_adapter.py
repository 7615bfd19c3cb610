"""The Discord adapter (discord.py): DMs, mentions, reply chains, threads, feedback, commands.

The bot answers DMs, messages that mention it, replies to its own messages, and messages in a
thread it started or already answered in. A conversation is a DM channel, a thread, or a reply
chain (keyed by the chain's root message); before answering the first message of a reply chain
or thread it stores the earlier human messages it can fetch, so the model sees the whole chain.

Replies reference the message they answer, are split at 2,000 characters, show a typing
indicator while generating and, when the model streams, are edited as the text grows (at most
once per ``PipelineOptions.progress_interval``). 👍/👎 reactions on a reply are ratings. Edits and
deletions are applied to the stored history. Human agents (user ids or roles in the settings)
replying in a bot conversation are stored as agent answers.

Commands: ``/chatbot help|forget-me`` for everyone and ``/chatbot-admin
status|export|retrain|rollback`` for admins, or the same words as ``!word`` messages to the bot.
Admin commands are checked twice: Discord hides ``/chatbot-admin`` from members without Manage
Server (``default_permissions``), and every admin command checks at run time that the user is a
configured admin (user id or role) or has Manage Server, since server admins can change who
sees a command.

Developer portal: enable the Message Content privileged intent. Bot permissions: View Channels,
Send Messages, Send Messages in Threads, Read Message History, Add Reactions; scopes ``bot`` and
``applications.commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Protocol

import discord
from discord import app_commands

from adapters.base import MessageHandler
from adapters.discord_gateway import point_discord_py_at
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
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

PLATFORM = Platform.DISCORD.value
MESSAGE_LIMIT = 2000  # characters per Discord message
REPLY_WAIT = 60.0  # seconds a reaction waits for replies in flight before giving up
TYPING_REFRESH = 8.0  # seconds; Discord shows "typing…" for about 10 s per trigger
RATINGS = {"👍": 1, "👎": -1}
_EMOJI_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")  # skin tones, variation selector
_ANSWERED_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


class _Named(Protocol):
    """A user as mention cleaning sees it."""

    @property
    def id(self) -> int: ...

    @property
    def display_name(self) -> str: ...


class DiscordHandler(MessageHandler, Protocol):
    """The pipeline as the Discord adapter uses it: it also stores context without answering."""

    async def remember(self, message: IncomingMessage) -> bool: ...


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
    """Serves the bot on Discord until :meth:`close` (or a fatal gateway error)."""

    name = "discord"

    def __init__(
        self,
        *,
        settings: Settings,
        handler: DiscordHandler,
        commands: Commands,
        guild_ready_timeout: float = 2.0,
    ) -> None:
        """``guild_ready_timeout``: how long discord.py waits for more guilds before READY."""
        self.settings = settings
        self.handler = handler
        self.commands = commands
        self.admin_ids = frozenset(settings.discord_admin_ids)
        self.admin_role_ids = frozenset(settings.discord_admin_role_ids)
        self.agent_ids = frozenset(settings.discord_agent_ids)
        self.agent_role_ids = frozenset(settings.discord_agent_role_ids)
        self.chain_limit = settings.history_turns
        self.client = _ChatbotClient(adapter=self, guild_ready_timeout=guild_ready_timeout)
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._replying: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Connect and serve; 0 after :meth:`close`, 2 when Discord refuses the bot."""
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
        return 0

    async def wait_until_ready(self) -> None:
        await self.client.wait_until_ready()

    async def wait_until_idle(self, *, within: float = 30.0) -> None:
        """Wait until the events received so far are handled (or ``within`` seconds pass)."""
        pending = {task for task in self._in_flight if task is not asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=within)

    async def close(self, *, drain_within: float = 30.0) -> None:
        """Finish the events being handled (so no reply is cut off), then disconnect."""
        await self.wait_until_idle(within=drain_within)
        await self.client.close()

    async def _guarded(self, what: str, work: Any) -> None:
        """Run one event's work: tracked for :meth:`close`, one logged trace when it fails."""
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await work
        except Exception:
            logger.exception("failed to handle a Discord %s", what)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        bot_user = self.client.user
        if bot_user is None or message.author.id == bot_user.id or message.author.bot:
            return  # our own and other bots' messages are never conversation turns
        if message.type not in _ANSWERED_TYPES:
            return  # joins, pins, thread-created notices…
        is_direct = _is_direct(message.channel)
        mentions_bot = any(user.id == bot_user.id for user in message.mentions)
        text = self._plain_text(message.content, message.mentions)

        command = parse_bang_command(text) if is_direct or mentions_bot else None
        if command is not None:
            await self._bang_command(message, *command, is_direct=is_direct)
            return

        channel = await self._resolved_channel(message)
        is_thread = isinstance(channel, discord.Thread)
        chain: list[discord.Message] = []
        if is_direct:
            thread = ""
        elif is_thread:
            thread = str(channel.id)
        else:
            chain, thread = await self._reply_chain(message)
        incoming = IncomingMessage(
            platform=PLATFORM,
            workspace=str(message.guild.id) if message.guild else "",
            channel=str(channel.id),
            thread=thread,
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            role=Role.USER,
            text=text,
            timestamp=message.created_at,
            message_id=str(message.id),
            is_direct=is_direct,
            mentions_bot=mentions_bot,
        )

        if (
            not is_direct
            and self.user_is_agent(message.author)
            and await self.handler.bot_is_in_conversation(incoming)
        ):
            await self.handler.agent_answered(replace(incoming, role=Role.HUMAN_AGENT))
            return

        replies_to_bot = bool(chain) and chain[0].author.id == bot_user.id
        addressed = is_direct or mentions_bot or replies_to_bot
        if not addressed and is_thread:
            addressed = getattr(
                channel, "owner_id", None
            ) == bot_user.id or await self.handler.bot_is_in_conversation(incoming)
        if not addressed:
            return

        if chain:
            await self._remember(chain, incoming)
        elif (is_thread or is_direct) and not await self.handler.bot_is_in_conversation(incoming):
            await self._remember(await self._recent_messages(message), incoming)

        reply = _Reply(message=message)
        task = asyncio.current_task()
        if task is not None:
            self._replying.add(task)
        try:
            await self.handler.handle(incoming, send=reply.send, progress=reply.progress)
        finally:
            reply.stop_typing()
            if task is not None:
                self._replying.discard(task)

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
        """The messages ``message`` replies to, nearest first, and the chain's root id.

        Follows ``message.reference`` up to ``chain_limit`` messages, fetching what the gateway
        did not include. A message that cannot be fetched ends the chain with a warning; its id
        still serves as the root, so the conversation stays the same once it is reachable.
        """
        chain: list[discord.Message] = []
        root = str(message.id)
        current = message
        while len(chain) < self.chain_limit:
            reference = current.reference
            if (
                reference is None
                or reference.message_id is None
                or reference.type is not discord.MessageReferenceType.reply
                or reference.channel_id != message.channel.id
            ):
                break
            root = str(reference.message_id)
            parent = reference.resolved if isinstance(reference.resolved, discord.Message) else None
            parent = parent or reference.cached_message
            if parent is None:
                try:
                    parent = await message.channel.fetch_message(reference.message_id)
                except discord.HTTPException as error:
                    logger.warning(
                        "reply chain of Discord message %s is partial: could not fetch %s (%s)",
                        message.id,
                        reference.message_id,
                        error,
                    )
                    break
            chain.append(parent)
            current = parent
        return chain, root

    async def _recent_messages(self, message: discord.Message) -> list[discord.Message]:
        """The thread's or DM's messages before ``message``, newest first (may be partial)."""
        found: list[discord.Message] = []
        try:
            async for earlier in message.channel.history(limit=self.chain_limit, before=message):
                found.append(earlier)
        except discord.HTTPException as error:
            logger.warning("history before Discord message %s is partial: %s", message.id, error)
        return found

    async def _remember(
        self, earlier: Iterable[discord.Message], incoming: IncomingMessage
    ) -> None:
        """Store earlier human messages (given newest first) in ``incoming``'s conversation."""
        for message in reversed(list(earlier)):
            if message.author.bot or message.type not in _ANSWERED_TYPES:
                continue  # our own replies are stored already; other bots are not turns
            text = self._plain_text(message.content, message.mentions)
            if parse_bang_command(text) is not None:
                continue  # commands to the bot are not conversation
            role = Role.HUMAN_AGENT if self.user_is_agent(message.author) else Role.USER
            await self.handler.remember(
                replace(
                    incoming,
                    author_id=str(message.author.id),
                    author_name=message.author.display_name,
                    role=role,
                    text=text,
                    timestamp=message.created_at,
                    message_id=str(message.id),
                    mentions_bot=False,
                )
            )

    def _plain_text(self, content: str, mentions: Iterable[_Named]) -> str:
        """Content without the bot's mention, other user mentions as ``@name``."""
        bot_id = self.client.user.id if self.client.user else 0
        text = re.sub(rf"<@!?{bot_id}>", "", content)
        for user in mentions:
            text = re.sub(rf"<@!?{user.id}>", f"@{user.display_name}", text)
        return re.sub(r"[ \t]{2,}", " ", text).strip()

    # ------------------------------------------------------------------ who is who

    def user_is_agent(self, user: discord.User | discord.Member | discord.abc.User) -> bool:
        if str(user.id) in self.agent_ids:
            return True
        return any(str(role_id) in self.agent_role_ids for role_id in _role_ids(user))

    def user_is_admin(
        self, user: discord.User | discord.Member | discord.abc.User, *, can_manage_server: bool
    ) -> bool:
        """A configured admin (user id or role), or anyone with Manage Server."""
        if can_manage_server or str(user.id) in self.admin_ids:
            return True
        return any(str(role_id) in self.admin_role_ids for role_id in _role_ids(user))

    # ------------------------------------------------------------------ edits, deletions, ratings

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data: dict[str, Any] = dict(payload.data)
        author = data.get("author") or {}
        if "content" not in data or author.get("bot"):
            return  # embeds resolving, or our own streamed edits
        mentions = [_MentionedUser(m) for m in data.get("mentions") or [] if "id" in m]
        await self.handler.message_edited(
            platform=PLATFORM,
            channel=str(payload.channel_id),
            message_id=str(payload.message_id),
            text=self._plain_text(str(data["content"]), mentions),
        )

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.handler.message_deleted(
            platform=PLATFORM, channel=str(payload.channel_id), message_id=str(payload.message_id)
        )

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            await self.handler.message_deleted(
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
        rate = self.handler.rating_added if added else self.handler.rating_removed

        async def rate_once() -> bool:
            return await rate(
                platform=PLATFORM,
                channel=str(payload.channel_id),
                answer_message_id=str(payload.message_id),
                rater_id=str(payload.user_id),
                value=value,
            )

        if await rate_once() or payload.message_author_id != bot_user.id:
            return
        # A reply is on Discord before its id is stored (while it streams, say): try again once
        # the replies being sent now are stored.
        replying = set(self._replying)
        if replying:
            await asyncio.wait(replying, timeout=REPLY_WAIT)
            await rate_once()

    # ------------------------------------------------------------------ commands

    async def _bang_command(
        self, message: discord.Message, word: str, arguments: str, *, is_direct: bool
    ) -> None:
        author = message.author
        can_manage = isinstance(author, discord.Member) and author.guild_permissions.manage_guild
        request = CommandRequest(
            command=word,
            arguments=arguments,
            platform=PLATFORM,
            workspace=str(message.guild.id) if message.guild else "",
            channel=str(message.channel.id),
            user_id=str(author.id),
            user_name=author.display_name,
            user_is_admin=self.user_is_admin(author, can_manage_server=can_manage),
            # ``!correct`` sent as a reply to a bot message corrects that message.
            replied_to=(
                str(message.reference.message_id)
                if message.reference is not None and message.reference.message_id is not None
                else None
            ),
            message_id=str(message.id),
        )
        answer = await self.commands.run(request)
        reply = _Reply(message=message)
        await reply.send(text=answer, in_reply_to=None)

    async def slash_command(
        self, interaction: discord.Interaction, command: Command, *, arguments: str = ""
    ) -> None:
        """``/chatbot <command>`` or ``/chatbot-admin <command>``, answered only to the user."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        user = interaction.user
        request = CommandRequest(
            command=command.value,
            arguments=arguments.strip(),
            platform=PLATFORM,
            workspace=str(interaction.guild_id or ""),
            channel=str(interaction.channel_id or ""),
            user_id=str(user.id),
            user_name=user.display_name,
            user_is_admin=self.user_is_admin(
                user,
                # Discord computes these for the member in this channel; absent in DMs.
                can_manage_server=interaction.guild_id is not None
                and interaction.permissions.manage_guild,
            ),
        )
        answer = await self.commands.run(request)
        chunks = split_reply(answer, limit=MESSAGE_LIMIT) or ["Done."]
        await interaction.edit_original_response(content=chunks[0])
        for chunk in chunks[1:]:
            await interaction.followup.send(chunk, ephemeral=True)

    # ------------------------------------------------------------------ retry queue

    async def deliver_undelivered(self) -> None:
        """Send stored replies whose sending failed earlier (after a restart or outage)."""
        for pending in await self.handler.undelivered_replies(platform=PLATFORM):
            try:
                platform_id = await self._deliver(pending)
            except discord.HTTPException as error:
                logger.warning(
                    "could not deliver stored reply %d yet: %s", pending.answer_id, error
                )
                await self.handler.reply_not_delivered(answer_id=pending.answer_id)
                continue
            except BaseException:
                # Claimed but not sent (a bug, a cancelled task): back into the queue.
                await asyncio.shield(self.handler.reply_not_delivered(answer_id=pending.answer_id))
                raise
            await self.handler.reply_delivered(
                answer_id=pending.answer_id, platform_message_id=platform_id
            )

    async def _deliver(self, pending: UndeliveredReply) -> str:
        channel = self.client.get_partial_messageable(int(pending.channel))
        reference = (
            discord.MessageReference(
                message_id=int(pending.in_reply_to),
                channel_id=int(pending.channel),
                fail_if_not_exists=False,
            )
            if pending.in_reply_to
            else None
        )
        chunks = split_reply(pending.text, limit=MESSAGE_LIMIT)
        first_id = ""
        for index, chunk in enumerate(chunks):
            sent = await channel.send(
                chunk,
                reference=reference,  # type: ignore[arg-type]
                allowed_mentions=_allowed_mentions(ping=index == 0),
            )
            first_id = first_id or str(sent.id)
        return first_id


class _Reply:
    """Typing, streaming edits and the final (split) reply to one Discord message."""

    def __init__(self, *, message: discord.Message) -> None:
        self.message = message
        self.first: discord.Message | None = None
        self._typing: asyncio.Task[None] | None = None

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> None:
        if not text:
            self._start_typing()
            return
        shown = split_reply(text, limit=MESSAGE_LIMIT)[0]
        if self.first is None:
            self.first = await self._post(shown, ping=True)
        elif self.first.content != shown:
            self.first = await self.first.edit(content=shown)

    async def send(self, *, text: str, in_reply_to: IncomingMessage | None) -> str:
        """Post (or finish streaming) the reply; the id of its first message, which carries it."""
        self.stop_typing()
        chunks = split_reply(text, limit=MESSAGE_LIMIT) or ["…"]
        if self.first is None:
            self.first = await self._post(chunks[0], ping=True)
        elif self.first.content != chunks[0]:
            self.first = await self.first.edit(content=chunks[0])
        for chunk in chunks[1:]:
            await self._post(chunk, ping=False)
        return str(self.first.id)

    async def _post(self, text: str, *, ping: bool) -> discord.Message:
        return await self.message.channel.send(
            text,
            reference=self.message.to_reference(fail_if_not_exists=False),
            allowed_mentions=_allowed_mentions(ping=ping),
        )

    def _start_typing(self) -> None:
        if self._typing is None:
            self._typing = asyncio.create_task(self._keep_typing())

    def stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None

    async def _keep_typing(self) -> None:
        with contextlib.suppress(discord.HTTPException):
            while True:
                await self.message.channel.typing()  # one trigger, shown for about 10 s
                await asyncio.sleep(TYPING_REFRESH)


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
            await self.adapter.slash_command(interaction, command, arguments=arguments)

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

    async def on_ready(self) -> None:
        await self.adapter._guarded("ready", self.adapter.deliver_undelivered())

    async def on_resumed(self) -> None:
        await self.adapter._guarded("resume", self.adapter.deliver_undelivered())

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter._guarded("message", self.adapter.on_message(message))

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        await self.adapter._guarded("edit", self.adapter.on_raw_message_edit(payload))

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.adapter._guarded("deletion", self.adapter.on_raw_message_delete(payload))

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self.adapter._guarded("deletion", self.adapter.on_raw_bulk_message_delete(payload))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter._guarded("reaction", self.adapter.on_raw_reaction(payload, added=True))

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter._guarded(
            "reaction removal", self.adapter.on_raw_reaction(payload, added=False)
        )

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        logger.exception("unhandled error in Discord event %s", event_method)


class _MentionedUser:
    """A user mentioned in a raw edit payload: just what mention cleaning needs."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.id = int(data["id"])
        self.display_name = str(data.get("global_name") or data.get("username") or self.id)


def _is_direct(channel: Any) -> bool:
    if isinstance(channel, discord.DMChannel | discord.GroupChannel):
        return True
    return isinstance(channel, discord.PartialMessageable) and channel.guild_id is None


def _role_ids(user: Any) -> list[int]:
    roles = getattr(user, "roles", None) or []
    return [role.id for role in roles]


def _allowed_mentions(*, ping: bool) -> discord.AllowedMentions:
    # Model output must never ping @everyone, roles or users; only the asker, once.
    return discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=ping)
