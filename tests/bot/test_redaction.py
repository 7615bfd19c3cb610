"""Redaction on a table of real-looking cases, including ones that must stay untouched."""

from __future__ import annotations

import pytest

from bot.redaction import Pseudonymizer, redact

REDACTED = [
    ("mail me at jane.doe+support@example.co.uk please", "mail me at <EMAIL> please"),
    ("CONTACT: BOB_SMITH@Mail.Example.COM.", "CONTACT: <EMAIL>."),
    ("call +1 (415) 555-0132 after 5", "call <PHONE> after 5"),
    ("my number is +44 20 7946 0958", "my number is <PHONE>"),
    ("ring 415-555-0132", "ring <PHONE>"),
    ("office (020) 7946 0958", "office <PHONE>"),
    ("uk landline 020 7946 0958", "uk landline <PHONE>"),
    ("+49 30 901820", "<PHONE>"),
    ("card 4111 1111 1111 1111 exp 12/29", "card <CARD> exp 12/29"),
    ("4111-1111-1111-1111", "<CARD>"),
    ("amex 378282246310005.", "amex <CARD>."),
    ("server 192.168.1.20 is down", "server <IP> is down"),
    ("from 8.8.8.8, then 10.0.0.1", "from <IP>, then <IP>"),
    ("ipv6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 fails", "ipv6 <IP> fails"),
    ("try fe80::1ff:fe23:4567:890a now", "try <IP> now"),
    (
        "git clone https://alice:hunter2@git.example.com/repo.git",
        "git clone https://<CREDENTIALS>@git.example.com/repo.git",
    ),
    ("postgres://app:s3cr3t@db:5432/prod", "postgres://<CREDENTIALS>@db:5432/prod"),
    ("token xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx", "token <TOKEN>"),
    ("xapp-1-A0123456789-1234567890123-abcdef0123456789", "<TOKEN>"),
    (
        "bot token MTA4NzY1NDMyMTA5ODc2NTQzMg.GhIjKl.abcdefghijklmnopqrstuvwxyz0123",
        "bot token <TOKEN>",
    ),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456", "key <TOKEN>"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "<TOKEN>"),
    ("AKIAIOSFODNN7EXAMPLE leaked", "<TOKEN> leaked"),
    ("Authorization: Bearer abcdefghijklmnop1234567890", "Authorization: Bearer <TOKEN>"),
    ("api_key=9f8e7d6c5b4a3210", "api_key=<TOKEN>"),
    ("password: 'correct-horse'", "password: <TOKEN>"),
    ("ask <@U024BE7LH> or <@U123|bob>", "ask <USER> or <USER>"),
    ("thanks <@123456789012345678> and <@!876543210987654321>", "thanks <USER> and <USER>"),
    ("ping <@&112233445566778899> team", "ping <USER> team"),
]

UNTOUCHED = [
    "upgrade to version 1.2.3 or v2.10.4",
    "Windows 10.0.19041.1 build",
    "meeting on 2024-01-15 at 14:30:00",
    "it costs $1,299.99 or €49.50",
    "order #1234567 shipped",
    "order number 123456789012 (not a card)",
    "4111 1111 1111 1112 fails the Luhn check",
    "call me at 5pm, room 101",
    "ratio 16:9 and time 12:30",
    "What is your refund policy?",
    "You can reset your password by clicking on 'Forgot password?' link on the login page.",
    "C++ and C# and e-mail etiquette",
    "the score was 3-1, page 10-12",
    "use @here sparingly",
    "a <b>tag</b> & <i>more</i>",
    "python3.11 -m pip install torch==2.13.0",
]


@pytest.mark.parametrize(("text", "expected"), REDACTED)
def test_redacts(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", UNTOUCHED)
def test_leaves_alone(text: str) -> None:
    assert redact(text) == text


def test_pseudonyms_are_stable_keyed_and_opaque() -> None:
    first, second = Pseudonymizer(b"k1"), Pseudonymizer(b"k2")
    assert first("slack", "U1") == first("slack", "U1")
    assert first("slack", "U1") != first("slack", "U2")
    assert first("slack", "U1") != first("discord", "U1")
    assert first("slack", "U1") != second("slack", "U1")
    assert "U1" not in first("slack", "U1")
