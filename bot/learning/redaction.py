"""Redaction of personal data before anything leaves the database as training data.

Each finding becomes a typed placeholder:

- ``<EMAIL>``: e-mail addresses, international ones too (``josé@exämple.de``, ``用户@例子.中国``);
- ``<PHONE>``: phone numbers in international and national formats, found by ``phonenumbers``
  (:data:`DEFAULT_PHONE_REGIONS` decide which national formats count), and ``tel:`` URIs;
- ``<CARD>``: payment card numbers with any separator between digit groups, Luhn checked;
- ``<IBAN>``: bank account numbers (IBAN), with or without spaces, mod-97 checked;
- ``<SSN>``: US social security numbers (``123-45-6789``; no 000/666/9xx area, 00 group or
  0000 serial);
- ``<IP>``: IPv4 and IPv6 addresses (a four-part version number in a version context, such as
  ``version 1.2.3.4`` or ``v10.0.0.1``, is not one);
- ``<CREDENTIALS>``: the user and password in a URL (``https://user:pass@host``);
- ``<TOKEN>``: API keys, tokens, private keys and other secrets, found by detect-secrets'
  detectors (Stripe, AWS, Slack tokens and webhooks, private keys, JWTs, GitHub, GitLab,
  SendGrid, Twilio, …, see :func:`secret_rules`) and a few of our own (Slack app-level, newer
  Discord, OpenAI/Anthropic, GitHub fine-grained, Google keys); values after detect-secrets'
  secret keywords (``password: …``, ``api_key=…``, ``password is …``) and bearer tokens;
- ``<USER>``: platform mentions: Slack ``<@U0123ABC>``, ``<@U0123ABC|name>``, user groups and
  ``<!here>``; Discord ``<@123…>``, ``<@!123…>`` and roles ``<@&123…>``.

User ids become keyed pseudonyms (:class:`Pseudonymizer`). The rules aim at what people paste
into a support chat, and leave version numbers, dates, times, prices, order and invoice numbers
and ISBNs alone (see ``tests/bot/test_redaction.py`` for the table of cases, both ways).

Cost: the libraries' matchers cost far more than the rest (``phonenumbers`` about 80 µs a
line, every detect-secrets detector's regex together about 25 µs; calling the detect-secrets
plugins' own ``analyze_string`` about 115 µs, its ``scan_line`` about 1 ms), against a few µs
for the whole redaction of an ordinary chat line. So the detectors' regexes are taken from the
plugin classes once and run directly; cheap checks (C string methods, one short regex over the
long runs only) decide first whether a line can hold what a matcher looks for at all; and both
libraries are imported on first use (half a second together, with requests, which
detect-secrets imports), not by every export worker at start.
"""

from __future__ import annotations

