"""Setting the Discord bot up: the invite link it needs, and what to say when the Message
Content intent is off.

The permissions are what the adapter really does in a channel: read it and its history (reply
chains, thread context, and a reply references the message it answers), post and edit its
replies there and in threads, and attach a file (a retrain's loss curve). Reactions are only
read (ratings), which needs no permission beyond seeing the channel.
"""

from __future__ import annotations

import discord
from discord.utils import oauth_url

#: The OAuth2 scopes of the invite: the bot user, and its ``/chatbot`` slash commands.
INVITE_SCOPES: tuple[str, ...] = ("bot", "applications.commands")

#: The channel permissions the bot needs (its role's permissions in the invite).
BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
    attach_files=True,
)

#: Said once when Discord refuses the Message Content intent (gateway close code 4014).
MESSAGE_CONTENT_OFF = (
    "Discord: the Message Content intent is off for this bot, so it cannot read messages in "
    "servers. Turn it on at https://discord.com/developers/applications -> your app -> Bot -> "
    "Privileged Gateway Intents -> Message Content Intent, then restart the bot. Until then it "
    "answers only DMs and messages that mention it."
)


def invite_url(application_id: int) -> str:
    """The link that adds the bot to a server with :data:`INVITE_SCOPES` and
    :data:`BOT_PERMISSIONS`: ``https://discord.com/oauth2/authorize?client_id=…``."""
    return oauth_url(application_id, permissions=BOT_PERMISSIONS, scopes=INVITE_SCOPES)
