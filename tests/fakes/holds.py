"""Holding a fake platform's request at the moment a test wants to act (kill the bot, say)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

Response = TypeVar("Response")


@dataclass
class Hold:
    """One request held until :meth:`release`.

    By default the request is never applied (as if it never reached the platform) and is
    answered with an error when released; with ``apply_first`` it is applied at once and only
    the answer is held (it reached the platform, the client never heard back); with
    ``answer_on_release`` it is applied and answered when released (a slow request).
    ``arrived`` is set when the request comes in.
    """

    apply_first: bool
    answer_on_release: bool
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()

    async def serve(
        self,
        *,
        apply: Callable[[], Awaitable[Response]],
        refuse: Callable[[], Response],
    ) -> Response:
        """Answer the held request: ``apply`` carries it out, ``refuse`` answers it unapplied."""
        self.arrived.set()
        if self.apply_first:
            response = await apply()
            await self.released.wait()
            return response
        await self.released.wait()
        if self.answer_on_release:
            return await apply()
        return refuse()
