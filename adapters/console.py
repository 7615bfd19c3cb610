"""Local chat in the terminal, through the same pipeline and database as the platforms.

Interactive (a terminal on stdin): readline editing, a ``you>`` prompt, ``/new`` starts a fresh
conversation, ``/quit`` or Ctrl-D leaves. Piped: every input line is a user turn of one
conversation and each reply is printed on its own; with ``json_lines`` each exchange is printed
as one JSON line ``{"user": ..., "agent": ...}`` (a command as ``{"command": ..., "reply": ...}``).

The local chat is its owner's admin console: ``/status``, ``/export``, ``/forget-me``, ``/help``,
``/retrain``, ``/rollback``, ``/model list|use N`` and ``/review [approve|reject|edit N]`` run
the bot's commands (:class:`bot.commands.Commands`) as an admin, a retrain's progress on
stderr; any other ``/word`` is an unknown command, never a message to the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import sys
import uuid
from pathlib import Path
from typing import TextIO

from adapters.base import MessageHandler
from bot.commands import Command, CommandRequest, Commands
from bot.conversation import IncomingMessage, Platform, Role, utcnow

HELP = "Type a message and press Enter. /new starts a fresh conversation, /quit (or Ctrl-D) leaves."

#: The bot commands the console's owner runs as ``/word``; the channel- and reply-bound ones
#: (``correct``, ``training``) have no meaning in a terminal.
CONSOLE_COMMANDS = frozenset(
    {
        Command.STATUS,
        Command.EXPORT,
        Command.FORGET_ME,
        Command.HELP,
        Command.RETRAIN,
        Command.ROLLBACK,
        Command.MODEL,
        Command.REVIEW,
    }
)
_CHANNEL = "terminal"


class ConsoleChat:
    """The console adapter."""

    name = "console"

    def __init__(
        self,
        *,
        handler: MessageHandler,
        commands: Commands,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        json_lines: bool = False,
        interactive: bool | None = None,
        user_id: str | None = None,
    ) -> None:
        self.handler = handler
        self.commands = commands
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
            if not command:
                continue  # an empty line is not a turn
            if command.startswith("/"):
                await self._run_command(command)
                continue
            await self._exchange(text)

    async def _run_command(self, line: str) -> None:
        word, _, arguments = line[1:].partition(" ")
        known = next((c for c in CONSOLE_COMMANDS if c.value == word.lower()), None)
        if known is None:
            self._show_command(line, f"unknown command: /{word}")
            return
        # The console's user owns the bot (they started it): an admin.
        reply = await self.commands.run(
            CommandRequest(
                command=known.value,
                arguments=arguments.strip(),
                platform=Platform.CONSOLE.value,
                workspace="local",
                channel=_CHANNEL,
                thread=self.thread,
                user_id=self.user_id,
                user_name=self.user_id,
                user_is_admin=True,
                progress=self._show_progress,
                attach=self._show_file,
            )
        )
        self._show_command(line, f"{HELP}\n{reply}" if known == Command.HELP else reply)

    async def _show_file(self, path: Path, text: str) -> None:
        print(f"{text}: {path}", file=sys.stderr, flush=True)

    async def _show_progress(self, text: str) -> None:
        """A long command's progress (a retrain), on stderr: stdout holds the answers."""
        print(text, file=sys.stderr, flush=True)

    def _show_command(self, line: str, reply: str) -> None:
        if self.json_lines:
            self._print(json.dumps({"command": line, "reply": reply}, ensure_ascii=False))
        elif self.interactive:
            self._print(f"bot> {reply}")
        else:
            self._print(reply)

    async def _exchange(self, text: str) -> None:
        message = IncomingMessage(
            platform=Platform.CONSOLE.value,
            workspace="local",
            channel=_CHANNEL,
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
