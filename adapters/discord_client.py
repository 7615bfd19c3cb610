"""The discord.py client: intents, the ``/chatbot`` command groups, events handed to the
adapter."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from adapters.discord_replies import allowed_mentions
from bot.commands import ADMIN_ONLY, DESCRIPTIONS, Command

if TYPE_CHECKING:
    from adapters.discord_adapter import DiscordAdapter

logger = logging.getLogger(__name__)


def discord_intents(*, message_content: bool = True) -> discord.Intents:
    """Guilds, guild and DM messages with their content (the privileged Message Content
    intent, unless ``message_content`` is false), and reactions."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = message_content
    intents.guild_reactions = True
    intents.dm_reactions = True
    return intents


class ChatbotClient(discord.Client):
    """discord.Client wired to the adapter, with the ``/chatbot`` command groups."""

    def __init__(self, *, adapter: DiscordAdapter, guild_ready_timeout: float) -> None:
        super().__init__(
            intents=discord_intents(),
            allowed_mentions=allowed_mentions(ping=True),
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

    @property
    def reads_message_content(self) -> bool:
        """Whether the gateway sends every message's content (the intent is granted)."""
        return self.intents.message_content

    def stop_asking_for_message_content(self) -> None:
        """Identify without the Message Content intent from the next :meth:`connect` on.

        discord.py reads the intents it identifies with from its connection state and has no
        public setter; nothing it caches depends on this intent.
        """
        self._connection._intents = discord_intents(message_content=False)

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
        self.adapter.take_change(self.adapter.on_raw_message_edit(payload), what="edit")

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.adapter.take_change(self.adapter.on_raw_message_delete(payload), what="deletion")

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        self.adapter.take_change(self.adapter.on_raw_bulk_message_delete(payload), what="deletion")

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        self.adapter.take_change(self.adapter.on_raw_reaction(payload, added=True), what="reaction")

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        self.adapter.take_change(
            self.adapter.on_raw_reaction(payload, added=False), what="reaction removal"
        )

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        logger.exception("unhandled error in Discord event %s", event_method)
