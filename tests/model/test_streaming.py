"""Streaming generation: pieces arrive while the batch decodes; they make the reply."""

from __future__ import annotations

import asyncio

import pytest

from bot.service import StreamingReplyGenerator
from model.corpus import SEED_EXCHANGES
from model.service import ModelService


async def test_stream_yields_pieces_that_add_up_to_the_reply(tiny_model: ModelService) -> None:
    question, answer = SEED_EXCHANGES[0]
    messages = [{"role": "user", "content": question}]
    stream = tiny_model.stream(messages=messages, max_new_tokens=64)
    pieces = [piece async for piece in stream]

    assert isinstance(tiny_model, StreamingReplyGenerator)
    assert len(pieces) > 1  # more than one piece: it streamed
    assert "".join(pieces).strip() == answer
    assert stream.reply is not None and stream.reply.text == answer
    assert (await tiny_model.generate(messages=messages, max_new_tokens=64)).text == answer


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
