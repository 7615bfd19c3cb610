"""Chat commands, shared by every platform.

Everyone: ``forget-me``, ``help``. Channel admins (Manage Server on Discord, workspace admins
on Slack) and configured admins: ``training off|on`` for a channel. Configured admins only
(``SLACK_ADMIN_IDS``, ``DISCORD_ADMIN_IDS`` / ``DISCORD_ADMIN_ROLE_IDS``, ...): everything that
touches the shared model or its data (``status``, ``export``, ``correct``, ``review``,
``retrain``, ``rollback``). Adapters parse the platform's form (a slash command, or a ``!word``
message to the bot), say who the user is (each platform has its own rules) and call
:meth:`Commands.run`; the dashboard calls it too. Every command asked for leaves one audit line
(logger ``chatbot.audit``), run, refused or unknown.
Features that later work adds (export, forget-me, retrain, rollback) register an action; until
then the command answers that it is not available yet.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from bot.storage import Store, counts, last_export_summary

logger = logging.getLogger(__name__)

#: One line for every command asked for, on every platform (the dashboard's actions too):
#: who, what, and whether it ran. Kept apart so that it can be routed to its own log.
audit_logger = logging.getLogger("chatbot.audit")

#: Arguments longer than this are cut in the audit line (a correction can be long).
AUDIT_ARGUMENT_CHARS = 100


class Command(StrEnum):
    RETRAIN = "retrain"
    EXPORT = "export"
    STATUS = "status"
    ROLLBACK = "rollback"
    MODEL = "model"
    FORGET_ME = "forget-me"
    HELP = "help"
    CORRECT = "correct"
    TRAINING = "training"
    REVIEW = "review"


#: Commands that only touch one channel of one server: a server's own moderators may run them.
CHANNEL_ADMIN = frozenset({Command.TRAINING})

#: Commands that need an admin of some kind; all but CHANNEL_ADMIN need a configured admin,
#: since they touch the model and the data every server shares.
ADMIN_ONLY = frozenset(
    {
        Command.RETRAIN,
        Command.EXPORT,
        Command.STATUS,
        Command.ROLLBACK,
        Command.MODEL,
        Command.CORRECT,
        Command.TRAINING,
        Command.REVIEW,
    }
)

DESCRIPTIONS = {
    Command.HELP: "show this help",
    Command.FORGET_ME: "delete everything you have said to me",
    Command.STATUS: "model version, message counts, last export (admins)",
    Command.EXPORT: "export new training data now (admins)",
    Command.RETRAIN: "train a new model on the exported data (admins)",
    Command.ROLLBACK: "go back to the previous model (admins)",
    Command.MODEL: "`model list`: the model versions; `model use N`: serve version N (admins)",
    Command.CORRECT: "`correct <better answer>` as a reply to a bot message, or in its thread "
    "(admins)",
    Command.TRAINING: "`training off` / `training on`: use this channel for training (admins)",
    Command.REVIEW: "`review`: answers waiting; `review approve|reject N`, `review edit N "
    "<answer>` (admins)",
}


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A command as any platform delivered it."""

    command: str
    arguments: str
    platform: str
    workspace: str
    channel: str
    user_id: str
    user_name: str
    user_is_admin: bool  # a configured admin: may change the shared model and its data
    thread: str = ""  # the conversation's thread / reply-chain root, when there is one
    replied_to: str | None = None  # platform id of the message this command replies to
    message_id: str | None = None  # platform id of the command message itself
    user_manages_channel: bool = False  # may run CHANNEL_ADMIN commands (server moderators)
    #: The platform of ``channel`` when it differs from where the command was asked: the
    #: dashboard (``platform="dashboard"``) turns training off in a Slack or Discord channel.
    channel_platform: str = ""
    #: Shows a long command's progress where it was asked, edited into one message (a
    #: ``!retrain`` in a thread); ``None`` where the platform form has no such place.
    progress: Callable[[str], Awaitable[None]] | None = None
    #: Posts a file (the loss curve) with a line of text where the command was asked.
    attach: Callable[[Path, str], Awaitable[None]] | None = None


