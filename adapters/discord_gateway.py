"""Where discord.py connects, and a gateway connection that survives malformed payloads.

discord.py keeps its REST base (``discord.http.Route.BASE``) and its gateway URL
(``DiscordWebSocket.DEFAULT_GATEWAY``) in class attributes, so pointing it at a
Discord-compatible server (Spacebar, or the fake server of our tests) is process-global: every
``discord.Client`` in the process uses the URLs of the last :func:`point_discord_py_at` call.
"""

from __future__ import annotations

import logging
from typing import Any

import discord.client
import discord.gateway
import discord.http
import yarl

logger = logging.getLogger(__name__)


class TolerantWebSocket(discord.gateway.DiscordWebSocket):
    """The gateway connection, logging and skipping payloads it cannot parse.

    discord.py lets a parse error (a dispatch missing a field, a frame that is not JSON) escape
    from its read loop, which ends the client; one bad frame must not take the bot down.
    """

    async def received_message(self, msg: Any, /) -> None:
        try:
            await super().received_message(msg)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            preview = msg if isinstance(msg, str) else repr(msg)
            logger.warning(
                "skipped a malformed Discord gateway payload (%s: %s): %.200s",
                type(error).__name__,
                error,
                preview,
            )


def point_discord_py_at(*, api_url: str, gateway_url: str) -> None:
    """Make discord.py use ``api_url`` for REST and ``gateway_url`` for the gateway.

    Process-global (see the module docstring). The gateway URL only seeds the first
    connection: resumes go to READY's ``resume_gateway_url``, as Discord asks.
    """
    discord.http.Route.BASE = api_url.rstrip("/")
    TolerantWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    # Client.connect builds its socket through this module-level name.
    discord.client.DiscordWebSocket = TolerantWebSocket  # type: ignore[misc]
