"""Verifying that an HTTP request comes from Slack: the ``v0`` signing scheme, over raw bytes.

Slack signs every HTTP request with the app's signing secret: ``X-Slack-Signature`` is
``v0=`` followed by the hex HMAC-SHA256 of ``v0:{X-Slack-Request-Timestamp}:{body}``, and the
timestamp (Unix seconds) must be within five minutes of now, so that a captured request cannot
be replayed later. See https://docs.slack.dev/authentication/verifying-requests-from-slack/.

Usage::

    verifier = SlackSignatureVerifier(settings.slack_signing_secret)
    if not verifier.is_valid_request(body=await request.read(), headers=request.headers):
        ...  # 401
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from multidict import MultiMapping

SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
#: How far the request's timestamp may be from now, either way (Slack's own recommendation).
MAX_AGE_SECONDS = 5 * 60
#: What Slack posts: Events API callbacks as JSON; slash commands, interactivity payloads and
#: SSL checks as forms. Anything else is refused (415) even when correctly signed.
SLACK_CONTENT_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})

_VERSION = b"v0"
_SIGNATURE_PREFIX = _VERSION + b"="
#: ``v0=`` and the 64 hex digits of a SHA-256 digest; anything longer or shorter is not one.
_SIGNATURE_LENGTH = len(_SIGNATURE_PREFIX) + 2 * hashlib.sha256().digest_size
#: Ten digits hold every time until the year 2286; a longer "timestamp" is not a time, and
#: refusing it by its length first keeps ``int()`` away from thousands of digits.
_TIMESTAMP_MAX_DIGITS = 12


class SlackSignatureVerifier:
    """Checks Slack's request signature on the raw request bytes; never raises on bad input.

    This replaces ``slack_sdk.signature.SignatureVerifier`` for the HTTP endpoint because:

    - it compares ``str`` values with ``hmac.compare_digest``, which raises ``TypeError`` on a
      non-ASCII string, so a stranger's signature header such as ``v0=é…`` became a 500 and a
      logged traceback instead of a 401;
    - it turns the timestamp into a number with ``int()``, which raises ``ValueError`` on
      ``soon`` and accepts what Slack never sends (``+1700000000``, ``1_700_000_000``, digits of
      other scripts);
    - it signs a ``str`` body, so the body had to be decoded before it was authenticated, and a
      body that is not UTF-8 could not be checked at all.

    Here the message is ``b"v0:" + timestamp + b":" + body`` on the bytes as received, the
    comparison is ``hmac.compare_digest`` on ``bytes``, and any header value that is missing,
    empty, not ASCII, too long or malformed simply makes the request invalid.
    """

    def __init__(
        self,
        signing_secret: str,
        *,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` returns the current Unix time (injectable for tests).

        Raises:
            ValueError: the signing secret is empty.
        """
        if not signing_secret:
            raise ValueError("the Slack signing secret must not be empty")
        self._key = signing_secret.encode("utf-8")
        self._max_age = max_age
        self._clock = clock

    def sign(self, *, timestamp: str, body: bytes) -> str:
        """The ``X-Slack-Signature`` value Slack would send for this timestamp and body."""
        message = _VERSION + b":" + timestamp.encode("ascii") + b":" + body
        return (_SIGNATURE_PREFIX + _hex_digest(self._key, message)).decode("ascii")

    def is_valid(self, *, body: bytes, timestamp: str | None, signature: str | None) -> bool:
        """Whether ``signature`` signs ``body`` at ``timestamp``, and ``timestamp`` is recent.

        ``timestamp`` and ``signature`` are the header values as the server decoded them
        (``None`` when absent); ``body`` is the request body exactly as received.
        """
        stamp = _ascii(timestamp)
        claimed = _ascii(signature)
        if stamp is None or claimed is None:
            return False
        if not (0 < len(stamp) <= _TIMESTAMP_MAX_DIGITS and stamp.isdigit()):
            return False
        if abs(self._clock() - int(stamp)) > self._max_age:
            return False
        if len(claimed) != _SIGNATURE_LENGTH or not claimed.startswith(_SIGNATURE_PREFIX):
            return False
        expected = _SIGNATURE_PREFIX + _hex_digest(self._key, _VERSION + b":" + stamp + b":" + body)
        return hmac.compare_digest(expected, claimed)

    def is_valid_request(self, *, body: bytes, headers: MultiMapping[str]) -> bool:
        """:meth:`is_valid` with the values taken from case-insensitive request headers (such
        as aiohttp's ``request.headers``). A header sent more than once makes it invalid: which
        of the copies a proxy or a framework would pick is not something to bet on."""
        return self.is_valid(
            body=body,
            timestamp=single_header(headers, TIMESTAMP_HEADER),
            signature=single_header(headers, SIGNATURE_HEADER),
        )


def single_header(headers: MultiMapping[str], name: str) -> str | None:
    """The value of header ``name`` when it was sent exactly once, else ``None``."""
    values = headers.getall(name, [])
    return values[0] if len(values) == 1 else None


def _ascii(value: str | None) -> bytes | None:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape, so a stray byte arrives as
    # a lone surrogate: isascii() refuses that, any other non-ASCII text and None alike.
    if value is None or not value.isascii():
        return None
    return value.encode("ascii")


def _hex_digest(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).hexdigest().encode("ascii")
