"""Redaction of personal data before anything leaves the database as training data.

Each finding becomes a typed placeholder (``<EMAIL>``, ``<PHONE>``, ``<CARD>``, ``<IP>``,
``<CREDENTIALS>``, ``<TOKEN>``, ``<USER>``); user ids become keyed pseudonyms
(:class:`Pseudonymizer`). The patterns aim at what people paste into a support chat; they are
tuned to leave version numbers, dates, times, prices and order numbers alone (see
``tests/bot/test_redaction.py`` for the table of cases, both ways).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

# Order matters (see ``redact``): credentials and tokens first (they can contain '@' and
# digits), then e-mail, mentions, cards (Luhn-checked), IPs, and phones last (the loosest).

_TOKEN = re.compile(
    r"""
    \b(?:
        xox[abposr]-[A-Za-z0-9-]{10,}                 # Slack bot/user/app tokens
      | xapp-\d-[A-Za-z0-9-]{10,}                     # Slack app-level tokens
      | [MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,40}  # Discord bot tokens
      | sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}          # OpenAI / Anthropic style keys
      | gh[pousr]_[A-Za-z0-9]{36,}                    # GitHub tokens
      | github_pat_[A-Za-z0-9_]{40,}
      | AKIA[0-9A-Z]{16}                              # AWS access key ids
      | AIza[0-9A-Za-z_-]{35}                         # Google API keys
      | glpat-[A-Za-z0-9_-]{20,}                      # GitLab
      | eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}  # JWTs
    )
    """,
    re.VERBOSE,
)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b((?:api[_-]?key|secret|token|password|passwd|pwd)\s*[:=]\s*)(['\"]?)[^\s'\"]{6,}\2"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{16,}=*")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/:@]+:[^\s/@]+@")
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_MENTION = re.compile(r"<@[!&]?[A-Z0-9]+(?:\|[^>]*)?>|<!(?:subteam\^)?[A-Za-z0-9]+(?:\|[^>]*)?>")
_CARD = re.compile(r"(?<![\d.,])(?:\d[ -]?){12,18}\d(?![\d.,]\d)")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)"
)
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?=[0-9A-Fa-f:]*::)(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*)?::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*)?)"
    r"(?![\w:])"
)
# A phone number: an international "+CC ..." form, or a grouped national form with separators
# such as "(555) 123-4567", "555-123-4567", "020 7946 0958". Bare digit runs (order numbers) and
# ISO dates (dashes in 4-2-2 groups) are not phones.
_PHONE = re.compile(
    r"""
    (?<![\w+])(?:
        \+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}
      | \(\d{2,4}\)[\s.-]?\d{3,4}[\s.-]?\d{3,4}
      | \d{3}[.-]\d{3}[.-]\d{4}
      | 0\d{2,4}[\s]\d{3,4}[\s]\d{3,4}
    )(?![\w-])
    """,
    re.VERBOSE,
)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    if 13 <= len(digits) <= 19 and _luhn_valid(digits):
        return "<CARD>"
    return match.group(0)


def _phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group(0))
    return "<PHONE>" if 7 <= digits <= 15 else match.group(0)


# Cheap pre-checks decide which patterns can run at all: most chat lines hold no '@', no long
# unbroken run of characters and no long run of digits, and skipping the patterns for them is
# what keeps the export fast (benchmarks/export_throughput.py). On CPython a regex alternation
# such as the token prefixes costs more per character than the C string methods used here.
_TOKEN_HINT = re.compile(
    r"xox|xapp-|sk-|gh[pousr]_|github_pat_|AKIA|AIza|glpat-|eyJ|\b[MNO][\w-]{23,27}\."
)
_SECRET_WORDS = ("bearer", "api", "secret", "token", "passw", "pwd")
_NUMBERISH = re.compile(r"\d[\d .()+-]{5,}\d")
# Every token pattern, and a bearer value, is an unbroken run of at least this many characters.
_SHORTEST_TOKEN = 15


def _has_long_run(text: str) -> bool:
    return len(text) >= _SHORTEST_TOKEN and max(map(len, text.split()), default=0) >= (
        _SHORTEST_TOKEN
    )


def redact(text: str) -> str:
    """Replace personal data in ``text`` with typed placeholders."""
    if "@" in text and "://" in text:
        text = _URL_CREDENTIALS.sub(r"\1<CREDENTIALS>@", text)
    long_run = _has_long_run(text)
    if long_run and _TOKEN_HINT.search(text):
        text = _TOKEN.sub("<TOKEN>", text)
    # A secret assignment needs ':' or '='; a bearer value is a long run.
    if long_run or ":" in text or "=" in text:
        lowered = text.lower()
        if any(word in lowered for word in _SECRET_WORDS):
            text = _BEARER.sub(r"\1<TOKEN>", text)
            text = _SECRET_ASSIGNMENT.sub(r"\1<TOKEN>", text)
    if "@" in text:
        text = _EMAIL.sub("<EMAIL>", text)
    if "<@" in text or "<!" in text:
        text = _MENTION.sub("<USER>", text)
    numberish = _NUMBERISH.search(text) is not None
    if numberish:
        text = _CARD.sub(_card, text)
        text = _IPV4.sub("<IP>", text)
    if "::" in text or text.count(":") >= 7:
        text = _IPV6.sub("<IP>", text)
    if numberish and _NUMBERISH.search(text):
        text = _PHONE.sub(_phone, text)
    return text


@dataclass(frozen=True, slots=True)
class Pseudonymizer:
    """Keyed, stable pseudonyms for user ids: the same id gives the same pseudonym under one key,
    and without the key a pseudonym cannot be traced back or recomputed from a guessed id."""

    key: bytes

    def __call__(self, platform: str, user_id: str) -> str:
        # Not cached here: the export, which meets the same users again and again, keeps its
        # own bounded map.
        digest = hmac.digest(self.key, f"{platform}:{user_id}".encode(), "sha256")  # one C call
        return f"user-{digest[:8].hex()}"
