"""Streaming generation: pieces arrive while the batch decodes; they make the reply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from bot.service import StreamingReplyGenerator
from model.batch_requests import BatchSettings
from model.corpus import SEED_EXCHANGES
from model.service import ModelService, TokenFeed


async def test_stream_yields_pieces_that_add_up_to_the_reply(
    tiny_model_token_by_token: ModelService,
) -> None:
    service = tiny_model_token_by_token  # the default hands tokens over in runs, see below
    question, answer = SEED_EXCHANGES[0]
    messages = [{"role": "user", "content": question}]
    stream = service.stream(messages=messages, max_new_tokens=64)
    pieces = [piece async for piece in stream]

    assert isinstance(service, StreamingReplyGenerator)
    assert len(pieces) > 1  # more than one piece: it streamed
    assert "".join(pieces).strip() == answer
    assert stream.reply is not None and stream.reply.text == answer
    assert (await service.generate(messages=messages, max_new_tokens=64)).text == answer


async def test_a_failing_generation_ends_the_stream_with_its_error(
    tiny_model: ModelService,
) -> None:
    with pytest.raises(Exception, match="role"):
        async for _ in tiny_model.stream(
            messages=[{"role": "robot", "content": "x"}], max_new_tokens=8
        ):
            pass
    # The worker is free again afterwards.
    reply = await asyncio.wait_for(
        tiny_model.generate(messages=[{"role": "user", "content": "Hello"}], max_new_tokens=16),
        timeout=60,
    )
    assert reply.text


class _RecordingStreamer:
    """Stands in for AsyncTextIteratorStreamer: notes each hand-over."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        assert not self.ended
        self.puts.append(value.tolist())

    def end(self) -> None:
        self.ended = True


def test_a_stream_gets_its_first_token_at_once_then_runs_at_most_every_interval() -> None:
    now = [0.0]
    streamer = _RecordingStreamer()
    feed = TokenFeed(streamer, interval=0.05, clock=lambda: now[0])
    for at, token in [(0.0, 1), (0.01, 2), (0.02, 3), (0.06, 4), (0.07, 5), (0.08, 6)]:
        now[0] = at
        feed.token(token)

    # 1 at once; 2-4 when 0.05 s had passed since (at 0.06); 5-6 wait for the end.
    assert streamer.puts == [[1], [2, 3, 4]]
    feed.end()
    assert streamer.puts == [[1], [2, 3, 4], [5, 6]] and streamer.ended


def test_a_feed_without_an_interval_hands_over_every_token() -> None:
    streamer = _RecordingStreamer()
    feed = TokenFeed(streamer, interval=0.0, clock=lambda: 0.0)
    for token in (7, 8, 9):
        feed.token(token)
    feed.end()
    assert streamer.puts == [[7], [8], [9]] and streamer.ended


async def test_a_stream_fed_in_runs_adds_up_to_the_same_reply(tiny_model_dir: Path) -> None:
    # A long interval: everything after the first token comes in one run at the end.
    service = ModelService.load(
        tiny_model_dir, device="cpu", batch=BatchSettings(stream_interval=60.0)
    )
    try:
        question, answer = SEED_EXCHANGES[0]
        messages = [{"role": "user", "content": question}]
        stream = service.stream(messages=messages, max_new_tokens=64)
        pieces = [piece async for piece in stream]
        assert "".join(pieces).strip() == answer
        assert len(pieces) <= 2
    finally:
        service.close()