class CommandAction(Protocol):
    """What a command does once allowed; returns the text to show the user."""

    async def __call__(self, request: CommandRequest, /) -> str: ...


def parse_bang_command(text: str) -> tuple[str, str] | None:
    """``"!status now"`` → ``("status", "now")``; ``None`` when ``text`` is no ``!`` command."""
    stripped = text.strip()
    if not stripped.startswith("!") or len(stripped) == 1:
        return None
    word, _, rest = stripped[1:].partition(" ")
    if not word or word.startswith("!"):
        return None
    return word.lower(), rest.strip()


class Commands:
    """Runs commands: checks permission, then the registered action."""

    def __init__(
        self,
        *,
        store: Store,
        model_version: Callable[[], str],
        actions: Mapping[Command, CommandAction] | None = None,
        model_status: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        """``model_status``: more lines for ``status`` (the serving version's metrics...)."""
        self.store = store
        self.model_version = model_version
        self.actions = dict(actions or {})
        self.model_status = model_status

    async def run(self, request: CommandRequest) -> str:
        """Run ``request`` and return the reply text (never raises for a user's mistake)."""
        try:
            command = Command(request.command.lower())
        except ValueError:
            audit(request, outcome="unknown")
            return f"I don't know the command `{request.command}`. {self.help_text()}"
        allowed = request.user_is_admin or (
            command in CHANNEL_ADMIN and request.user_manages_channel
        )
        if command in ADMIN_ONLY and not allowed:
            audit(request, outcome="refused")
            logger.warning(
                "refused admin command %s from %s user %s (%s)",
                command.value,
                request.platform,
                request.user_id,
                request.user_name,
            )
            return f"Sorry, only admins can use `{command.value}`."
        audit(request, outcome="allowed")
        if command == Command.HELP:
            return self.help_text()
        if command == Command.STATUS:
            return await self.status()
        action = self.actions.get(command)
        if action is None:
            return f"`{command.value}` is not available yet."
        logger.info("%s user %s runs %s", request.platform, request.user_id, command.value)
        return await action(request)

    def help_text(self) -> str:
        lines = [f"`{command.value}`: {text}" for command, text in DESCRIPTIONS.items()]
        return "Commands:\n" + "\n".join(lines)

    async def status(self) -> str:
        numbers = await self.store.run(counts)
        last_export = await self.store.run(last_export_summary) or "never"
        text = (
            f"Model: {self.model_version()}\n"
            f"Conversations: {numbers.conversations}, messages: {numbers.messages}, "
            f"exchanges: {numbers.exchanges}, unanswered: {numbers.unanswered}, "
            f"gave up: {numbers.gave_up}\n"
            f"Last export: {last_export}"
        )
        if self.model_status is not None:
            text += "\n" + await self.model_status()
        return text


def audit(request: CommandRequest, *, outcome: str) -> None:
    """Log the audit line of a command: ``outcome`` is ``allowed`` (it runs), ``refused`` (no
    permission) or ``unknown`` (no such command). The fields go along as ``extra`` too
    (``audit_platform`` ...) for structured logs; text from users is quoted (``%r``), so
    that a name or an argument cannot forge a line."""
    arguments = request.arguments
    if len(arguments) > AUDIT_ARGUMENT_CHARS:
        arguments = arguments[:AUDIT_ARGUMENT_CHARS] + "…"
    fields = {
        "audit_platform": request.platform,
        "audit_user_id": request.user_id,
        "audit_user_name": request.user_name,
        "audit_command": request.command.lower(),
        "audit_arguments": arguments,
        "audit_outcome": outcome,
    }
    audit_logger.info(
        "command %r %s by %s user %r (%r) arguments %r",
        fields["audit_command"],
        outcome,
        request.platform,
        request.user_id,
        request.user_name,
        arguments,
        extra=fields,
    )