import functools
import hmac
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Regions whose national phone formats are recognised ("020 7946 0958" is a London number in
#: GB, nothing in the US). Numbers written with their "+" country code are found whatever the
#: regions. Set per export with ``ExportOptions.phone_regions``.
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB")

# --------------------------------------------------------------------------- secrets

#: (start, end) of the secret in ``text`` for a detector's match; None: not a secret after all.
SecretSpan = Callable[[str, re.Match[str]], "tuple[int, int] | None"]

_TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_-")
_DELIMITERS = frozenset(" \t\r\n\"'=:`")


def _token_span(text: str, match: re.Match[str]) -> tuple[int, int]:
    """The secret a detector matched, widened to the whole unbroken run of token characters
    around it: detect-secrets' regexes match a fixed length (``[\\w-]{27}``) or lazily (JWTs),
    and a secret must not leave its tail behind. Where the regex captures the value of an
    assignment (``aws_secret = "…"``), the longest such group is the secret."""
    groups = [
        index
        for index in range(1, (match.re.groups or 0) + 1)
        if match.group(index) is not None and len(match.group(index)) >= 8
    ]
    if groups:
        start, end = match.span(max(groups, key=lambda index: len(match.group(index))))
    else:
        start, end = match.span()
        while start < end and text[start] in _DELIMITERS:  # artifactory's (?:\s|=|:|"|^)
            start += 1
        while end > start and text[end - 1] in _DELIMITERS:
            end -= 1
    while start > 0 and text[start - 1] in _TOKEN_CHARACTERS:
        start -= 1
    while end < len(text) and text[end] in _TOKEN_CHARACTERS:
        end += 1
    while end < len(text) and text[end] == "=":  # base64 padding
        end += 1
    return start, end


def _jwt_span(text: str, match: re.Match[str]) -> tuple[int, int] | None:
    from detect_secrets.plugins.jwt import JwtTokenDetector

    start, end = _token_span(text, match)
    # detect-secrets' own check: the first two parts decode to JSON.
    return (start, end) if JwtTokenDetector.is_formally_valid(text[start:end]) else None


_KEY_END = re.compile(r"-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|Private-MAC: *[0-9a-fA-F]+")


def _key_block_span(text: str, match: re.Match[str]) -> tuple[int, int]:
    """A private key header (all detect-secrets looks for) takes the whole key with it, to its
    END line, or to the end of the text where it was cut off."""
    start = match.start()
    while start > 0 and text[start - 1] == "-":
        start -= 1
    end_marker = _KEY_END.search(text, match.end())
    return start, end_marker.end() if end_marker else len(text)


def _detect_secrets_rules() -> list[tuple[str, re.Pattern[str], SecretSpan]]:
    # Imported on first use: detect-secrets (with requests, which it imports) takes a third of
    # a second to import, which every export worker would pay at start for lines that mostly
    # never need it.
    from detect_secrets.plugins import (
        artifactory,
        aws,
        azure_storage_key,
        cloudant,
        discord,
        github_token,
        gitlab_token,
        ibm_cloud_iam,
        ibm_cos_hmac,
        jwt,
        mailchimp,
        npm,
        openai,
        private_key,
        pypi_token,
        sendgrid,
        slack,
        softlayer,
        square_oauth,
        stripe,
        telegram_token,
        twilio,
    )

    # Every regex-based detector but those the rules below do better for chat text: basic-auth
    # URLs (_URL_CREDENTIALS keeps the host), public IPs (ours know version numbers), keywords
    # (their value runs to the end of a config line; chat is prose). The high-entropy string
    # detectors are left out: commit hashes and checksums are everywhere in support chats.
    detectors = (
        artifactory.ArtifactoryDetector,
        aws.AWSKeyDetector,
        azure_storage_key.AzureStorageKeyDetector,
        cloudant.CloudantDetector,
        discord.DiscordBotTokenDetector,
        github_token.GitHubTokenDetector,
        gitlab_token.GitLabTokenDetector,
        ibm_cloud_iam.IbmCloudIamDetector,
        ibm_cos_hmac.IbmCosHmacDetector,
        jwt.JwtTokenDetector,
        mailchimp.MailchimpDetector,
        npm.NpmDetector,
        openai.OpenAIDetector,
        private_key.PrivateKeyDetector,
        pypi_token.PypiTokenDetector,
        sendgrid.SendGridDetector,
        slack.SlackDetector,
        softlayer.SoftlayerDetector,
        square_oauth.SquareOAuthDetector,
        stripe.StripeDetector,
        telegram_token.TelegramBotTokenDetector,
        twilio.TwilioKeyDetector,
    )
    rules: list[tuple[str, re.Pattern[str], SecretSpan]] = []
    for detector in detectors:
        span: SecretSpan = _token_span
        if detector is jwt.JwtTokenDetector:
            span = _jwt_span
        elif detector is private_key.PrivateKeyDetector:
            span = _key_block_span
        for pattern in detector.denylist:  # class attributes: compiled once, by detect-secrets
            rules.append((str(detector.secret_type), pattern, span))
    return rules


_OWN_SECRET_RULES: list[tuple[str, re.Pattern[str], SecretSpan]] = [
    ("Slack token", re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"), _token_span),
    ("Slack app-level token", re.compile(r"\bxapp-\d-[A-Za-z0-9-]{10,}"), _token_span),
    (
        "Discord bot token",  # newer tokens have longer parts than detect-secrets expects
        re.compile(r"\b[MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,40}"),
        _token_span,
    ),
    ("OpenAI / Anthropic key", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), _token_span),
    ("GitHub fine-grained token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}"), _token_span),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), _token_span),
]


