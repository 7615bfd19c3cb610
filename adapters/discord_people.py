"""Who is who on Discord: human agents, admins, and the owners of the bot's application.

A human agent is a user in ``DISCORD_AGENT_IDS`` or a member holding a
``DISCORD_AGENT_ROLE_IDS`` role. A configured admin, who may run everything touching the shared
model or its data, is a user in ``DISCORD_ADMIN_IDS``, a member holding a
``DISCORD_ADMIN_ROLE_IDS`` role *in the guild the command came from* (role ids are per guild),
or, when neither admin setting is configured, the owner of the bot's application (or the
accepted admins and developers of the team owning it), fetched from Discord at ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord

from adapters.discord_replies import TRANSIENT_ERRORS
from bot.config import Settings

logger = logging.getLogger(__name__)

_OWNING_TEAM_ROLES = frozenset({discord.TeamMemberRole.admin, discord.TeamMemberRole.developer})


class DiscordPeople:
    """The agent and admin checks for one bot, with its application's owners cached."""

    def __init__(self, *, client: discord.Client, settings: Settings) -> None:
        self.client = client
        self.admin_ids = frozenset(settings.discord_admin_ids)
        self.admin_role_ids = frozenset(settings.discord_admin_role_ids)
        self.agent_ids = frozenset(settings.discord_agent_ids)
        self.agent_role_ids = frozenset(settings.discord_agent_role_ids)
        self._owner_ids: frozenset[str] | None = None
        self._owner_lock = asyncio.Lock()

    @property
    def admins_configured(self) -> bool:
        """Whether admins are listed (by id or role); otherwise the owners are the admins."""
        return bool(self.admin_ids or self.admin_role_ids)

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
        if self.admins_configured:
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


def manages_guild(user: Any, *, guild_id: int | None) -> bool:
    """Manage Server in the guild the message came from (channel-local commands only)."""
    return (
        guild_id is not None
        and isinstance(user, discord.Member)
        and user.guild.id == guild_id
        and user.guild_permissions.manage_guild
    )


def _role_ids_in(user: Any, *, guild_id: int | None) -> frozenset[str]:
    """The ids of ``user``'s roles in the guild ``guild_id``: none in DMs, and never a role of
    another guild (role ids are per guild)."""
    if guild_id is None or not isinstance(user, discord.Member) or user.guild.id != guild_id:
        return frozenset()
    return frozenset(str(role.id) for role in user.roles if role.guild.id == guild_id)


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
