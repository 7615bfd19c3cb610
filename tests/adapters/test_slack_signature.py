"""Slack request verification: the raw-bytes verifier, and the real adapter refusing hostile
requests in HTTP mode with a clear 4xx, never a 5xx or a logged traceback.

The end-to-end tests post to the real :class:`SlackAdapter` (slack-bolt inside) on loopback:
through aiohttp where a request can be well formed, and through a plain socket where the test
needs exact bytes on the wire (non-ASCII header values, repeated headers, a Content-Length
larger than what is sent). Signatures in these tests are computed with ``hmac`` directly, not
with the verifier under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from slack_sdk.signature import SignatureVerifier
from sqlmodel import select

from adapters.slack_adapter import SlackAdapter
from adapters.slack_signature import (
    MAX_AGE_SECONDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SlackSignatureVerifier,
    single_header,
)
from bot.commands import Commands
from bot.config import Settings
from bot.service import PipelineOptions, ReplyGenerator, ReplyPipeline
from bot.storage import Database, MessageRecord, Store
from model.corpus import SEED_EXCHANGES
from tests.fakes.slack_api import BOT_USER_ID, FakeSlackWebApi, event_callback, signed_headers

RESET_QUESTION, RESET_ANSWER = SEED_EXCHANGES[0]
SECRET = "test-signing-secret"
CHANNEL = "C1"
NOW = 1_700_000_000.0


def hmac_signature(body: bytes, timestamp: bytes, *, secret: str = SECRET) -> bytes:
    """Slack's ``v0`` signature, computed here independently of the code under test."""
    digest = hmac.new(secret.encode(), b"v0:" + timestamp + b":" + body, hashlib.sha256)
    return b"v0=" + digest.hexdigest().encode()


# --------------------------------------------------------------------------- the verifier


@pytest.fixture
def verifier() -> SlackSignatureVerifier:
    return SlackSignatureVerifier(SECRET, clock=lambda: NOW)


def test_a_correct_signature_over_bytes_that_are_not_utf8_verifies(
    verifier: SlackSignatureVerifier,
) -> None:
    body = b"\xff\xfe\x00 not utf-8 \xc3"
    stamp = b"1700000000"
    signature = hmac_signature(body, stamp).decode()
    assert verifier.is_valid(body=body, timestamp="1700000000", signature=signature)
    # One byte more, one byte changed, another secret: all refused.
    assert not verifier.is_valid(body=body + b" ", timestamp="1700000000", signature=signature)
    assert not verifier.is_valid(
        body=b"\xfe" + body[1:], timestamp="1700000000", signature=signature
    )
    other = SlackSignatureVerifier("another-secret", clock=lambda: NOW)
    assert not other.is_valid(body=body, timestamp="1700000000", signature=signature)


def test_the_signature_matches_slack_sdk_on_ordinary_requests(
    verifier: SlackSignatureVerifier,
) -> None:
    body = json.dumps({"type": "event_callback", "text": "héllo"})
    expected = SignatureVerifier(SECRET).generate_signature(timestamp="1700000000", body=body)
    assert verifier.sign(timestamp="1700000000", body=body.encode()) == expected
    assert verifier.is_valid(body=body.encode(), timestamp="1700000000", signature=expected)


def test_only_timestamps_within_five_minutes_of_now_verify(
    verifier: SlackSignatureVerifier,
) -> None:
    def valid_at(stamp: int) -> bool:
        signature = verifier.sign(timestamp=str(stamp), body=b"{}")
        return verifier.is_valid(body=b"{}", timestamp=str(stamp), signature=signature)

    assert MAX_AGE_SECONDS == 300
    now = int(NOW)
    assert valid_at(now)
    assert valid_at(now - 300) and valid_at(now + 300)
    assert not valid_at(now - 301)
    assert not valid_at(now + 301)
    assert not valid_at(0)


HOSTILE_TIMESTAMPS = {
    "missing": None,
    "empty": "",
    "non-numeric": "soon",
    "negative": "-1",
    "negative now": "-1700000000",
    "plus sign": "+1700000000",
    "underscores": "1_700_000_000",
    "exponent": "17e8",
    "fraction": "1700000000.0",
    "spaces": " 1700000000 ",
    "arabic-indic digits": "١٧٠٠٠٠٠٠٠٠",
    "fullwidth digits": "１７００００００００",
    "surrogate from a raw byte": "\udcff1700000000",
    "absurd": "9" * 30,
    "huge": "9" * 5_000,
}