@functools.cache
def secret_rules() -> tuple[tuple[str, re.Pattern[str], SecretSpan], ...]:
    """(name, compiled regex, span of the secret) for every secret detector: detect-secrets'
    (their regexes as the plugin classes compiled them), then our own."""
    return (*_detect_secrets_rules(), *_OWN_SECRET_RULES)


# Cheap checks before the detectors run. Every detector's secret is an unbroken run of at
# least 15 characters (but artifactory's, 11 and more after "AKC" or "AP"), and either starts
# with one of these literals or, 24 characters and more, follows a secret word (the
# assignment-style detectors: AWS secret keys, IBM, Cloudant, npm). The literals are looked
# for in the long runs alone: a regex alternation costs more per character than anything else
# here (7 µs on a 60-character line, against well under 1 µs for the few long runs). Private
# key headers hold spaces: checked on their own.
_SHORTEST_TOKEN = 15
_SHORTEST_ARTIFACTORY_TOKEN = 11
# The assignment-style detectors' secrets: Cloudant's 24 letters, the others 40 and more, all
# of letters, digits and "_-/+" ("request.headers.get('Authorization')" after "token =" is none).
_SHORTEST_ASSIGNED_SECRET = 24
_ASSIGNED_SECRET = re.compile(r"[\w/+-]{24}")
_TOKEN_HINT = re.compile(
    r"xox|xapp-|sk-|[rs]k_live_|gh[pousr]_|github_pat_|A3T|ABIA|ACCA|AKIA|ASIA|AIza"
    r"|gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-|GR1348941|eyJ|SG\.|sq0csp-|pypi-|-us\d"
    r"|(?:AC|SK)[a-z\d]{32}|\d{8}:|[MNO][\w-]{23,27}\.|hooks\.slack\.com|(?i:softlayer)"
)


def _has_secret_word(lowered: str) -> bool:
    """Whether a lower-cased text holds a word that every keyword or assignment rule needs
    (``or`` of C string searches: cheaper than ``any()`` over a generator, or a regex)."""
    return (
        "key" in lowered
        or "pass" in lowered
        or "pw" in lowered
        or "secret" in lowered
        or "token" in lowered
        or "bearer" in lowered
        or "contrase" in lowered
        or "auth" in lowered
    )


_ARTIFACTORY_HINT = re.compile(r"AKC|AP[\dA-F]")


def _may_hold_token(text: str, runs: list[str], longest: int) -> bool:
    """Whether a detector could match ``text``, split into ``runs``, the longest ``longest``
    characters long. Per-run work (a comprehension) only for the few texts with long runs;
    the rest is C string methods."""
    if "PRIVATE KEY" in text or "PuTTY-User-Key" in text:
        return True
    if longest >= _SHORTEST_TOKEN:
        long_runs = [run for run in runs if len(run) >= _SHORTEST_TOKEN]
        if _TOKEN_HINT.search(" ".join(long_runs)):
            return True
        if (
            longest >= _SHORTEST_ASSIGNED_SECRET
            and _ASSIGNED_SECRET.search(" ".join(long_runs))
            and _has_secret_word(text.lower())
        ):
            return True
    return ("AKC" in text or "AP" in text) and _ARTIFACTORY_HINT.search(text) is not None


def _scan_secrets(text: str) -> str:
    """Every detector's findings in ``text`` become ``<TOKEN>``: private keys over the whole
    text (they span lines), the other detectors line by line, as detect-secrets scans a file,
    and only on the lines that pass the cheap checks (a long answer with code has few: running
    every detector over 1,000 characters takes a millisecond)."""
    if "PRIVATE KEY" in text or "PuTTY-User-Key" in text:
        text = _apply_rules(text, _rules_by_reach()[0])
    if "\n" not in text:
        return _apply_rules(text, _rules_by_reach()[1])
    lines = text.split("\n")
    for index, line in enumerate(lines):
        runs = line.split()
        longest = max(map(len, runs), default=0)
        if longest >= _SHORTEST_ARTIFACTORY_TOKEN and _may_hold_token(line, runs, longest):
            lines[index] = _apply_rules(line, _rules_by_reach()[1])  # imported here, if ever
    return "\n".join(lines)


