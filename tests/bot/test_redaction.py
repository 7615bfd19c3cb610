"""Redaction on a table of real-looking cases, including ones that must stay untouched."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.learning import redaction
from bot.learning.redaction import Pseudonymizer, redact

REPO = Path(__file__).resolve().parents[2]

# Secrets of the shapes detect-secrets knows, built from pieces so that no whole fake secret
# sits in the repository for secret scanners to trip over.
STRIPE = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk_" + "live_" + "51H8aBcDeFgHiJkLmNoPqRsT"
SLACK_WEBHOOK = (
    "https://hooks.slack.com/services/" + "T0123ABCD/B0123ABCD/" + "a1B2c3D4e5F6g7H8i9J0k1L2"
)
PRIVATE_KEY = (
    "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEA7vX0yYkz2cQ\nq3m8ZcB2+9x==\n"
    "-----END RSA " + "PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
SENDGRID = "SG." + "ngeVfQFYQlKU0ufo8x5d1A" + "." + "TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc-1s5cr"
TWILIO = "AC" + "b1c9e3a4d5f60718293a4b5c6d7e8f90"
MAILCHIMP = "3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c" + "-us12"
TELEGRAM = "123456789:" + "AAEhBOweik6ad6PsVMRxjeQKJ8n4sBn9Ghs"
SQUARE = "sq0csp-" + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"
PYPI = (
    "pypi-"
    + "AgEIcHlwaS5vcmc"
    + "CJGQ2YjdhZjlkLTc4ZTgtNDM0ZC05MmEzLWU1ZTc3YmFiNDk2OAACKlszLCJ1c2VyIl0" * 2
)
OPENAI = "sk-" + "abcdefghijklmnopqrst" + "T3BlbkFJ" + "uvwxyzABCDEFGHIJKLMN"
NPM = "npm_" + "abcdefghijklmnopqrstuvwxyz0123456789"
HEX48 = "0123456789abcdef" * 3
HEX64 = "fedcba9876543210" * 4
GITLAB = "glpat-" + "xYz12AbC34dEf56GhI78"
GITHUB_OAUTH = "gho_" + "16C7e42F292c6912E7710c838347Ae178B4a"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
AZURE = (
    "AccountKey="
    + "lJzRc1YdHaAA2KCNJJ1tkYwF/+mKK6Ygw0NGe170Xu592euJv2wYUtBlV8z+qnlcNQSnIYVTkLWntUO1F8j8rQ=="
)
DISCORD = "MTIzNDU2Nzg5MDEyMzQ1Njc4." + "GhIjKl." + "abcdefghijklmnopqrstuvwxyz0"
ARTIFACTORY = "AKC" + "p8jRRiQSAbghbuZmHKZcaKWB2"

REDACTED = [
    # e-mail, also with Unicode local parts and domains
    ("mail me at jane.doe+support@example.co.uk please", "mail me at <EMAIL> please"),
    ("CONTACT: BOB_SMITH@Mail.Example.COM.", "CONTACT: <EMAIL>."),
    ("schreib an josé@exämple.de bitte", "schreib an <EMAIL> bitte"),
    ("我的邮箱是 用户@例子.中国", "我的邮箱是 <EMAIL>"),
    ("почта: иван@пример.рф", "почта: <EMAIL>"),
    ("punycode jose@xn--exmple-cua.de ok", "punycode <EMAIL> ok"),
    ("<mailto:jane@example.com|jane@example.com>", "<mailto:<EMAIL>|<EMAIL>>"),
    # phones, national and international (phonenumbers)
    ("call +1 (415) 555-0132 after 5", "call <PHONE> after 5"),
    ("my number is +44 20 7946 0958", "my number is <PHONE>"),
    ("ring 415-555-0132", "ring <PHONE>"),
    ("or (415) 555-0132, or 415.555.0132", "or <PHONE>, or <PHONE>"),
    ("call 4155550132 now", "call <PHONE> now"),
    ("office (020) 7946 0958", "office <PHONE>"),
    ("uk landline 020 7946 0958", "uk landline <PHONE>"),
    ("mobile 07911 123456 or +44 7911 123456", "mobile <PHONE> or <PHONE>"),
    ("+49 30 901820", "<PHONE>"),
    ("portable +33 6 12 34 56 78", "portable <PHONE>"),
    ("+91 98765 43210 (India)", "<PHONE> (India)"),
    ("+86 138 0013 8000", "<PHONE>"),
    ("toll free 1-800-555-0199", "toll free <PHONE>"),
    ("tel:+1-555-123-4567", "<PHONE>"),
    ("dial <tel:+14155550132|+1 415 555 0132> now", "dial <PHONE> now"),
    ("link tel:+44-20-7946-0958;ext=12 here", "link <PHONE> here"),
    # payment cards, any separator, Luhn checked
    ("card 4111 1111 1111 1111 exp 12/29", "card <CARD> exp 12/29"),
    ("4111-1111-1111-1111", "<CARD>"),
    ("4111.1111.1111.1111", "<CARD>"),
    ("4111/1111/1111/1111", "<CARD>"),
    ("4111_1111_1111_1111", "<CARD>"),
    ("mc 5555\u00a05555\u00a05555\u00a04444!", "mc <CARD>!"),
    ("card 4111–1111–1111–1111 ok", "card <CARD> ok"),
    ("amex 378282246310005.", "amex <CARD>."),
    ("amex 3782 822463 10005", "amex <CARD>"),
    # IBANs, mod-97 checked, with and without spaces
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please"),
    ("GB82WEST12345698765432", "<IBAN>"),
    ("pay to FR14 2004 1010 0505 0001 3M02 606.", "pay to <IBAN>."),
    ("NL91ABNA0417164300, thanks", "<IBAN>, thanks"),
    ("CH93 0076 2011 6238 5295 7", "<IBAN>"),
    # US social security numbers
    ("my SSN is 078-05-1120", "my SSN is <SSN>"),
    ("ssn: 123-45-6789.", "ssn: <SSN>."),
    # IP addresses
    ("server 192.168.1.20 is down", "server <IP> is down"),
    ("from 8.8.8.8, then 10.0.0.1", "from <IP>, then <IP>"),
    ("ping 1.2.3.4 please", "ping <IP> please"),
    (
        "connect to 10.0.0.1:8080 or http://192.168.0.1/admin",
        "connect to <IP>:8080 or http://<IP>/admin",
    ),
    ("ipv6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 fails", "ipv6 <IP> fails"),
    ("try fe80::1ff:fe23:4567:890a now", "try <IP> now"),
    ("localhost is ::1 or 127.0.0.1", "localhost is <IP> or <IP>"),
    # credentials in URLs
    (
        "git clone https://alice:hunter2@git.example.com/repo.git",
        "git clone https://<CREDENTIALS>@git.example.com/repo.git",
    ),
    ("postgres://app:s3cr3t@db:5432/prod", "postgres://<CREDENTIALS>@db:5432/prod"),
    # tokens and keys (detect-secrets' detectors, and a few more)
    ("token xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx", "token <TOKEN>"),
    ("xapp-1-A0123456789-1234567890123-abcdef0123456789", "<TOKEN>"),
    (
        "bot token MTA4NzY1NDMyMTA5ODc2NTQzMg.GhIjKl.abcdefghijklmnopqrstuvwxyz0123",
        "bot token <TOKEN>",
    ),
    (f"discord {DISCORD}", "discord <TOKEN>"),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456", "key <TOKEN>"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "<TOKEN>"),
    (f"oauth {GITHUB_OAUTH}.", "oauth <TOKEN>."),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "<TOKEN>"),
    ("maps key AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "maps key <TOKEN>"),
    ("AKIAIOSFODNN7EXAMPLE leaked", "<TOKEN> leaked"),
    (f'aws_secret_access_key = "{AWS_SECRET}"', 'aws_secret_access_key = "<TOKEN>"'),
    (f"stripe {STRIPE} and {STRIPE_RESTRICTED}", "stripe <TOKEN> and <TOKEN>"),
    (f"webhook {SLACK_WEBHOOK} posts", "webhook <TOKEN> posts"),
    (f"here is my key:\n{PRIVATE_KEY}\nthanks", "here is my key:\n<TOKEN>\nthanks"),
    ("-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA", "<TOKEN>"),
    (f"jwt {JWT}", "jwt <TOKEN>"),
    (f"sendgrid {SENDGRID}", "sendgrid <TOKEN>"),
    (f"twilio {TWILIO}", "twilio <TOKEN>"),
    (f"mailchimp {MAILCHIMP}", "mailchimp <TOKEN>"),
    (f"telegram {TELEGRAM}", "telegram <TOKEN>"),
    (f"square {SQUARE}", "square <TOKEN>"),
    (f"pypi {PYPI}", "pypi <TOKEN>"),
    (f"gitlab {GITLAB}", "gitlab <TOKEN>"),
    (f"old openai key {OPENAI}", "old openai key <TOKEN>"),
    (f"//registry.npmjs.org/:_authToken={NPM}", "//registry.npmjs.org/:_authToken=<TOKEN>"),
    (f'cos_hmac_secret_access_key = "{HEX48}"', 'cos_hmac_secret_access_key = "<TOKEN>"'),
    (
        "ibm_cloud_iam_api_key: " + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v2",
        "ibm_cloud_iam_api_key: <TOKEN>",
    ),
    (f"cloudant_password = '{HEX64}'", "cloudant_password = '<TOKEN>'"),
    (
        f"endpoint https://api.softlayer.com/soap/v3/{HEX64.upper()} fails",
        "endpoint https://api.softlayer.com/soap/v3/<TOKEN> fails",
    ),
    (f"azure {AZURE}", "azure <TOKEN>"),
    (f"artifactory {ARTIFACTORY} ok", "artifactory <TOKEN> ok"),
    ("Authorization: Bearer abcdefghijklmnop1234567890", "Authorization: Bearer <TOKEN>"),
    # secret keywords (detect-secrets' keyword list): "password: …", "password is …"
    ("api_key=9f8e7d6c5b4a3210", "api_key=<TOKEN>"),
    ("password: 'correct-horse'", "password: <TOKEN>"),
    ("my password is hunter2", "my password is <TOKEN>"),
    ("the password is 'swordfish', ok?", "the password is <TOKEN>, ok?"),
    ("Password is Tr0ub4dor&3.", "Password is <TOKEN>."),
    ("db_password=s3cr3tP4ss", "db_password=<TOKEN>"),
    ('client_key: "abcd1234efgh"', "client_key: <TOKEN>"),
    ("contraseña: hola1234", "contraseña: <TOKEN>"),
    ("Meeting passcode: 815234", "Meeting passcode: <TOKEN>"),
    # platform mentions: Slack ids, Discord snowflakes (users, nicknames, roles), groups
    ("ask <@U024BE7LH> or <@U123|bob>", "ask <USER> or <USER>"),
    ("cc <@U0123ABC> and <@W0123ABC>", "cc <USER> and <USER>"),
    ("thanks <@123456789012345678> and <@!876543210987654321>", "thanks <USER> and <USER>"),
    ("ping <@&112233445566778899> team", "ping <USER> team"),
    ("ping <@!123> and <@&role>", "ping <USER> and <USER>"),
    ("hey <!subteam^S012AB3CD|@support> and <!here>", "hey <USER> and <USER>"),
]

UNTOUCHED = [
    # version numbers, also four-part ones in a version context
    "upgrade to version 1.2.3 or v2.10.4",
    "Windows 10.0.19041.1 build",
    "upgrade to version 1.2.3.4 tonight",
    "released v10.0.0.1 today",
    "firmware 2.0.0.1 is out, build 1.0.0.123 too",
    "Version: 4.4.0.1",
    "the build number is 1.2.3.4 and the version no. 2.0.0.1",
    "node v18.17.1 and Chrome 120.0.6099.109",
    "python3.11 -m pip install torch==2.13.0",
    # dates and times
    "meeting on 2024-01-15 at 14:30:00",
    "due 12/31/2024, or 31.12.2024, or 2024/12/31",
    "logged 2024-01-15T14:30:00Z and 1999-12-31 23:59:59.123",
    "between 2024.01.15 12.30.45 and 2024.01.16 08.00.00",
    "ratio 16:9 and time 12:30",
    # prices and quantities
    "it costs $1,299.99 or €49.50",
    "total € 1.234,56 or USD 12,345,678.90 or ¥1,000,000",
    "population 8,000,000,000 and pi 3.14159265358979",
    # order, invoice, ticket and tracking numbers
    "order #1234567 shipped",
    "order number 123456789012 (not a card)",
    "order 2024-000123 and PO-2024-11-0042",
    "invoice INV-2024-000123, invoice 2024/0001234, Rechnung Nr. 2024-0815",
    "ticket #4521 and case 00123456",
    "tracking 1Z999AA10123456784",
    # ISBNs (one of them happens to pass the Luhn check)
    "ISBN 978-3-16-148410-0 or 0-306-40615-2",
    "ISBN 9780306406157 and 9783064061569",
    # look-alikes that fail their checks
    "4111 1111 1111 1112 fails the Luhn check",
    "DE89 3704 0044 0532 0130 01 fails the IBAN check",
    "not SSNs: 000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000",
    "+1 555 123 4567 is not a real number",
    # everyday text
    "call me at 5pm, room 101",
    "zip 90210 or SW1A 1AA",
    "What is your refund policy?",
    "You can reset your password by clicking on 'Forgot password?' link on the login page.",
    "Your password is incorrect, and the token is expired.",
    "Password must be at least 8 characters; the password is case-sensitive.",
    "My API key is not working",
    "C++ and C# and e-mail etiquette",
    "the score was 3-1, page 10-12",
    "use @here sparingly",
    "a <b>tag</b> & <i>more</i>",
    "see <#C024BE7LH|general> and <#123456789012345678>",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b and md5 5d41402abc4b2a76b9719d911017c592",
    "internationalization and responsibilities, APACHE and TASK-BASED",
    "AP12345 and ACME-2024",
    "reverse with s[::-1], or std::vector<int> in C++",
]


@pytest.mark.parametrize(("text", "expected"), REDACTED)
def test_redacts(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(("text", "expected"), REDACTED)
def test_redacting_twice_changes_nothing_more(text: str, expected: str) -> None:
    assert redact(expected) == expected


@pytest.mark.parametrize("text", UNTOUCHED)
def test_leaves_alone(text: str) -> None:
    assert redact(text) == text


def test_every_detect_secrets_detector_in_use_has_a_case() -> None:
    """Each detect-secrets plugin whose rules redaction uses is exercised by the table above."""
    covered = {
        name
        for name, pattern, _ in redaction.secret_rules()
        if any(pattern.search(text) for text, _ in REDACTED)
    }
    assert covered == {name for name, _, _ in redaction.secret_rules()}


def test_the_secret_keywords_are_detect_secrets_own() -> None:
    from detect_secrets.plugins.keyword import DENYLIST

    assert redaction.DETECT_SECRETS_KEYWORDS == DENYLIST


def test_phone_regions_decide_national_numbers() -> None:
    assert redact("ring 020 7946 0958", phone_regions=("US",)) == "ring 020 7946 0958"
    assert redact("ring 020 7946 0958", phone_regions=("GB",)) == "ring <PHONE>"
    # International numbers are found whatever the regions.
    assert redact("ring +49 30 901820", phone_regions=()) == "ring <PHONE>"


def test_prose_without_personal_data_never_reaches_the_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Most chat lines hold nothing to redact; cheap checks keep them from the phonenumbers
    matcher and the secret detectors, which cost far more per line (see the README's export
    benchmark)."""
    calls: list[str] = []
    real_phones, real_scan = redaction._phones, redaction._scan_secrets

    def phones(text: str, regions: Sequence[str]) -> str:
        calls.append(f"phones: {text}")
        return real_phones(text, regions)

    def scan(text: str) -> str:
        calls.append(f"secrets: {text}")
        return real_scan(text)

    monkeypatch.setattr(redaction, "_phones", phones)
    monkeypatch.setattr(redaction, "_scan_secrets", scan)
    for line in [
        "Hi, how do I reset my password? I'm on macOS 14.",
        "Quick one: can I export my data as CSV? thanks! [123456]",
        "Use Settings → Export, then choose the format you need and confirm, internationally.",
        "Order 2024-11-28 #5512, €1,299.99, version 1.2.3.",
    ]:
        assert redact(line) == line
    assert calls == []
    assert redact("ring 415-555-0132") == "ring <PHONE>"
    assert redact(f"key {STRIPE}") == "key <TOKEN>"
    assert calls == ["phones: ring 415-555-0132", f"secrets: key {STRIPE}"]


def test_the_libraries_are_imported_on_first_use() -> None:
    """Export workers import this module at start; detect-secrets (with requests) and
    phonenumbers would add half a second to each, for lines that mostly never need them."""
    script = (
        "import sys; import bot.learning.redaction as r; "
        "assert r.redact('Hello, how are you?') == 'Hello, how are you?'; "
        "print(sorted(m for m in ('detect_secrets', 'phonenumbers', 'requests') "
        "if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO
    ).stdout
    assert output.strip() == "[]"


def test_pseudonyms_are_stable_keyed_and_opaque() -> None:
    first, second = Pseudonymizer(b"k1"), Pseudonymizer(b"k2")
    assert first("slack", "U1") == first("slack", "U1")
    assert first("slack", "U1") != first("slack", "U2")
    assert first("slack", "U1") != first("discord", "U1")
    assert first("slack", "U1") != second("slack", "U1")
    assert "U1" not in first("slack", "U1")
