"""The ``chatbot`` command end to end, as a user runs it (a real process, database and model)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from model.corpus import SEED_EXCHANGES

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = "".join(q + "\n" for q, _ in SEED_EXCHANGES)
ANSWERS = [a for _, a in SEED_EXCHANGES]


def chatbot(
    *args: str, cwd: Path, stdin: str | bytes = b"", **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MODEL_PATH"}}
    environment.update(PYTHONPATH=str(REPO), **env)
    data = stdin.encode() if isinstance(stdin, str) else stdin
    completed = subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=data,
        capture_output=True,
        cwd=cwd,  # away from the repo's own .env
        env=environment,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        completed.args,
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )


def exchange_count(db_file: Path) -> int:
    with sqlite3.connect(db_file) as connection:
        return int(connection.execute("SELECT count(*) FROM exchanges").fetchone()[0])


def test_run_without_credentials_chats_over_piped_stdin(tmp_path, tiny_model_dir) -> None:
    # One process for several behaviours: starting torch costs more than any of them.
    stdin = (
        QUESTIONS.encode()
        + b"\n"  # a blank line is no turn
        + b"/new\n"  # a fresh conversation for what follows
        + b"\xff\xfe\x00 broken bytes\n"  # undecodable input does not crash the chat
        + SEED_EXCHANGES[0][0].encode()
        + b"\n"
    )
    result = chatbot("run", cwd=tmp_path, stdin=stdin, MODEL_PATH=str(tiny_model_dir))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ANSWERS
    assert lines[3] == ANSWERS[0]
    assert len(lines) == 4  # one reply per non-empty line, nothing else on stdout
    with sqlite3.connect(tmp_path / "data" / "chatbot.db") as connection:
        conversations = connection.execute("SELECT count(*) FROM conversations").fetchone()[0]
        user_turns = connection.execute(
            "SELECT text FROM messages WHERE role='user' ORDER BY id"
        ).fetchall()
    assert conversations == 2
    assert [t for (t,) in user_turns] == [
        SEED_EXCHANGES[0][0],
        SEED_EXCHANGES[1][0],
        "\ufffd\ufffd\ufffd broken bytes",
        SEED_EXCHANGES[0][0],
    ]
    assert exchange_count(tmp_path / "data" / "chatbot.db") == 4


def test_json_lines_on_postgresql(tmp_path, tiny_model_dir, postgres_database) -> None:
    engine = create_engine(postgres_database.url)
    with engine.connect() as connection:
        before = connection.execute(text("SELECT count(*) FROM exchanges")).scalar_one()
    result = chatbot(
        "chat",
        "--json",
        cwd=tmp_path,
        stdin=QUESTIONS,
        MODEL_PATH=str(tiny_model_dir),
        DATABASE_URL=postgres_database.url,
    )

    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"user": q, "agent": a} for q, a in SEED_EXCHANGES
    ]
    with engine.connect() as connection:
        after = connection.execute(text("SELECT count(*) FROM exchanges")).scalar_one()
    assert after == before + 2
    engine.dispose()


def test_db_upgrade_by_hand(tmp_path) -> None:
    result = chatbot("db", "upgrade", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    with sqlite3.connect(tmp_path / "data" / "chatbot.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == ("0005",)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"},
            "cannot reach the database",
        ),
        ({"DATABASE_URL": "not a url"}, "not a valid SQLAlchemy URL"),
        ({"DATABASE_URL": "mysql+nodriver://x@127.0.0.1/db"}, "cannot use DATABASE_URL"),
        ({"MODEL_PATH": "/nonexistent/model"}, "/nonexistent/model"),
        ({"MAX_NEW_TOKENS": "lots"}, "MAX_NEW_TOKENS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"MODEL_BACKEND": "remote"}, "MODEL_BACKEND=remote needs MODEL_URL"),
        (
            {"MODEL_BACKEND": "remote", "MODEL_URL": "http://127.0.0.1:9/v1", "MODEL_RETRIES": "0"},
            "http://127.0.0.1:9/v1",
        ),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path, env: dict[str, str], message: str) -> None:
    result = chatbot("chat", cwd=tmp_path, stdin=QUESTIONS, **env)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatbot: error: ") and message in line


def test_a_model_folder_that_is_not_a_model_is_one_clear_line(tmp_path) -> None:
    (tmp_path / "empty-model").mkdir()
    result = chatbot(
        "chat", cwd=tmp_path, stdin=QUESTIONS, MODEL_PATH=str(tmp_path / "empty-model")
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("chatbot: error: ")


def test_a_corrupt_model_folder_is_one_clear_line(tmp_path, tiny_model_dir) -> None:
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00 not safetensors " * 64)
    result = chatbot("chat", cwd=tmp_path, stdin=QUESTIONS, MODEL_PATH=str(broken))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatbot: error: ") and "corrupt" in line


def test_export_settings_reach_the_exporter(tmp_path, monkeypatch) -> None:
    from bot.cli import build_exporter
    from bot.config import ConfigurationError, load_settings
    from bot.storage import Database

    monkeypatch.setenv("EXPORT_WORKERS", "3")
    monkeypatch.setenv("EXPORT_CONTEXT_TURNS", "2")
    monkeypatch.setenv("PHONE_REGIONS", "de, fr")
    settings = load_settings(data_dir=tmp_path)
    exporter = build_exporter(settings, Database(f"sqlite:///{tmp_path / 'bot.db'}"))
    assert (exporter.options.workers, exporter.options.context_turns) == (3, 2)
    assert exporter.options.phone_regions == ("DE", "FR")
    assert exporter.options.directory == tmp_path / "exports"
    monkeypatch.setenv("EXPORT_WORKERS", "-1")
    with pytest.raises(ConfigurationError, match="EXPORT_WORKERS"):
        load_settings(data_dir=tmp_path)
    monkeypatch.setenv("EXPORT_WORKERS", "1")
    monkeypatch.setenv("PHONE_REGIONS", "US,Narnia")
    with pytest.raises(ConfigurationError, match="PHONE_REGIONS"):
        load_settings(data_dir=tmp_path)


def test_the_edit_budget_setting_reaches_the_pipeline(tmp_path, monkeypatch) -> None:
    from bot.cli import build_pipeline
    from bot.config import ConfigurationError, load_settings
    from tests.fakes.models import SlowStreamer

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'bot.db'}")
    monkeypatch.setenv("PROGRESS_EDITS_PER_SECOND", "0.5")
    pipeline = build_pipeline(
        load_settings(data_dir=tmp_path), generator=SlowStreamer(words=1, pause=0)
    )
    assert pipeline.options.progress_edits_per_second == 0.5
    monkeypatch.setenv("PROGRESS_EDITS_PER_SECOND", "-1")
    with pytest.raises(ConfigurationError, match="PROGRESS_EDITS_PER_SECOND"):
        load_settings(data_dir=tmp_path)


def test_generation_settings_reach_the_model(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from bot.cli import load_generator
    from bot.config import load_settings
    from model.service import GenerationSettings, ModelService

    monkeypatch.setenv("MODEL_PATH", str(tiny_model_dir))
    monkeypatch.setenv("GENERATION_TEMPERATURE", "0.7")
    monkeypatch.setenv("GENERATION_TOP_P", "0.9")
    monkeypatch.setenv("GENERATION_REPETITION_PENALTY", "1.2")
    monkeypatch.setenv("GENERATION_STOP_STRINGS", "Customer:, ###")
    expected = GenerationSettings(
        temperature=0.7, top_p=0.9, repetition_penalty=1.2, stop_strings=("Customer:", "###")
    )
    monkeypatch.setenv("MODEL_PROCESS", "same")
    model = load_generator(load_settings(data_dir=tmp_path))
    assert isinstance(model, ModelService)
    try:
        assert model.local.generation == expected
    finally:
        model.close()


def test_the_local_model_decodes_in_a_process_of_its_own_by_default(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    from bot.cli import load_generator
    from bot.config import load_settings
    from model.service import GenerationSettings
    from model.worker_process import ModelProcess

    monkeypatch.setenv("MODEL_PATH", str(tiny_model_dir))
    monkeypatch.setenv("GENERATION_TEMPERATURE", "0.7")
    monkeypatch.setenv("BATCH_MAX_SIZE", "7")
    model = load_generator(load_settings(data_dir=tmp_path))
    assert isinstance(model, ModelProcess)
    try:
        child = model._child
        assert child is not None and child.process.poll() is None  # a live child process
        assert child.process.pid != os.getpid()
        assert model.options.generation == GenerationSettings(temperature=0.7)
        assert model.options.batch.max_batch == 7
        assert model.version and model.source == str(tiny_model_dir)
    finally:
        model.close()
    assert child.process.returncode == 0  # closed, not killed


def test_generation_defaults_are_greedy(tmp_path) -> None:
    from bot.config import load_settings

    settings = load_settings(data_dir=tmp_path)
    assert settings.generation_temperature == 0.0
    assert (settings.generation_top_p, settings.generation_repetition_penalty) == (1.0, 1.0)
    assert settings.generation_stop_strings == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENERATION_TEMPERATURE", "-0.5"),
        ("GENERATION_TOP_P", "0"),
        ("GENERATION_TOP_P", "1.5"),
        ("GENERATION_REPETITION_PENALTY", "0"),
        ("GENERATION_REPETITION_PENALTY", "-1"),
    ],
)
def test_invalid_generation_settings_are_one_line(tmp_path, monkeypatch, name, value) -> None:
    from bot.config import ConfigurationError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name) as raised:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(raised.value)


def test_an_unavailable_model_device_is_one_clear_line(tmp_path, tiny_model_dir) -> None:
    result = chatbot(
        "chat",
        cwd=tmp_path,
        stdin=QUESTIONS,
        MODEL_PATH=str(tiny_model_dir),
        MODEL_DEVICE="cuda",
        CUDA_VISIBLE_DEVICES="",  # no GPU, even on a machine that has one
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatbot: error: ") and "device cuda" in line and "not available" in line
    assert result.stdout == ""


@pytest.mark.parametrize(("name", "value"), [("MODEL_DEVICE", "tpu"), ("MODEL_DTYPE", "int8")])
def test_unknown_model_device_or_dtype_is_a_configuration_error(
    tmp_path, monkeypatch, name, value
) -> None:
    from bot.config import ConfigurationError, load_settings

    assert load_settings(data_dir=tmp_path).model_device == "auto"
    assert load_settings(data_dir=tmp_path).model_dtype == "auto"
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings(data_dir=tmp_path)


def test_an_unavailable_device_is_said_before_building_the_default_model(tmp_path) -> None:
    result = chatbot(
        "chat", cwd=tmp_path, stdin=QUESTIONS, MODEL_DEVICE="cuda:1", CUDA_VISIBLE_DEVICES=""
    )

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatbot: error: device cuda:1 is not available")
    assert not (tmp_path / "data" / "model").exists()  # no minutes spent building it first