Rules = tuple[tuple[str, re.Pattern[str], SecretSpan], ...]


@functools.cache
def _rules_by_reach() -> tuple[Rules, Rules]:
    """The private key rules (a key spans lines), and the others (within a line)."""
    rules = secret_rules()
    return (
        tuple(rule for rule in rules if rule[2] is _key_block_span),
        tuple(rule for rule in rules if rule[2] is not _key_block_span),
    )


def _apply_rules(text: str, rules: Rules) -> str:
    spans: list[tuple[int, int]] = []
    for _name, pattern, span_of in rules:
        for match in pattern.finditer(text):
            span = span_of(text, match)
            if span is not None and span[1] > span[0]:
                spans.append(span)
    return _replace_spans(text, spans, "<TOKEN>")


def _replace_spans(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    if not spans:
        return text
    pieces: list[str] = []
    position = 0
    for start, end in sorted(spans):
        if end <= position:  # inside the previous one
            continue
        if start < position:  # overlapping: merged into the previous one
            start = position
        else:
            pieces.append(text[position:start])
            pieces.append(placeholder)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


#: detect-secrets' secret keywords (``detect_secrets.plugins.keyword.DENYLIST``), as they are
#: there (a test keeps them equal): importing detect-secrets for them would cost every process
#: that meets a "key: …" line a third of a second.
DETECT_SECRETS_KEYWORDS = (
    "api_?key",
    "auth_?key",
    "service_?key",
    "account_?key",
    "db_?key",
    "database_?key",
    "priv_?key",
    "private_?key",
    "client_?key",
    "db_?pass",
    "database_?pass",
    "key_?pass",
    "password",
    "passwd",
    "pwd",
    "secret",
    "contraseña",
    "contrasena",
)
_KEYWORDS = (
    *DETECT_SECRETS_KEYWORDS,
    r"api-key",
    r"access[_-]?key",
    "token",
    "passcode",
    "passphrase",
)
# ``password: value``, ``api_key=value``, ``"secret" => 'value'``, the keyword maybe part of a
# longer name (``db_password``, ``aws_secret_access_key``). The value is one unbroken run,
# unless quoted (detect-secrets reads a config line's value to the end of the line; chat lines
# go on after it). A placeholder is not a value: redaction can be repeated. The look at the
# first letter before trying every keyword halves the time on a chat line.
_SECRET_ASSIGNMENT = re.compile(
    rf"(?i)(?=[{''.join(sorted({keyword[0] for keyword in _KEYWORDS}))}])"
    rf"((?:{'|'.join(_KEYWORDS)})\w*['\"\]]{{0,2}}\s*(?::=|=>|==|[:=])\s*)"
    r"(?:(['\"`])(?!<[A-Z]+>)[^'\"`\n]{4,}?\2|(?!<[A-Z]+>)[^\s'\"`]{6,})"
)
# "my password is hunter2": in prose, the value counts when quoted or when it does not read as
# a word (it holds a digit, a symbol or an inner capital), so that "the password is incorrect"
# and "the token is expired" stay.
_SECRET_IS = re.compile(
    r"(?i)(?=[acpst])\b((?:password|passwd|passcode|passphrase|pwd|contraseña|contrasena|secret"
    r"|api[ _-]?key|token)\s+(?:is|was)\s*:?\s+)(?:(['\"`])([^'\"`\n]{4,}?)\2|([^\s'\"`]{6,}))"
)
_TRAILING_PUNCTUATION = ".,;:!?)"
_WORDLIKE = re.compile(r"[A-Za-z\u00c0-\u024f][a-z\u00df-\u024f]*(?:-[a-z\u00df-\u024f]+)*")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{16,}=*")


def _prose_secret(match: re.Match[str]) -> str:
    lead, quoted, unquoted = match.group(1), match.group(3), match.group(4)
    if quoted is not None:
        return f"{lead}<TOKEN>"
    value = unquoted.rstrip(_TRAILING_PUNCTUATION)
    tail = unquoted[len(value) :]
    if len(value) < 6 or _WORDLIKE.fullmatch(value) or value.startswith("<"):
        return match.group(0)
    return f"{lead}<TOKEN>{tail}"


_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/:@]+:[^\s/@]+@")

