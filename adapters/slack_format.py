"""Slack's message format, converted at the edge: pure functions, no network.

Slack writes mentions, channel links and URLs in angle brackets (``<@U123>``, ``<#C1|general>``,
``<https://x|label>``) and escapes ``&``, ``<`` and ``>``. The model and the database see plain
text instead, except for user mentions, which stay ``<@U123>``: a person's name is theirs, not
part of the message (the export's redaction turns the mention into ``<USER>``). Replies go back
escaped. Which messages are people writing (:data:`CONVERSATION_SUBTYPES`, :func:`is_from_a_bot`)
is decided here too, the same for new messages and for a thread's earlier ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: Characters per posted message. Slack accepts up to 40,000 characters in ``text`` but
#: truncates what it shows and recommends about 4,000 for readability; 3,000 keeps every chunk
#: well inside that, even after ``&``, ``<`` and ``>`` are escaped.
SLACK_MESSAGE_LIMIT = 3_000

#: Reaction names that rate a reply (skin-tone variants are reduced to these first).
RATING_REACTIONS: Mapping[str, int] = {"+1": 1, "thumbsup": 1, "-1": -1, "thumbsdown": -1}

#: Message subtypes that are people writing; every other subtype (joins, topic changes, …)
#: is not a conversation turn.
CONVERSATION_SUBTYPES = frozenset({None, "thread_broadcast", "file_share", "me_message"})

_ANGLE = re.compile(r"<([^<>]*)>")
_USER_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^<>]*)?>")


def mentioned_user_ids(text: str) -> list[str]:
    """The user ids mentioned in ``text`` (``<@U123>``), in order, without repeats."""
    return list(dict.fromkeys(_USER_MENTION.findall(text)))


def without_leading_mention(text: str, user_id: str) -> str:
    """``"<@BOT>: !status"`` → ``"!status"``: the address, and the punctuation after it, go."""
    match = re.match(rf"\s*<@{re.escape(user_id)}(?:\|[^<>]*)?>[\s,:;]*", text)
    return text[match.end() :] if match else text


def to_plain_text(text: str) -> str:
    """Slack markup to plain text: ``<url|label>`` → ``label (url)``, ``<#C1|general>`` →
    ``#general``; a user mention keeps only its id (``<@U1|jane>`` → ``<@U1>``)."""

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            return f"<{target}>"  # the label of an old-style mention is a name: dropped
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            # <!here>, <!channel>, <!subteam^S1|@team>, <!date^…|fallback>
            return label or "@" + target[1:].split("^")[0]
        if target.startswith("mailto:"):
            return label or target.removeprefix("mailto:")
        if label and label != target:
            return f"{label} ({target})"
        return target

    return _unescape(_ANGLE.sub(replace, text))


def stored_text(text: str, *, bot_user_id: str) -> str:
    """Slack markup to stored text: the bot's own leading mention dropped, other mentions
    kept as ids."""
    return to_plain_text(without_leading_mention(text, bot_user_id)).strip()


def is_from_a_bot(message: Mapping[str, Any], *, bot_user_id: str) -> bool:
    """Whether a message (an event, or an item of a thread's history) was written by a bot:
    any app, or this bot itself."""
    return bool(
        message.get("bot_id")
        or message.get("subtype") == "bot_message"
        or message.get("user") == bot_user_id
    )


def escape(text: str) -> str:
    """Plain text to Slack's ``text`` field: ``&``, ``<`` and ``>`` must be escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def rating_of(reaction: str) -> int | None:
    """``+1`` / ``thumbsup`` (any skin tone) → 1, ``-1`` / ``thumbsdown`` → -1, else ``None``."""
    return RATING_REACTIONS.get(reaction.split("::", 1)[0])


def timestamp_of(ts: str) -> datetime:
    """A Slack ``ts`` (``"1700000000.000100"``) as an aware datetime; now when unreadable."""
    try:
        return datetime.fromtimestamp(float(ts), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC)
