"""Local chat in the terminal, through the same pipeline and database as the platforms.

Interactive (a terminal on stdin): readline editing, a ``you>`` prompt, ``/new`` starts a fresh
conversation, ``/quit`` or Ctrl-D leaves. Piped: every input line is a user turn of one
conversation and each reply is printed on its own; with ``json_lines`` each exchange is printed
as one JSON line ``{"user": ..., "agent": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import sys
import uuid
from typing import TextIO

from adapters.base import MessageHandler
from bot.conversation import IncomingMessage, Platform, Role, utcnow

HELP = "Type a message and press Enter. /new starts a fresh conversation, /quit (or Ctrl-D) leaves."


class ConsoleChat:
    """The console adapter."""

    name = "console"

    def __init__(
        self,
        *,
        handler: MessageHandler,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        json_lines: bool = False,
        interactive: bool | None = None,
        user_id: str | None = None,
    ) -> None:
        self.handler = handler
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.json_lines = json_lines
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.user_id = user_id or _login_name()
        self.thread = _new_thread_id()

    async def run(self) -> int:
        if self.interactive:
            _enable_line_editing()
            self._print(f"Local chat with the bot. {HELP}")
        while True:
            line = await asyncio.to_thread(self._read_line)
            if line is None:
                return 0
            text = line.rstrip("\r\n")
            command = text.strip()
            if command in {"/quit", "/exit"}:
                return 0
            if command == "/new":
                self.thread = _new_thread_id()
                if self.interactive:
                    self._print("(started a new conversation)")
                continue
            if command == "/help":
                self._print(HELP)
                continue
            if not command:
                continue  # an empty line is not a turn
            await self._exchange(text)

    async def _exchange(self, text: str) -> None:
        message = IncomingMessage(
            platform=Platform.CONSOLE.value,
            workspace="local",
            channel="terminal",
            thread=self.thread,
            author_id=self.user_id,
            author_name=self.user_id,
            role=Role.USER,
            text=text,
            timestamp=utcnow(),
            message_id=uuid.uuid4().hex,
            is_direct=True,
            mentions_bot=True,
        )
        replies: list[str] = []

        async def send(*, text: str, in_reply_to: IncomingMessage) -> str | None:
            replies.append(text)
            return uuid.uuid4().hex

        await self.handler.handle(message, send=send)
        reply = "\n".join(replies)
        if self.json_lines:
            self._print(json.dumps({"user": text, "agent": reply}, ensure_ascii=False))
        elif self.interactive:
            self._print(f"bot> {reply}")
        else:
            self._print(reply)

    def _read_line(self) -> str | None:
        if self.interactive and self.stdin is sys.stdin:
            try:
                return input("you> ")
            except EOFError:
                self._print("")
                return None
        line = self.stdin.readline()
        return line or None

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()


def _new_thread_id() -> str:
    return uuid.uuid4().hex


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local-user"


def _enable_line_editing() -> None:
    # Importing readline gives input() line editing and history; not every platform has it.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
