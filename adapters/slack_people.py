"""Who people are on Slack (``users.info``): display names and workspace-admin flags, cached;
and who the bot itself is (``auth.test``)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import ConfigurationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlackUser:
    """What ``users.info`` says about a person, as far as the bot needs it."""

    name: str  # the display name: stored only as a message's author name, never in its text
    is_workspace_admin: bool  # a workspace admin or owner: may run channel-local commands


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in this workspace (from ``auth.test``)."""

    user_id: str
    bot_id: str
    team_id: str
    name: str


class SlackPeople:
    """A bounded, expiring cache over ``users.info``."""

    def __init__(
        self, *, client: AsyncWebClient, cache_size: int = 1_000, cache_seconds: float = 3_600.0
    ) -> None:
        self.client = client
        self.cache_size = cache_size
        self.cache_seconds = cache_seconds
        self._users: OrderedDict[str, tuple[float, SlackUser]] = OrderedDict()

    async def user(self, user_id: str) -> SlackUser:
        """The person's display name and admin flags, from ``users.info`` (cached)."""
        cached = self._users.get(user_id)
        if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            self._users.move_to_end(user_id)
            return cached[1]
        try:
            response = await self.client.users_info(user=user_id)
        except SlackClientError as error:
            # Not cached: the next message tries again. A stale entry beats none.
            logger.warning("Slack: users.info for %s failed: %s", user_id, error)
            return cached[1] if cached is not None else SlackUser(user_id, False)
        user = response.get("user") or {}
        profile = user.get("profile") or {}
        name = str(
            profile.get("display_name")
            or profile.get("real_name")
            or user.get("real_name")
            or user.get("name")
            or user_id
        )
        found = SlackUser(
            name, is_workspace_admin=bool(user.get("is_admin") or user.get("is_owner"))
        )
        self.remember(user_id, found)
        return found

    async def identify_bot(self) -> BotIdentity:
        """Who the bot token belongs to (``auth.test``); the bot's own name is cached too.

        Raises:
            ConfigurationError: Slack refused the token or cannot be reached.
        """
        try:
            response = await self.client.auth_test()
        except SlackApiError as error:
            raise ConfigurationError(
                f"Slack refused SLACK_BOT_TOKEN: {error.response.get('error', error)}"
            ) from None
        except (SlackClientError, OSError) as error:
            raise ConfigurationError(
                f"cannot reach Slack at SLACK_API_URL={self.client.base_url}: {error}"
            ) from None
        identity = BotIdentity(
            user_id=str(response.get("user_id") or ""),
            bot_id=str(response.get("bot_id") or ""),
            team_id=str(response.get("team_id") or ""),
            name=str(response.get("user") or "chatbot"),
        )
        self.remember(identity.user_id, SlackUser(identity.name, is_workspace_admin=False))
        return identity

    def remember(self, user_id: str, user: SlackUser) -> None:
        self._users[user_id] = (time.monotonic(), user)
        self._users.move_to_end(user_id)
        while len(self._users) > self.cache_size:
            self._users.popitem(last=False)
