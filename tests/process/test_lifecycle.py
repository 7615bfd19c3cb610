"""The systemd-style lifecycle of a real ``chatbot run``: start, ready, serve, SIGTERM, exit 0.

The bot runs as a subprocess in Slack HTTP mode against the fake Web API of this test process,
with the tiny model, a SQLite file or a scratch PostgreSQL, its HTTP server on a free port and
JSON logs: what a unit file (deploy/chatbot.service) and a load balancer see of it.

Select them with ``pytest -m process``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.storage import AnswerState, DeliveryState
from tests.fakes.slack_api import FakeSlackWebApi
from tests.process.harness import ANSWER, PLACEHOLDER_FIRST, answers_by_channel, question_states
from tests.process.test_crash_recovery import (
    Bot,
    arrived,
    bot_messages,
    dm,
    free_port,
    on_channel,
    slack,
)

pytestmark = pytest.mark.process

__all__ = ["slack"]  # the fixture, used by name

#: Families /metrics shows from the start, before any message.
FAMILIES = {
    "chatbot_messages_received",
    "chatbot_replies_sent",
    "chatbot_reply_latency_seconds",
    "chatbot_model_info",
    "chatbot_model_ready",
    "chatbot_generation_batch_size",
    "chatbot_generation_queue_depth",
    "chatbot_generated_tokens",
    "chatbot_generation_tokens_per_second",
    "chatbot_unanswered_messages",
    "chatbot_export_lag_seconds",
    "chatbot_database_up",
    "chatbot_training_state",
    "chatbot_training_last_result",
}


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def wait_ready(bot: Bot, address: str, *, within: float = 120.0) -> dict[str, Any]:
    """Poll /readyz as a load balancer does, until 200 (refused connections included)."""
    deadline = time.monotonic() + within
    while True:
        if bot.process.returncode is not None:
            raise AssertionError(f"the bot exited early:\n{bot.output()}")
        try:
            status, body = await get(f"{address}/readyz")
            if status == 200:
                ready: dict[str, Any] = json.loads(body)
                return ready
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"never ready:\n{bot.output()}")
        await asyncio.sleep(0.1)


def samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, by name and sorted labels."""
    return {
        (found.name, tuple(sorted(found.labels.items()))): found.value
        for family in text_string_to_metric_families(body)
        for found in family.samples
    }


async def test_ready_serve_sigterm_exit_0_nothing_lost(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, slack: FakeSlackWebApi
) -> None:
    web_port = free_port()
    address = f"http://127.0.0.1:{web_port}"
    held = slack.hold("chat.update", when=on_channel("D2", final=True), answer_on_release=True)
    bot = await Bot.start(
        tmp_path=tmp_path,
        database_url=database_url,
        model=tiny_model_dir,
        slack=slack,
        DASHBOARD_PORT=str(web_port),
        LOG_FORMAT="json",
        PLACEHOLDER_DELAY_SECONDS=PLACEHOLDER_FIRST,
    )
    try:
        assert await wait_ready(bot, address) == {"status": "ok", "database": "ok", "model": "ok"}
        assert await get(f"{address}/healthz") == (200, '{"status":"ok"}')
        status, body = await get(f"{address}/metrics")
        assert status == 200
        assert {family.name for family in text_string_to_metric_families(body)} >= FAMILIES

        # One message answered all the way: counted, timed.
        await bot.deliver(dm("D1", "1700000000.000001"))
        answered = (("outcome", "answered"), ("platform", "slack"))
        found = await _scrape_until(address, ("chatbot_messages_received_total", answered), bot)
        assert bot_messages(slack, "D1") == [ANSWER]
        assert found[("chatbot_messages_received_total", answered)] == 1
        assert found[("chatbot_replies_sent_total", answered)] == 1
        assert found[("chatbot_reply_latency_seconds_count", (("platform", "slack"),))] == 1
        assert found[("chatbot_generated_tokens_total", ())] > 0

        # Another one's reply in flight when SIGTERM comes: it finishes, then the bot exits 0.
        await bot.deliver(dm("D2", "1700000000.000002"))
        await arrived(held)
        bot.kill(signal.SIGTERM)
        await bot.wait_for_log("SIGTERM: stopping")
    finally:
        held.release()
    assert await bot.wait_exit() == 0, bot.output()

    assert bot_messages(slack, "D2") == [ANSWER]
    assert answers_by_channel(database_url) == {
        "D1": [(ANSWER, DeliveryState.SENT)],
        "D2": [(ANSWER, DeliveryState.SENT)],
    }
    assert question_states(database_url) == {
        "D1": [AnswerState.ANSWERED],
        "D2": [AnswerState.ANSWERED],
    }
    # Every line on stderr is one JSON object; the lines about one message share its id.
    entries = [json.loads(line) for line in bot.output().splitlines() if line.strip()]
    about = [e for e in entries if str(e.get("request_id", "")).startswith("slack-")]
    by_request: dict[str, set[str]] = {}
    for entry in about:
        by_request.setdefault(entry["request_id"], set()).add(entry["message"].split(" ")[0])
    assert len(by_request) == 2, about
    assert all("answered" in words for words in by_request.values()), by_request
    assert any(e["message"].startswith("HTTP server at") for e in entries)


Sample = tuple[str, tuple[tuple[str, str], ...]]


async def _scrape_until(
    address: str, wanted: Sample, bot: Bot, *, within: float = 60.0
) -> dict[Sample, float]:
    """The samples of /metrics, once ``wanted`` is among them."""
    deadline = time.monotonic() + within
    while True:
        _status, body = await get(f"{address}/metrics")
        found = samples(body)
        if wanted in found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted} never scraped:\n{body}\n{bot.output()}")
        await asyncio.sleep(0.1)