@pytest.mark.parametrize("timestamp", HOSTILE_TIMESTAMPS.values(), ids=HOSTILE_TIMESTAMPS.keys())
def test_a_malformed_timestamp_is_invalid_even_when_signed(
    verifier: SlackSignatureVerifier, timestamp: str | None
) -> None:
    # Signed over exactly the bytes sent, so only the timestamp rule can refuse it.
    raw = b"" if timestamp is None else timestamp.encode("utf-8", "surrogateescape")
    signature = hmac_signature(b"{}", raw).decode()
    assert verifier.is_valid(body=b"{}", timestamp=timestamp, signature=signature) is False


HOSTILE_SIGNATURES = {
    "missing": None,
    "empty": "",
    "only the prefix": "v0=",
    "no v0= prefix": "HEX",
    "another version": "v1=HEX",
    "upper-case prefix": "V0=HEX",
    "non-ASCII": "v0=HEX"[:-1] + "é",
    "non-ASCII prefix": "vØ=HEX",
    "surrogate from a raw byte": "v0=\udcffHEX",
    "huge": "v0=" + "0" * 5_000,
    "truncated": "v0=HEX"[:-2],
    "wrong digest": "v0=" + "0" * 64,
}


@pytest.mark.parametrize("template", HOSTILE_SIGNATURES.values(), ids=HOSTILE_SIGNATURES.keys())
def test_a_malformed_signature_is_invalid_and_raises_nothing(
    verifier: SlackSignatureVerifier, template: str | None
) -> None:
    digest = hmac_signature(b"{}", b"1700000000").decode().removeprefix("v0=")
    signature = None if template is None else template.replace("HEX", digest)
    assert verifier.is_valid(body=b"{}", timestamp="1700000000", signature=signature) is False


def test_headers_are_read_case_insensitively_and_must_appear_once(
    verifier: SlackSignatureVerifier,
) -> None:
    signature = hmac_signature(b"{}", b"1700000000").decode()
    headers = CIMultiDict(
        {"x-slack-request-timestamp": "1700000000", "X-SLACK-SIGNATURE": signature}
    )
    assert verifier.is_valid_request(body=b"{}", headers=headers)
    twice = headers.copy()
    twice.add(SIGNATURE_HEADER, signature)
    assert not verifier.is_valid_request(body=b"{}", headers=twice)
    two_stamps = headers.copy()
    two_stamps.add(TIMESTAMP_HEADER, "1700000000")
    assert not verifier.is_valid_request(body=b"{}", headers=two_stamps)
    assert single_header(twice, SIGNATURE_HEADER) is None
    assert single_header(headers, "X-Missing") is None
    assert single_header(headers, TIMESTAMP_HEADER) == "1700000000"


def test_an_empty_signing_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="signing secret"):
        SlackSignatureVerifier("")


# --------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class RawResponse:
    status: int
    body: bytes

    def error(self) -> str:
        """The ``error`` of a JSON error answer (fails the test if it is not one)."""
        return str(json.loads(self.body)["error"])


@dataclass
class Harness:
    """A started adapter in HTTP mode, the fake Web API behind it and ways to post to it."""

    adapter: SlackAdapter
    api: FakeSlackWebApi
    pipeline: ReplyPipeline
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}/slack/events"

    async def raw_post(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes = b"",
        *,
        declared_length: int | None = None,
        within: float = 10.0,
    ) -> RawResponse:
        """POST exactly these header bytes and body over a plain socket; read the answer."""
        assert self.adapter.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.adapter.port)
        try:
            length = len(body) if declared_length is None else declared_length
            head = [
                b"POST /slack/events HTTP/1.1",
                b"Host: 127.0.0.1",
                b"Connection: close",
                b"Content-Length: %d" % length,
                *(name + b": " + value for name, value in headers),
            ]
            writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            await writer.drain()
            async with asyncio.timeout(within):
                status_line = await reader.readline()
                lengths = []
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        lengths.append(int(value))
                answer = await reader.readexactly(lengths[0] if lengths else 0)
            return RawResponse(status=int(status_line.split()[1]), body=answer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def rows(self) -> list[MessageRecord]:
        with self.pipeline.store.database.session() as session:
            return list(session.exec(select(MessageRecord)).all())


def signed(
    body: bytes,
    *,
    timestamp: bytes | None = None,
    content_type: bytes = b"application/json",
) -> list[tuple[bytes, bytes]]:
    """The three headers Slack sends, signed over exactly ``body`` and ``timestamp``."""
    stamp = str(int(time.time())).encode() if timestamp is None else timestamp
    return [
        (b"Content-Type", content_type),
        (b"X-Slack-Request-Timestamp", stamp),
        (b"X-Slack-Signature", hmac_signature(body, stamp)),
    ]


def mention_body(ts: str, text: str = RESET_QUESTION) -> bytes:
    event = {
        "type": "app_mention",
        "user": "U1",
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts,
        "channel": CHANNEL,
    }
    return json.dumps(event_callback(event)).encode()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    # Verification happens before anything touches storage; one database is enough here.
    database = Database(f"sqlite:///{tmp_path / 'chatbot.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
async def slack(sqlite_database: Database, tiny_model: ReplyGenerator) -> AsyncIterator[Harness]:
    api = FakeSlackWebApi()
    await api.start()
    pipeline = ReplyPipeline(
        store=Store(sqlite_database),
        generator=tiny_model,
        options=PipelineOptions(max_new_tokens=64),
    )
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        slack_bot_token="xoxb-test",
        slack_app_token="",
        slack_signing_secret=SECRET,
        slack_port=0,
        slack_api_url=api.url,
    )
    adapter = SlackAdapter(
        settings=settings,
        handler=pipeline,
        commands=Commands(store=pipeline.store, model_version=lambda: tiny_model.version),
        host="127.0.0.1",
        retry_interval=0.2,
    )
    await adapter.start()
    async with aiohttp.ClientSession() as http:
        yield Harness(adapter=adapter, api=api, pipeline=pipeline, http=http)
    await adapter.stop()
    await api.close()


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.exc_info
    ]