# --------------------------------------------------------------------------- e-mail, mentions

# Unicode local parts and domain labels (``\w`` is Unicode here); a top-level domain of letters
# in any script, or an IDNA one (``xn--``).
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_][\w-]*\.)+(?:[^\W\d_]{2,}|xn--[A-Za-z\d-]+)(?![\w-])"
)
# Slack: <@U0123ABC>, <@U0123ABC|name>, <!subteam^S0123|@team>, <!here>. Discord: <@123…>,
# <@!123…> (nickname form), <@&123…> (roles).
_MENTION = re.compile(r"<@[!&]?[A-Za-z0-9]+(?:\|[^>]*)?>|<!(?:subteam\^)?[A-Za-z0-9]+(?:\|[^>]*)?>")

# --------------------------------------------------------------------------- numbers

# Slack links a phone as <tel:+15551234567|+1 555 123 4567>; elsewhere a bare tel: URI.
_TEL_URI = re.compile(r"(?i)<tel:[^|>\s]*(?:\|[^>]*)?>|\btel:\+?[\d().-]*\d(?:;[\w.=%-]+)*")
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
)
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
# A card number: 13-19 digits unbroken, or groups with one separator throughout (space, no-break
# or thin space, any dash, dot, slash, backslash, underscore), the first group of four as every
# scheme prints it (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3). Dates and times (2024.01.15 12.30.45)
# have shorter groups.
_CARD = re.compile(
    r"(?<![\w.,/\\-])(?:\d{13,19}"
    r"|\d{4}([ \u00a0\u2009\u202f\u2010-\u2015./\\_-])\d{4,6}(?:\1\d{1,6}){1,3})"
    r"(?!\w|[.,/\\-]\d)"
)
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)"
)
# What makes four dotted numbers a version: "v10.0.0.1", "version 1.2.3.4", "Version: …",
# "firmware …", "build …", "upgrade to …" right before them.
_VERSION_BEFORE = re.compile(
    r"(?i)(?:(?<![a-z])v|\b(?:version|ver\.?|release[sd]?|build|firmware|patch|revision|rev"
    r"|(?:up|down)grade[sd]? to|update[sd]? to)(?:\s+(?:number|no\.|id))?(?:\s+(?:is|was|to|of))?"
    r"[\s:=#]*)\Z"
)
# Full, or compressed with "::" and at least one group ("::1"; a bare "::" is Python's s[::-1]).
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?=[0-9A-Fa-f:]*::)(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*)?::[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*"
    r"|[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*::)"
    r"(?![\w:])"
)
# Cheap checks: a run of digits and separators that cards, IBANs, SSNs, IPs and phones all
# have; a phone needs at least seven digits in such a run, and a date alone is not one.
_NUMBERISH = re.compile(r"\d[\d .()/\\_+\u00a0\u2009\u202f\u2010-\u2015-]{5,}\d")
_NOT_DIGIT = re.compile(r"\D+")
_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")
_SHORTEST_PHONE = 7


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


def _isbn13_valid(digits: str) -> bool:
    return (
        len(digits) == 13
        and digits.startswith(("978", "979"))
        and sum(int(char) * (3 if index % 2 else 1) for index, char in enumerate(digits)) % 10 == 0
    )


_IBAN_START = re.compile(r"[A-Z]{2}\d{2} ?\Z")


def _card(match: re.Match[str]) -> str:
    digits = _NOT_DIGIT.sub("", match.group(0))
    if (
        13 <= len(digits) <= 19
        and _luhn_valid(digits)
        and not _isbn13_valid(digits)
        # the digits of an IBAN that failed its check ("DE89 3704 0044 …") are not a card
        and not _IBAN_START.search(match.string, max(0, match.start() - 5), match.start())
    ):
        return "<CARD>"
    return match.group(0)


