"""The shared conversation format.

Adapters turn every platform event into these frozen dataclasses at the edge; nothing
platform-shaped (a Slack payload, a ``discord.Message``) travels past ``adapters/``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class Role(StrEnum):
    """Who wrote a message."""

    USER = "user"
    ASSISTANT = "assistant"  # the bot
    HUMAN_AGENT = "human_agent"  # a person answering on the bot's behalf
    SYSTEM = "system"


class Platform(StrEnum):
    CONSOLE = "console"
    SLACK = "slack"
    DISCORD = "discord"


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identifies one conversation: a thread, a reply chain, a DM or a console session."""

    platform: str
    workspace: str  # Slack team id, Discord guild id ("" for DMs), "local" for the console
    channel: str
    thread: str  # thread / reply-chain root id; "" when the channel itself is the conversation


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message as an adapter received it, in the shared format."""

    platform: str
    workspace: str
    channel: str
    thread: str
    author_id: str
    author_name: str
    role: Role
    text: str
    timestamp: datetime
    message_id: str  # the platform's id for this message (Slack ts, Discord snowflake)
    event_id: str | None = None  # the platform's id for the delivery, when it has one
    is_direct: bool = False
    mentions_bot: bool = False
    parent_channel: str = ""  # the channel a thread lives in (Discord threads); "" when none

    @property
    def key(self) -> ConversationKey:
        return ConversationKey(self.platform, self.workspace, self.channel, self.thread)


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation's history."""

    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation's history, oldest first."""

    key: ConversationKey
    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def chat_messages(self, *, system_prompt: str = "") -> list[dict[str, str]]:
        """The history as ``{"role", "content"}`` messages for the prompt formatter.

        Human-agent answers count as assistant turns (the bot learns to answer like them);
        consecutive turns of one side are joined with a newline, since Llama-2 prompts must
        alternate; anything before the first user turn is dropped. Ends with the last user turn
        when the history ends with one.
        """
        return to_chat_messages(self.turns, system_prompt=system_prompt)


def to_chat_messages(turns: Sequence[Turn], *, system_prompt: str = "") -> list[dict[str, str]]:
    """See :meth:`Conversation.chat_messages`."""
    messages = alternating_messages(
        ("user" if turn.role == Role.USER else "assistant", turn.text)
        for turn in turns
        if turn.role != Role.SYSTEM and turn.text.strip()
    )
    if system_prompt and messages:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def alternating_messages(turns: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat messages from ``("user" | "assistant", text)`` turns, as a chat template wants them:
    starting with a user message (earlier assistant turns are dropped) and alternating (a turn
    of the same role as the one before is joined to it on a new line)."""
    messages: list[dict[str, str]] = []
    for role, text in turns:
        if not messages and role != "user":
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


#: Code points that SQL databases cannot store in a text column: NUL (PostgreSQL refuses it)
#: and lone surrogates (not encodable as UTF-8).
REPLACEMENT_CHARACTER = "\ufffd"


def storable_text(text: str) -> str:
    """Return ``text`` with unstorable code points (NUL, lone surrogates) replaced by U+FFFD.

    Everything else, emoji, right-to-left text and other control characters included, is kept
    exactly as received.
    """
    if "\x00" not in text and not any(unicodedata.category(ch) == "Cs" for ch in text):
        return text
    return "".join(
        REPLACEMENT_CHARACTER if ch == "\x00" or unicodedata.category(ch) == "Cs" else ch
        for ch in text
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
