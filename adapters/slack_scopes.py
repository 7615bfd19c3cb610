"""What the Slack app must grant the bot: the events it listens to, its slash command and the
OAuth scopes of every Web API method it calls.

``deploy/slack-manifest.yml`` lists exactly these, so creating the app is one paste;
``tests/adapters/test_slack_manifest.py`` checks the manifest against this module, and this
module against what the adapter's code really registers and calls.
"""

from __future__ import annotations

from collections.abc import Mapping

#: The events the adapter's bolt app listens to (``app.event``), in registration order.
LISTENED_EVENTS: tuple[str, ...] = ("app_mention", "message", "reaction_added", "reaction_removed")

#: The one slash command (``app.command``); its text is the chat command and its arguments.
SLASH_COMMAND = "/chatbot"

#: The Events API subscriptions behind each listener: Slack splits ``message`` by where it was
#: posted (public channels, private channels, DMs, group DMs).
SUBSCRIPTIONS: Mapping[str, tuple[str, ...]] = {
    "app_mention": ("app_mention",),
    "message": ("message.channels", "message.groups", "message.im", "message.mpim"),
    "reaction_added": ("reaction_added",),
    "reaction_removed": ("reaction_removed",),
}

#: The bot scope Slack requires for each subscription.
EVENT_SCOPES: Mapping[str, str] = {
    "app_mention": "app_mentions:read",
    "message.channels": "channels:history",
    "message.groups": "groups:history",
    "message.im": "im:history",
    "message.mpim": "mpim:history",
    "reaction_added": "reactions:read",
    "reaction_removed": "reactions:read",
}

#: Every Web API method the adapter calls (slack_sdk's method names) and the bot scopes it
#: needs. ``auth.test`` needs none; ``apps.connections.open`` is called with the app-level
#: token, whose own scope is ``connections:write`` (created by hand, see the README).
WEB_API_SCOPES: Mapping[str, tuple[str, ...]] = {
    "auth_test": (),
    "apps_connections_open": (),
    "chat_postMessage": ("chat:write",),
    "chat_update": ("chat:write",),
    "chat_postEphemeral": ("chat:write",),
    # A thread the bot is called into is read for context, wherever it is.
    "conversations_replies": ("channels:history", "groups:history", "im:history", "mpim:history"),
    # A queued reply with no message recorded is looked for where it would be (a DM's
    # history) before it is posted: it may have landed just before a crash.
    "conversations_history": ("channels:history", "groups:history", "im:history", "mpim:history"),
    "users_info": ("users:read",),
    # files.getUploadURLExternal and files.completeUploadExternal (a retrain's loss curve).
    "files_upload_v2": ("files:write",),
}

#: The scope a slash command needs.
COMMANDS_SCOPE = "commands"


def bot_events() -> tuple[str, ...]:
    """The bot events to subscribe to, in the order of :data:`LISTENED_EVENTS`."""
    return tuple(event for listened in LISTENED_EVENTS for event in SUBSCRIPTIONS[listened])


def bot_scopes() -> frozenset[str]:
    """Every bot scope the adapter needs: for its events, its Web API calls, its command."""
    scopes = {EVENT_SCOPES[event] for event in bot_events()}
    scopes.update(scope for needed in WEB_API_SCOPES.values() for scope in needed)
    scopes.add(COMMANDS_SCOPE)
    return frozenset(scopes)
