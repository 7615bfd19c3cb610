"""``chatbot train`` and ``chatbot model list | use N | rollback`` as a user runs them (real
processes, database, exporter, trainer and registry on the tiny model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.storage import Database
from model.registry import Registry
from tests.bot.test_cli import chatbot
from tests.bot.test_export import agent_exchange

TAUGHT = [
    ("What colour is the office door?", "The office door is green."),
    ("Who waters the plants?", "Sam waters the plants on Fridays."),
]


@pytest.fixture
def bot_home(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, dict[str, str]]:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data = tmp_path / "data"
    data.mkdir()
    database = Database(f"sqlite:///{data / 'chatbot.db'}")
    database.upgrade()
    for n, (question, answer) in enumerate(TAUGHT):
        agent_exchange(database, question, answer, thread=f"T{n}")
    database.dispose()
    env = {
        "DATA_DIR": str(data),
        "MODEL_PATH": str(base),
        "RETRAIN_EPOCHS": "200",
        "RETRAIN_REPLAY_RATIO": "0",  # the tiny model cannot hold the starter corpus
        "RETRAIN_LEARNING_RATE": "0.005",
        "RETRAIN_BATCH_SIZE": "4",
        "RETRAIN_LEARNED_SHARE": "0.5",
        "RETRAIN_MARGIN": "1",  # the tiny model is a toy: keep the gate out of this test
    }
    return tmp_path, env


def test_a_dry_run_reports_the_data_and_trains_nothing(
    bot_home: tuple[Path, dict[str, str]],
) -> None:
    home, env = bot_home
    result = chatbot("train", "--dry-run", cwd=home, **env)
    assert result.returncode == 0, result.stderr
    assert "Dry run, nothing trained" in result.stdout
    assert "Exported 2 exchanges" in result.stdout
    assert "2 exchanges to train on, 0 held out" in result.stdout
    assert not (home / "data" / "models" / "versions").exists()


def test_train_then_list_use_and_roll_back(bot_home: tuple[Path, dict[str, str]]) -> None:
    home, env = bot_home
    trained = chatbot("train", cwd=home, **env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.startswith("Promoted as version 1"), trained.stdout
    assert "Training started" in trained.stderr  # the progress goes to stderr...
    assert "training: 100%" in trained.stderr  # ...with a progress bar to the last step
    registry = Registry(home / "data" / "models", base=env["MODEL_PATH"])
    version = registry.current()
    assert version.number == 1
    assert version.metadata["triggered_by"] == "command line"
    assert version.metadata["exchanges"] == {"train": 2, "held_out": 0}
    assert set(version.metadata["metrics"]) == {"before", "after"}
    assert (version.path / "config.json").is_file()
    assert f"Loss curve: {version.path / 'loss.png'}" in trained.stdout
    assert (version.path / "loss.png").read_bytes().startswith(b"\x89PNG")

    listed = chatbot("model", "list", cwd=home, **env)
    assert listed.returncode == 0
    assert "→ 1:" in listed.stdout and "  0:" in listed.stdout

    back = chatbot("model", "rollback", cwd=home, **env)
    assert back.returncode == 0 and "base model" in back.stdout
    assert registry.current().number == 0
    again = chatbot("model", "rollback", cwd=home, **env)
    assert again.returncode == 2 and "first one served" in again.stderr

    used = chatbot("model", "use", "1", cwd=home, **env)
    assert used.returncode == 0 and registry.current().number == 1
    missing = chatbot("model", "use", "9", cwd=home, **env)
    assert missing.returncode == 2 and "no model version 9" in missing.stderr

    # The bot serves the current version: it answers what version 1 was taught.
    answers = chatbot("chat", "--json", cwd=home, stdin=TAUGHT[0][0] + "\n", **env)
    assert json.loads(answers.stdout.splitlines()[-1])["agent"] == TAUGHT[0][1]


def test_train_refuses_a_remote_model(tmp_path: Path) -> None:
    result = chatbot(
        "train", cwd=tmp_path, MODEL_BACKEND="remote", MODEL_URL="http://127.0.0.1:9/v1"
    )
    assert result.returncode == 2
    assert "local model backend" in result.stderr


def test_a_training_that_fails_is_one_clear_answer(bot_home: tuple[Path, dict[str, str]]) -> None:
    home, env = bot_home
    (Path(env["MODEL_PATH"]) / "model.safetensors").write_bytes(b"not weights")
    result = chatbot("train", cwd=home, **env)
    assert result.returncode == 1
    assert result.stdout.startswith("The retrain failed:")
    assert "The current model serves." in result.stdout
    registry = Registry(home / "data" / "models", base=env["MODEL_PATH"])
    assert [version.number for version in registry.versions()] == [0]
    assert not list((home / "data" / "models" / "versions").iterdir())  # nothing half-written
