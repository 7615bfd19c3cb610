"""Who people are on Slack (``users.info``): display names and workspace-admin flags, cached."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from slack_sdk.errors import SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlackUser:
    """What ``users.info`` says about a person, as far as the bot needs it."""

    name: str  # the display name: stored only as a message's author name, never in its text
    is_workspace_admin: bool  # a workspace admin or owner: may run channel-local commands


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

    def remember(self, user_id: str, user: SlackUser) -> None:
        self._users[user_id] = (time.monotonic(), user)
        self._users.move_to_end(user_id)
        while len(self._users) > self.cache_size:
            self._users.popitem(last=False)
