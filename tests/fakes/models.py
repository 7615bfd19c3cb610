"""Model doubles for tests: a recording wrapper around the real tiny model, a broken model, and
a slow streaming one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from bot.contracts import GeneratedReply
from bot.service import ReplyGenerator


class RecordingModel:
    """The real model, keeping the chat messages it was asked to answer."""

    def __init__(self, inner: ReplyGenerator) -> None:
        self.inner = inner
        self.version = inner.version
        self.prompts: list[list[dict[str, str]]] = []

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> str | GeneratedReply:
        self.prompts.append([dict(m) for m in messages])
        return await self.inner.generate(messages=messages, max_new_tokens=max_new_tokens)


class BrokenModel:
    """A model whose generation fails (out of memory, a corrupt checkpoint...): what cannot be
    provoked in the real one on demand."""

    version = "broken"

    async def generate(self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> str:
        raise RuntimeError("CUDA error: device-side assert triggered")


class SlowStreamer:
    """A streaming generator whose reply comes a word every ``pause`` seconds."""

    version = "slow-1"

    def __init__(self, *, words: int, pause: float) -> None:
        self.words, self.pause = words, pause

    async def generate(self, *, messages: Any, max_new_tokens: int) -> str:
        return " ".join(f"w{n}" for n in range(self.words))

    async def _pieces(self) -> AsyncIterator[str]:
        for n in range(self.words):
            await asyncio.sleep(self.pause)
            yield f"w{n} "

    def stream(self, *, messages: Any, max_new_tokens: int) -> AsyncIterator[str]:
        return self._pieces()