def _iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _iban(match: re.Match[str]) -> str:
    """The longest valid IBAN at the start of the match, group by group ("DE89 3704 … 00 OK"
    matches with its "OK"); what follows it stays."""
    candidate = match.group(0)
    end = len(candidate)
    while end >= 15:
        if _iban_valid(candidate[:end]):
            return "<IBAN>" + candidate[end:]
        space = candidate.rfind(" ", 0, end)
        end = space if space > 4 else end - 1
    return candidate


def _ipv4(match: re.Match[str]) -> str:
    before = match.string[max(0, match.start() - 40) : match.start()]
    return match.group(0) if _VERSION_BEFORE.search(before) else "<IP>"


def _may_hold_phone(text: str) -> bool:
    for match in _NUMBERISH.finditer(text):
        run = match.group(0)
        if len(_NOT_DIGIT.sub("", run)) >= _SHORTEST_PHONE and not _DATE.fullmatch(run.strip()):
            return True
    return False


def _phones(text: str, regions: Sequence[str]) -> str:
    """Phone numbers found by ``phonenumbers``: valid numbers of their region, grouped as that
    region writes them (STRICT_GROUPING: an order number or a date that happens to be a valid
    number is rarely grouped like one), national formats for ``regions``, international ones
    with their "+" code whatever the region."""
    from phonenumbers import Leniency, PhoneNumberMatcher  # on first use, as detect-secrets

    for region in regions or (None,):
        spans = [
            (found.start, found.end)
            for found in PhoneNumberMatcher(text, region, leniency=Leniency.STRICT_GROUPING)
        ]
        text = _replace_spans(text, spans, "<PHONE>")
    return text


# --------------------------------------------------------------------------- redact


def redact(text: str, *, phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> str:
    """Replace personal data in ``text`` with typed placeholders.

    Order matters: secrets first (they can contain '@', digits and dots), then e-mail,
    mentions, tel: URIs, IBANs, SSNs, cards, IPs, and phones last (the loosest).
    """
    if "@" in text and "://" in text:
        text = _URL_CREDENTIALS.sub(r"\1<CREDENTIALS>@", text)
    runs = text.split()
    longest = max(map(len, runs), default=0)  # C: no Python-level work per run
    if longest >= _SHORTEST_ARTIFACTORY_TOKEN:
        if _may_hold_token(text, runs, longest):
            text = _scan_secrets(text)
    elif "PRIVATE KEY" in text or "PuTTY-User-Key" in text:
        text = _scan_secrets(text)
    colon = ":" in text  # placeholders add none: it stays true where it matters
    # A secret keyword rule needs a secret word and ':', '=', " is " or " was "; a bearer
    # value a run of 16 characters.
    assignment = colon or "=" in text
    prose = " is " in text or " was " in text
    if (assignment or prose or longest >= 16) and _has_secret_word(lowered := text.lower()):
        if longest >= 16 and "bearer" in lowered:
            text = _BEARER.sub(r"\1<TOKEN>", text)
        if assignment:
            text = _SECRET_ASSIGNMENT.sub(r"\1<TOKEN>", text)
        if prose:
            text = _SECRET_IS.sub(_prose_secret, text)
    if "@" in text:
        text = _EMAIL.sub("<EMAIL>", text)
    if "<" in text and ("<@" in text or "<!" in text):
        text = _MENTION.sub("<USER>", text)
    if colon and ("tel:" in text or "TEL:" in text or "Tel:" in text):
        text = _TEL_URI.sub("<PHONE>", text)
    if _NUMBERISH.search(text) is not None:
        text = _IBAN.sub(_iban, text)
        if "-" in text:
            text = _SSN.sub("<SSN>", text)
        text = _CARD.sub(_card, text)
        if "." in text:
            text = _IPV4.sub(_ipv4, text)
        if _may_hold_phone(text):
            text = _phones(text, phone_regions)
    if colon and ("::" in text or text.count(":") >= 7):
        text = _IPV6.sub("<IP>", text)
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
