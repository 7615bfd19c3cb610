"""Who may use the dashboard: the admin token, one-time login codes, signed session cookies,
CSRF tokens and the rate limit on wrong tokens.

A session is a signed cookie (HMAC-SHA256; HttpOnly, SameSite=Strict): ``<nonce>.<issued>.<sig>``.
Nothing is kept per session on the server but the nonces of sessions logged out; the key is
derived from ``DASHBOARD_TOKEN`` (so sessions outlive a restart, and changing the token logs
everyone out), or random per run when the token is. The CSRF token of a session is an HMAC of
its nonce: every state-changing form carries it in a hidden field.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "chatbot_session"
#: How long a session lasts after login.
SESSION_SECONDS = 12 * 3600
#: How long a login link printed at start works (once).
LOGIN_CODE_SECONDS = 15 * 60
#: Wrong tokens (or codes) one client address may try per window before it waits.
FAILURES_ALLOWED = 5
FAILURE_WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in admin's session."""

    nonce: str
    issued_at: int
    csrf_token: str


class DashboardAuth:
    """Checks tokens and codes, issues and verifies session cookies and CSRF tokens.

    ``clock`` returns seconds (``time.time``); tests pass their own.
    """

    def __init__(self, *, token: str = "", clock: Callable[[], float] = time.time) -> None:
        #: Whether the token was configured (DASHBOARD_TOKEN) rather than made up for this run.
        self.token_configured = bool(token)
        self._token = token or secrets.token_urlsafe(32)
        self._key = hashlib.sha256(b"chatbot-dashboard-session\0" + self._token.encode()).digest()
        self._clock = clock
        self._codes: dict[str, float] = {}  # one-time login code -> when it expires
        self._logged_out: set[str] = set()
        self._failures: dict[str, deque[float]] = {}

    # --- logging in ------------------------------------------------------------------------

    def token_matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token.encode())

    def issue_login_code(self) -> str:
        """A code for ``/login?code=...``: it works once, within ``LOGIN_CODE_SECONDS``."""
        now = self._clock()
        self._codes = {code: until for code, until in self._codes.items() if until > now}
        code = secrets.token_urlsafe(24)
        self._codes[code] = now + LOGIN_CODE_SECONDS
        return code

    def redeem_login_code(self, code: str) -> bool:
        """Whether ``code`` is a live login code; it is spent either way."""
        until = self._codes.pop(code, None)
        return until is not None and until > self._clock()

    # --- the rate limit on wrong tokens ------------------------------------------------------

    def retry_after(self, client: str) -> int:
        """Seconds ``client`` must wait before trying another token; 0 when it may now."""
        now = self._clock()
        failures = self._failures.get(client)
        if not failures:
            return 0
        while failures and failures[0] <= now - FAILURE_WINDOW_SECONDS:
            failures.popleft()
        if len(failures) < FAILURES_ALLOWED:
            return 0
        return max(1, int(failures[0] + FAILURE_WINDOW_SECONDS - now + 0.999))

    def record_failure(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(self._clock())
        if len(self._failures) > 10_000:  # a flood of addresses: forget the oldest
            self._failures.pop(next(iter(self._failures)))

    # --- sessions ----------------------------------------------------------------------------

    def new_session(self) -> tuple[Session, str]:
        """A new session and the cookie value that carries it."""
        nonce = secrets.token_urlsafe(18)
        issued = int(self._clock())
        payload = f"{nonce}.{issued}"
        return self._session(nonce, issued), f"{payload}.{self._sign(payload)}"

    def session_from_cookie(self, value: str | None) -> Session | None:
        """The session a cookie carries; ``None`` when it is missing, forged, expired or
        logged out."""
        if not value or value.count(".") != 2:
            return None
        nonce, issued_text, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{nonce}.{issued_text}")):
            return None
        try:
            issued = int(issued_text)
        except ValueError:
            return None
        if not 0 <= self._clock() - issued < SESSION_SECONDS or nonce in self._logged_out:
            return None
        return self._session(nonce, issued)

    def log_out(self, session: Session) -> None:
        self._logged_out.add(session.nonce)

    def csrf_matches(self, session: Session, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), session.csrf_token.encode())

    def _session(self, nonce: str, issued: int) -> Session:
        return Session(nonce=nonce, issued_at=issued, csrf_token=self._sign(f"csrf:{nonce}"))

    def _sign(self, text: str) -> str:
        digest = hmac.digest(self._key, text.encode(), "sha256")
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def same_origin_request(*, host: str, origin: str | None, fetch_site: str | None) -> bool:
    """Whether a POST comes from a page of the dashboard itself.

    Browsers send ``Sec-Fetch-Site`` (and ``Origin`` on POSTs); either one naming another site
    refuses the request. A client that sends neither (curl, a script) is not a browser another
    site could drive, and still needs the session's CSRF token.
    """
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    if origin is not None:
        if origin == "null":  # sandboxed frames, file: pages
            return False
        _scheme, _, netloc = origin.partition("://")
        return netloc.lower() == host.lower()
    return True
