"""The bot's process keeps what it built at start-up out of the collector's full collections.

A full collection walks every tracked object; in the bot's process (slack-bolt, discord.py,
aiohttp, SQLAlchemy) each took 140-190 ms and stalled every reply in flight. Frozen objects are
the ones ``gc.get_objects()`` no longer lists.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from bot.cli import _serve_adapters
from bot.config import load_settings
from bot.service import PipelineOptions, ReplyPipeline
from bot.storage import Database, Store


@pytest.fixture(autouse=True)
def _unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the session collects as it did


def is_frozen(thing: object) -> bool:
    return not any(tracked is thing for tracked in gc.get_objects())


class Served:
    """An adapter that serves once: it notes what was frozen when it started, then ends."""

    name = "served"

    def __init__(self, built_before: object) -> None:
        self.built_before = built_before
        self.frozen_when_serving: bool | None = None

    async def run(self) -> int:
        self.frozen_when_serving = is_frozen(self.built_before)
        return 0

    def request_stop(self, *, drain_within: float) -> None:
        pass


class Connecting:
    """An adapter that connects first: its platform's state arrives once it is running."""

    name = "connecting"

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self.state_frozen: tuple[bool, bool] | None = None

    async def wait_until_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> int:
        state = [{"guild": n} for n in range(100)]  # what the gateway sent on connecting
        before_ready = is_frozen(state)
        self._ready.set()
        for _ in range(10):  # the settling task runs once it sees the adapter ready
            await asyncio.sleep(0)
        self.state_frozen = (before_ready, is_frozen(state))
        return 0

    def request_stop(self, *, drain_within: float) -> None:
        pass


def pipeline_on(database: Database, tiny_model) -> ReplyPipeline:
    return ReplyPipeline(store=Store(database), generator=tiny_model, options=PipelineOptions())


async def test_what_start_up_built_is_frozen_before_serving(database: Database, tiny_model):
    built_at_start_up = [{"client": n} for n in range(100)]
    assert not is_frozen(built_at_start_up)
    adapter = Served(built_at_start_up)

    status = await _serve_adapters(
        load_settings(_env_file=None),
        pipeline=pipeline_on(database, tiny_model),
        adapters=[adapter],
    )

    assert status == 0
    assert adapter.frozen_when_serving is True


async def test_a_connecting_adapters_state_is_frozen_once_it_is_ready(
    database: Database, tiny_model
):
    adapter = Connecting()

    await _serve_adapters(
        load_settings(_env_file=None),
        pipeline=pipeline_on(database, tiny_model),
        adapters=[adapter],
    )

    assert adapter.state_frozen == (False, True)