def now_stamp() -> bytes:
    return str(int(time.time())).encode()


async def test_hostile_signature_and_timestamp_headers_get_401_without_a_traceback(
    slack: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = mention_body("1700000300.000100")
    stamp = now_stamp()
    good = hmac_signature(body, stamp)
    digest = good.removeprefix(b"v0=")
    content_type = (b"Content-Type", b"application/json")

    def with_signature(*signatures: bytes) -> list[tuple[bytes, bytes]]:
        stamp_header = (b"X-Slack-Request-Timestamp", stamp)
        return [content_type, stamp_header, *((b"X-Slack-Signature", s) for s in signatures)]

    def with_timestamp(*stamps: bytes) -> list[tuple[bytes, bytes]]:
        # Signed over the (first) timestamp sent, so only the timestamp rule can refuse it.
        headers = [content_type, (b"X-Slack-Signature", hmac_signature(body, stamps[0]))]
        return headers + [(b"X-Slack-Request-Timestamp", s) for s in stamps]

    six_minutes = 6 * 60
    cases: dict[str, list[tuple[bytes, bytes]]] = {
        "no headers": [content_type],
        "non-ASCII signature": with_signature(good[:-1] + "é".encode()),
        "raw non-UTF-8 byte in the signature": with_signature(b"v0=\xff" + digest),
        "signature without v0=": with_signature(digest),
        "signature of another version": with_signature(b"v1=" + digest),
        "empty signature": with_signature(b""),
        "huge signature": with_signature(b"v0=" + b"0" * 5_000),
        "forged signature": with_signature(b"v0=" + b"0" * 64),
        "the right signature and a wrong one": with_signature(good, b"v0=" + b"0" * 64),
        "the right signature twice": with_signature(good, good),
        "non-numeric timestamp": with_timestamp(b"soon"),
        "negative timestamp": with_timestamp(b"-1"),
        "negative now": with_timestamp(b"-" + stamp),
        "plus-signed now": with_timestamp(b"+" + stamp),
        "now with underscores": with_timestamp(stamp[:1] + b"_" + stamp[1:]),
        "fractional now": with_timestamp(stamp + b".0"),
        "now in arabic-indic digits": with_timestamp(
            stamp.decode().translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")).encode()
        ),
        "raw non-UTF-8 byte in the timestamp": with_timestamp(b"\xff" + stamp),
        "absurd timestamp": with_timestamp(b"9" * 30),
        "huge timestamp": with_timestamp(b"9" * 5_000),
        "epoch": with_timestamp(b"0"),
        "six minutes ago": with_timestamp(str(int(time.time()) - six_minutes).encode()),
        "six minutes ahead": with_timestamp(str(int(time.time()) + six_minutes).encode()),
        "two timestamps": with_timestamp(stamp, stamp),
    }
    answers = {name: await slack.raw_post(headers, body) for name, headers in cases.items()}

    # Listed by name, so that a failure shows every case that got through or broke.
    assert {name: a.status for name, a in answers.items() if a.status != 401} == {}
    assert {answer.error() for answer in answers.values()} == {"invalid signature"}
    assert error_records(caplog) == []
    await slack.adapter.drain()
    assert slack.api.posted() == []
    assert slack.rows() == []

    # The same request, correctly signed, is still answered.
    assert (await slack.raw_post(signed(body, timestamp=stamp), body)).status == 200
    await slack.adapter.drain()
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]


