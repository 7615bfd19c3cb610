"""The chat commands that change the serving model: ``retrain``, ``rollback`` and ``model list``
(admins only, see :mod:`bot.commands`). The model side does the work behind
:class:`ModelControl`; the composition root (``bot.cli``) wires it in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from bot.commands import Command, CommandAction, CommandRequest


class ModelControl(Protocol):
    """What the model side offers the commands; each returns the text for the admin."""

    async def retrain_for(
        self,
        *,
        requested_by: str,
        progress: Callable[[str], Awaitable[None]] | None = None,
        attach: Callable[[Path, str], Awaitable[None]] | None = None,
    ) -> str: ...

    async def rollback_for(self, *, requested_by: str) -> str: ...

    async def use_for(self, *, number: int, requested_by: str) -> str: ...

    def describe_versions(self) -> str: ...


def who(request: CommandRequest) -> str:
    """``platform:user id (name)``: who asked, as the registry records it."""
    return f"{request.platform}:{request.user_id} ({request.user_name})"


class ModelActions:
    """Actions for :class:`bot.commands.Commands`."""

    def __init__(self, control: ModelControl) -> None:
        self.control = control

    def actions(self) -> dict[Command, CommandAction]:
        return {
            Command.RETRAIN: self.retrain,
            Command.ROLLBACK: self.rollback,
            Command.MODEL: self.model,
        }

    async def retrain(self, request: CommandRequest) -> str:
        return await self.control.retrain_for(
            requested_by=who(request), progress=request.progress, attach=request.attach
        )

    async def rollback(self, request: CommandRequest) -> str:
        return await self.control.rollback_for(requested_by=who(request))

    async def model(self, request: CommandRequest) -> str:
        word, _, rest = request.arguments.strip().partition(" ")
        if word in ("", "list"):
            return self.control.describe_versions()
        if word == "use" and rest.strip().isdigit():
            return await self.control.use_for(number=int(rest), requested_by=who(request))
        return "Usage: `model list` or `model use N`."
