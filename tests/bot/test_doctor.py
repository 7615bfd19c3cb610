"""``chatbot doctor``: each check passing and failing, against real databases (SQLite and
PostgreSQL), real model folders, the fake Slack Web API, the fake Discord and a fake model
server on loopback; and the command itself as a process (one line per check, exit 0 / 1, never
a traceback)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from bot.config import Settings
from bot.doctor import (
    Finding,
    check_database,
    check_discord,
    check_export_dir,
    check_model,
    check_signing_secret,
    check_slack,
)
from bot.migrations import alembic_config
from bot.storage import Database
from tests.conftest import scratch_postgres
from tests.fakes.completions_server import CompletionsServer
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.slack_api import BOT_NAME, TEAM_ID, FakeSlackWebApi

REPO = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **values)  # type: ignore[call-arg]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def one_line(finding: Finding) -> str:
    line = finding.line()
    assert "\n" not in line and "Traceback" not in line
    return line


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlackWebApi]:
    api = FakeSlackWebApi()
    await api.start()
    yield api
    await api.close()


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    server.bot_token = "good-token"
    await server.start()
    yield server
    await server.stop()


# --------------------------------------------------------------------------- database


def test_a_migrated_sqlite_database_passes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chatbot.db'}"
    database = Database(url)
    database.upgrade()
    database.dispose()

    finding = check_database(settings(tmp_path, database_url=url))

    assert finding.status == "ok", finding.line()
    assert "the newest" in finding.detail


def test_a_missing_unmigrated_or_outdated_sqlite_database_fails(tmp_path: Path) -> None:
    path = tmp_path / "chatbot.db"
    url = f"sqlite:///{path}"

    missing = check_database(settings(tmp_path, database_url=url))
    assert missing.failed and "chatbot db upgrade" in missing.detail
    assert not path.exists(), "the check created the database"

    sqlite3.connect(path).close()  # a file with no schema
    empty = check_database(settings(tmp_path, database_url=url))
    assert empty.failed and "not migrated" in one_line(empty)

    database = Database(url)
    command.upgrade(alembic_config(database.engine), "0004")  # one migration behind
    database.dispose()
    behind = check_database(settings(tmp_path, database_url=url))
    assert behind.failed
    assert "at revision 0004, not" in behind.detail and "chatbot db upgrade" in behind.detail


def test_a_bad_database_url_fails_on_one_line(tmp_path: Path) -> None:
    finding = check_database(settings(tmp_path, database_url="not a url"))

    assert finding.failed and "not a valid SQLAlchemy URL" in one_line(finding)


def test_postgresql_migrated_passes_unmigrated_and_unreachable_fail(
    tmp_path: Path, postgres_database: Database
) -> None:
    assert check_database(settings(tmp_path, database_url=postgres_database.url)).status == "ok"
    with scratch_postgres("chatbot_doctor") as empty_url:
        empty = check_database(settings(tmp_path, database_url=empty_url))
    assert empty.failed and "not migrated" in empty.detail

    unreachable = check_database(
        settings(
            tmp_path,
            database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
            "?connect_timeout=3",
        )
    )
    assert unreachable.failed and "cannot reach the database" in one_line(unreachable)


# --------------------------------------------------------------------------- model


async def test_a_model_folder_that_loads_passes(tmp_path: Path, tiny_model_dir: Path) -> None:
    finding = await check_model(settings(tmp_path, model_path=str(tiny_model_dir)))

    assert finding.status == "ok", finding.line()
    assert "loads" in finding.detail and "parameters" in finding.detail


async def test_a_broken_or_missing_model_fails(tmp_path: Path, tiny_model_dir: Path) -> None:
    not_built = await check_model(settings(tmp_path))  # the default model, never built
    assert not_built.failed and "chatbot model init" in not_built.detail

    absent = await check_model(settings(tmp_path, model_path=str(tmp_path / "nowhere")))
    assert absent.failed and "is not a folder" in absent.detail

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    finding = await check_model(settings(tmp_path, model_path=str(no_tokenizer)))
    assert finding.failed and "no a tokenizer" in finding.detail

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    finding = await check_model(settings(tmp_path, model_path=str(truncated)))
    assert finding.failed and "does not load" in one_line(finding)


async def test_large_weights_have_their_headers_read_instead(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bot.doctor.FULL_LOAD_BYTES", 0)  # the tiny model counts as large
    read = await check_model(settings(tmp_path, model_path=str(tiny_model_dir)))
    assert read.status == "ok" and "tensors" in read.detail

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    finding = await check_model(settings(tmp_path, model_path=str(truncated)))
    assert finding.failed and "does not load" in one_line(finding)


async def test_a_remote_model_server_that_answers_passes_and_one_that_does_not_fails(
    tmp_path: Path,
) -> None:
    async with CompletionsServer(model_id="served-model") as server:
        up = await check_model(settings(tmp_path, model_backend="remote", model_url=server.url))
        wrong = await check_model(
            settings(tmp_path, model_backend="remote", model_url=server.url, model_name="other")
        )
    down = await check_model(
        settings(tmp_path, model_backend="remote", model_url=f"http://127.0.0.1:{free_port()}/v1")
    )

    assert up.status == "ok" and "served-model" in up.detail
    assert wrong.failed and "does not serve 'other'" in wrong.detail
    assert down.failed and one_line(down)


# --------------------------------------------------------------------------- Slack


async def test_valid_slack_tokens_pass(tmp_path: Path, slack: FakeSlackWebApi) -> None:
    findings = await check_slack(
        settings(
            tmp_path,
            slack_bot_token="xoxb-good",
            slack_app_token="xapp-good",
            slack_api_url=slack.url,
        )
    )

    assert [(f.check, f.status) for f in findings] == [
        ("slack token", "ok"),
        ("slack app token", "ok"),
    ]
    assert f"@{BOT_NAME}" in findings[0].detail and TEAM_ID in findings[0].detail
    assert slack.calls_of("auth.test") and slack.calls_of("apps.connections.open")


async def test_refused_or_unreachable_slack_tokens_fail_one_line_each(
    tmp_path: Path, slack: FakeSlackWebApi
) -> None:
    slack.fail("auth.test", times=1, error="invalid_auth")
    slack.fail("apps.connections.open", times=1, error="invalid_auth")
    refused = await check_slack(
        settings(
            tmp_path,
            slack_bot_token="xoxb-bad",
            slack_app_token="xapp-bad",
            slack_api_url=slack.url,
        )
    )
    assert [(f.check, f.status) for f in refused] == [
        ("slack token", "FAIL"),
        ("slack app token", "FAIL"),
    ]
    assert "Slack refused SLACK_BOT_TOKEN: invalid_auth" in one_line(refused[0])
    assert "Slack refused SLACK_APP_TOKEN: invalid_auth" in one_line(refused[1])

    swapped = await check_slack(
        settings(tmp_path, slack_bot_token="xapp-1-A0", slack_api_url=slack.url)
    )
    assert [f.status for f in swapped] == ["FAIL"] and "xoxb-" in swapped[0].detail

    unreachable = await check_slack(
        settings(
            tmp_path,
            slack_bot_token="xoxb-good",
            slack_api_url=f"http://127.0.0.1:{free_port()}/api/",
        )
    )
    assert [f.status for f in unreachable] == ["FAIL"]
    assert "cannot reach Slack" in one_line(unreachable[0])


def test_http_mode_needs_the_signing_secret(tmp_path: Path) -> None:
    def status(**values: Any) -> str:
        return check_signing_secret(settings(tmp_path, **values)).status

    assert status() == "skip"
    assert status(slack_bot_token="xoxb-1", slack_app_token="xapp-1") == "ok"
    assert status(slack_bot_token="xoxb-1", slack_signing_secret="secret") == "ok"
    missing = check_signing_secret(settings(tmp_path, slack_bot_token="xoxb-1"))
    assert missing.failed and "SLACK_SIGNING_SECRET" in missing.detail


# --------------------------------------------------------------------------- Discord


async def test_a_valid_discord_token_with_the_intent_on_passes(
    tmp_path: Path, discord_server: FakeDiscord
) -> None:
    findings = await check_discord(
        settings(tmp_path, discord_bot_token="good-token", discord_api_url=discord_server.api_url)
    )

    assert [(f.check, f.status) for f in findings] == [
        ("discord token", "ok"),
        ("discord intent", "ok"),
    ]
    assert discord_server.requests_to("GET", "/users/@me")


async def test_a_wrong_discord_token_or_the_intent_off_fails(
    tmp_path: Path, discord_server: FakeDiscord
) -> None:
    wrong = await check_discord(
        settings(tmp_path, discord_bot_token="bad-token", discord_api_url=discord_server.api_url)
    )
    assert [f.status for f in wrong] == ["FAIL"]
    assert "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized)" in one_line(wrong[0])

    discord_server.message_content_intent = False
    intent_off = await check_discord(
        settings(tmp_path, discord_bot_token="good-token", discord_api_url=discord_server.api_url)
    )
    assert [f.status for f in intent_off] == ["ok", "FAIL"]
    assert "Privileged Gateway Intents" in intent_off[1].detail

    unreachable = await check_discord(
        settings(
            tmp_path,
            discord_bot_token="good-token",
            discord_api_url=f"http://127.0.0.1:{free_port()}/api/v10",
        )
    )
    assert [f.status for f in unreachable] == ["FAIL"]
    assert "cannot reach Discord" in one_line(unreachable[0])


# --------------------------------------------------------------------------- export directory


def test_the_export_directory_must_be_writable(tmp_path: Path) -> None:
    default = check_export_dir(settings(tmp_path))  # DATA_DIR/exports, created when needed
    assert default.status == "ok" and "created on the first export" in default.detail

    existing = tmp_path / "exports"
    existing.mkdir()
    assert check_export_dir(settings(tmp_path, export_dir=existing)).status == "ok"
    assert list(existing.iterdir()) == [], "the write probe stayed behind"

    missing = check_export_dir(settings(tmp_path, export_dir=tmp_path / "absent"))
    assert missing.failed and "does not exist" in missing.detail

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    not_a_dir = check_export_dir(settings(tmp_path, export_dir=a_file))
    assert not_a_dir.failed and "is not a directory" in not_a_dir.detail
    under_a_file = check_export_dir(settings(tmp_path / "a-file" / "data"))
    assert under_a_file.failed and "cannot be created" in under_a_file.detail


# --------------------------------------------------------------------------- the command


async def chatbot_doctor(cwd: Path, **env: str) -> tuple[int, str, str]:
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "DISCORD_", "DATABASE_", "MODEL_", "EXPORT_"))
    }
    environment.update(PYTHONPATH=str(REPO), **env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "doctor",
        cwd=cwd,  # away from the repo's own .env
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_chatbot_doctor_passes_a_good_configuration(
    tmp_path: Path, tiny_model_dir: Path, slack: FakeSlackWebApi, discord_server: FakeDiscord
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'data' / 'chatbot.db'}")
    database.upgrade()
    database.dispose()

    status, stdout, stderr = await chatbot_doctor(
        tmp_path,
        MODEL_PATH=str(tiny_model_dir),
        SLACK_BOT_TOKEN="xoxb-good",
        SLACK_SIGNING_SECRET="secret",
        SLACK_API_URL=slack.url,
        DISCORD_BOT_TOKEN="good-token",
        DISCORD_API_URL=discord_server.api_url,
    )

    assert status == 0, stdout + stderr
    lines = stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * 7, stdout
    assert [line.split(":")[0].split(None, 1)[1] for line in lines] == [
        "database",
        "model",
        "slack token",
        "slack signing secret",
        "discord token",
        "discord intent",
        "export directory",
    ]


async def test_chatbot_doctor_reports_each_problem_on_one_line_and_exits_1(
    tmp_path: Path, slack: FakeSlackWebApi, discord_server: FakeDiscord
) -> None:
    slack.fail("auth.test", times=1, error="invalid_auth")

    status, stdout, stderr = await chatbot_doctor(
        tmp_path,
        MODEL_PATH=str(tmp_path / "no-model"),
        SLACK_BOT_TOKEN="xoxb-bad",  # and no signing secret: HTTP mode cannot verify requests
        SLACK_API_URL=slack.url,
        DISCORD_BOT_TOKEN="bad-token",
        DISCORD_API_URL=discord_server.api_url,
        EXPORT_DIR=str(tmp_path / "no-exports"),
    )

    assert status == 1
    assert "Traceback" not in stdout + stderr
    failed = [line for line in stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == [
        "FAIL database",
        "FAIL model",
        "FAIL slack token",
        "FAIL slack signing secret",
        "FAIL discord token",
        "FAIL export directory",
    ]
    assert len(stdout.splitlines()) == len(failed)


async def test_chatbot_doctor_reports_a_malformed_setting(tmp_path: Path) -> None:
    status, stdout, stderr = await chatbot_doctor(tmp_path, HISTORY_TURNS="many")

    assert status == 1
    assert stdout.startswith("FAIL settings: invalid configuration: HISTORY_TURNS")
    assert "Traceback" not in stdout + stderr