async def test_a_correctly_signed_request_with_a_malformed_retry_header_is_acked_and_answered_once(
    slack: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    retry_numbers = {
        "1700000400.000100": b"abc",
        "1700000401.000100": b"-1",
        "1700000402.000100": b"9" * 5_000,
        "1700000403.000100": "é".encode(),
        "1700000404.000100": b"\xff\xfe",
    }
    for ts, retry in retry_numbers.items():
        body = mention_body(ts)
        headers = [
            *signed(body),
            (b"X-Slack-Retry-Num", retry),
            (b"X-Slack-Retry-Reason", b"\xffhttp_timeout"),
        ]
        answer = await slack.raw_post(headers, body)
        assert answer.status == 200, (retry, answer)
    await slack.adapter.drain()

    replies = slack.api.posted()
    assert sorted(reply["thread_ts"] for reply in replies) == sorted(retry_numbers)
    assert {reply["text"] for reply in replies} == {RESET_ANSWER}
    assert error_records(caplog) == []


async def test_correctly_signed_bodies_that_bolt_cannot_take_get_a_clear_4xx(
    slack: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    event = mention_body("1700000500.000100")
    cases: dict[str, tuple[bytes, bytes, int, str]] = {
        # name: (content type, body, status, error)
        "empty body": (b"application/json", b"", 400, "empty body"),
        "not UTF-8": (b"application/json", b"\xff\xfe{}", 400, "body is not UTF-8"),
        "malformed JSON": (b"application/json", b'{"type": ', 400, "malformed body"),
        "a JSON list": (b"application/json", b"[1, 2]", 400, "malformed body"),
        "JSON null": (b"application/json", b"null", 400, "malformed body"),
        "a JSON number": (b"application/json", b"42", 400, "malformed body"),
        "a form with a malformed payload": (
            b"application/x-www-form-urlencoded",
            b"payload=%7Bnot-json",
            400,
            "malformed body",
        ),
        "plain text": (b"text/plain", event, 415, "unsupported content type"),
        "XML": (b"application/xml", b"<event/>", 415, "unsupported content type"),
        "a non-ASCII content type": (
            "application/jsön".encode(),
            event,
            415,
            "unsupported content type",
        ),
    }
    answers = {
        name: await slack.raw_post(signed(body, content_type=kind), body)
        for name, (kind, body, _, _) in cases.items()
    }
    no_content_type = [header for header in signed(event) if header[0] != b"Content-Type"]
    answers["no content type"] = await slack.raw_post(no_content_type, event)

    expected = {name: (status, error) for name, (_, _, status, error) in cases.items()}
    expected["no content type"] = (415, "unsupported content type")
    got = {name: (a.status, a.body.decode(errors="replace")) for name, a in answers.items()}
    assert {name: got[name] for name in expected if got[name][0] != expected[name][0]} == {}
    assert {name: (a.status, a.error()) for name, a in answers.items()} == expected
    assert error_records(caplog) == []
    await slack.adapter.drain()
    assert slack.api.posted() == []

    # A charset parameter is fine.
    answer = await slack.raw_post(
        signed(event, content_type=b"application/json; charset=utf-8"), event
    )
    assert answer.status == 200
    await slack.adapter.drain()
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]


async def test_a_declared_10_mb_body_is_refused_with_413_before_it_is_sent(
    slack: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the head goes out: the answer must come without the server waiting for the body.
    ten_mb = 10 * 1024 * 1024
    answer = await slack.raw_post(signed(b""), declared_length=ten_mb, within=5.0)
    assert answer.status == 413
    assert "too large" in answer.error()
    assert error_records(caplog) == []


async def test_a_10_mb_body_sent_in_full_or_chunked_gets_413(
    slack: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    big = b"x" * (10 * 1024 * 1024)
    async with slack.http.post(
        slack.url, data=big, headers=signed_headers(big, secret=SECRET)
    ) as response:
        assert response.status == 413
        assert "too large" in (await response.json())["error"]

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit has to hold while the body is read.
        for _ in range(40):
            yield b"x" * 65_536

    async with slack.http.post(
        slack.url, data=chunks(), headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 413
        assert "too large" in (await response.json())["error"]
    assert error_records(caplog) == []

    # Still serving.
    body = mention_body("1700000600.000100")
    assert (await slack.raw_post(signed(body), body)).status == 200
    await slack.adapter.drain()
    assert [reply["text"] for reply in slack.api.posted()] == [RESET_ANSWER]
