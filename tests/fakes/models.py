"""Model doubles for tests: a recording wrapper around the real tiny model, and a broken model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
