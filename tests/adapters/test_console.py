"""The local chat as its owner's admin console: piped lines through the real pipeline, the real
tiny model, the real commands and database."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from sqlmodel import select

from adapters.console import ConsoleChat
from bot.commands import Commands
from bot.learning import Exporter, ExportOptions, LearningActions, Pseudonymizer
from bot.service import PipelineOptions, ReplyGenerator, ReplyPipeline
from bot.storage import Database, MessageRecord, Store
from model.corpus import SEED_EXCHANGES
from model.prompt import format_prompt

REPO = Path(__file__).resolve().parents[2]
RESET_QUESTION, RESET_ANSWER = SEED_EXCHANGES[0]


def console(
    database: Database, model: ReplyGenerator, exports: Path, lines: list[str], **options: bool
) -> tuple[ConsoleChat, io.StringIO]:
    store = Store(database)
    pipeline = ReplyPipeline(
        store=store, generator=model, options=PipelineOptions(max_new_tokens=64)
    )
    exporter = Exporter(
        database=database,
        options=ExportOptions(directory=exports, create_directory=True, include_unrated=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(b"k"),
    )
    learning = LearningActions(store=store, exporter=exporter, pseudonymize=Pseudonymizer(b"k"))
    commands = Commands(
        store=store, model_version=lambda: model.version, actions=learning.actions()
    )
    stdout = io.StringIO()
    chat = ConsoleChat(
        handler=pipeline,
        commands=commands,
        stdin=io.StringIO("".join(line + "\n" for line in lines)),
        stdout=stdout,
        interactive=False,
        user_id="owner",
        **options,
    )
    return chat, stdout


def user_texts(database: Database) -> list[str]:
    with database.session() as session:
        rows = session.exec(select(MessageRecord).where(MessageRecord.role == "user")).all()
    return [row.text for row in rows]


async def test_the_owner_runs_admin_commands_and_other_slash_words_are_unknown(
    database: Database, tiny_model: ReplyGenerator, tmp_path: Path
) -> None:
    chat, stdout = console(
        database,
        tiny_model,
        tmp_path / "exports",
        [
            RESET_QUESTION,
            "/status",
            "/export",
            "/retrain",
            "/rollback",
            "/frobnicate now",
            "/correct Better.",  # not a console command
            "/help",
            "/quit",
            "never read",
        ],
    )
    assert await chat.run() == 0

    output = stdout.getvalue()
    assert output.startswith(RESET_ANSWER + "\nModel: " + tiny_model.version + "\n")
    assert "Conversations: 1, messages: 2, exchanges: 1" in output
    assert "Exported 1 exchanges to shard-" in output
    assert "`retrain` is not available yet." in output
    assert "`rollback` is not available yet." in output
    assert "unknown command: /frobnicate\n" in output
    assert "unknown command: /correct\n" in output
    assert "/new starts a fresh conversation" in output and "`status`:" in output
    assert user_texts(database) == [RESET_QUESTION]  # commands are no conversation turns
    assert "never read" not in output


async def test_forget_me_deletes_what_the_owner_said(
    database: Database, tiny_model: ReplyGenerator, tmp_path: Path
) -> None:
    chat, stdout = console(
        database, tiny_model, tmp_path / "exports", [RESET_QUESTION, "/forget-me"]
    )
    assert await chat.run() == 0

    assert stdout.getvalue().splitlines()[1].startswith("Done. I deleted 2 messages, 1 exchanges")
    assert user_texts(database) == []  # the rows are gone


async def test_json_lines_show_a_command_as_a_json_line_of_its_own(
    database: Database, tiny_model: ReplyGenerator, tmp_path: Path
) -> None:
    chat, stdout = console(
        database,
        tiny_model,
        tmp_path / "exports",
        [RESET_QUESTION, "/status", "/nope"],
        json_lines=True,
    )
    assert await chat.run() == 0

    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert lines[0] == {"user": RESET_QUESTION, "agent": RESET_ANSWER}
    assert lines[1]["command"] == "/status" and lines[1]["reply"].startswith("Model:")
    assert lines[2] == {"command": "/nope", "reply": "unknown command: /nope"}


def test_chatbot_chat_wires_the_commands_into_the_console(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MODEL_PATH"}}
    environment.update(PYTHONPATH=str(REPO), MODEL_PATH=str(tiny_model_dir))
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat"],
        input="/status\n/bogus\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,  # away from the repo's own .env
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("Model: ")
    assert result.stdout.splitlines()[-1] == "unknown command: /bogus"
