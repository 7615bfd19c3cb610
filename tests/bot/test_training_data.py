"""Reading exported shards back for training (bot/learning/training_data.py), on shards the real
exporter wrote and on a schema-1 shard as older versions wrote it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.commands import Command
from bot.learning import LearningActions, Pseudonymizer
from bot.learning.training_data import (
    TrainingDataError,
    forgotten_users,
    held_out_key,
    read_training_data,
    shard_folders,
)
from bot.storage import Database, Store
from tests.bot.test_export import KEY, agent_exchange, bot_exchange, exporter_for
from tests.bot.test_learning import request

NOW = datetime.now(UTC)


def export(database: Database, directory: Path) -> None:
    result = exporter_for(database, directory).run()
    assert result.shard is not None


def test_every_shard_is_read_and_the_newest_answer_wins(database: Database, tmp_path: Path) -> None:
    agent_exchange(database, "Where is the office?", "On the second floor.", thread="T1")
    agent_exchange(database, "Who runs payroll?", "Maria runs payroll.", thread="T2")
    export(database, tmp_path)
    agent_exchange(database, "where is the office", "On the third floor now.", thread="T3")
    export(database, tmp_path)
    data = read_training_data(tmp_path, forgotten={})
    answers = {exchange.question: exchange.answer for exchange in data.train}
    assert answers == {
        "where is the office": "On the third floor now.",
        "Who runs payroll?": "Maria runs payroll.",
    }
    assert data.superseded_lines == 1
    first, second = (folder.name for folder in shard_folders(tmp_path))
    assert data.shards == {first: 1, second: 1}
    assert data.held_out == []  # too few to hold any out
    again = read_training_data(tmp_path, forgotten={})
    assert again.fingerprint == data.fingerprint


async def test_forgotten_users_lines_are_dropped_from_older_shards(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "My phone is broken", "Try a restart.", author="U9", rating=1)
    agent_exchange(database, "Who runs payroll?", "Maria runs payroll.", thread="T2")
    export(database, tmp_path)
    store = Store(database)
    learning = LearningActions(
        store=store, exporter=exporter_for(database, tmp_path), pseudonymize=Pseudonymizer(KEY)
    )
    await learning.actions()[Command.FORGET_ME](request("forget-me", user="U9"))
    forgotten = forgotten_users(database)
    assert len(forgotten) == 1
    data = read_training_data(tmp_path, forgotten=forgotten)
    assert [exchange.question for exchange in data.train] == ["Who runs payroll?"]
    assert data.forgotten_lines == 1
    # Someone forgotten before the shard was written is someone who spoke again since.
    earlier = {pseudonym: NOW - timedelta(days=1) for pseudonym in forgotten}
    assert len(read_training_data(tmp_path, forgotten=earlier).train) == 2


def test_a_schema_1_shard_is_read(tmp_path: Path) -> None:
    shard = tmp_path / "shard-20250101T000000Z-abcd"
    shard.mkdir()
    (shard / "messages.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            }
        )
        + "\n"
    )
    (shard / "index.tsv").write_text("7\tpseudo1\thi\tagent\n")
    (shard / "manifest.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "created_at": "2025-01-01T00:00:00+00:00",
                "files": {
                    "messages": {"name": "messages.jsonl", "sha256": "x"},
                    "index": {"name": "index.tsv", "sha256": "y"},
                },
            }
        )
    )
    data = read_training_data(tmp_path, forgotten={})
    assert [(e.question, e.answer, e.pseudonym) for e in data.train] == [
        ("Hi", "Hello!", "pseudo1")
    ]
    assert read_training_data(tmp_path, forgotten={"pseudo1": NOW}).train == []


def test_a_fixed_split_is_held_out_once_there_is_enough(tmp_path: Path) -> None:
    shard = tmp_path / "shard-20250101T000000Z-abcd"
    shard.mkdir()
    lines, index = [], []
    for n in range(300):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{n}"},
                        {"role": "assistant", "content": f"a{n}"},
                    ]
                }
            )
        )
        index.append(f"{n}\tp\tq{n}\tagent")
    (shard / "messages-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    (shard / "index-00000-of-00001.tsv").write_text("\n".join(index) + "\n")
    (shard / "manifest.json").write_text(
        json.dumps(
            {
                "schema_version": 2,
                "created_at": "2025-01-01T00:00:00+00:00",
                "files": {
                    "messages": [{"name": "messages-00000-of-00001.jsonl"}],
                    "index": [{"name": "index-00000-of-00001.tsv"}],
                },
            }
        )
    )
    data = read_training_data(tmp_path, forgotten={}, holdout_from=200, holdout_percent=10)
    held = {e.question_key for e in data.held_out}
    assert 10 <= len(held) <= 60
    assert held == {f"q{n}" for n in range(300) if held_out_key(f"q{n}", percent=10)}
    assert not held & {e.question_key for e in data.train}
    assert read_training_data(tmp_path, forgotten={}, holdout_from=301).held_out == []


@pytest.mark.parametrize("damage", ["manifest", "schema", "lines"])
def test_a_damaged_shard_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    shard = tmp_path / "shard-20250101T000000Z-abcd"
    shard.mkdir()
    manifest = {
        "schema_version": 1 if damage != "schema" else 9,
        "files": {"messages": {"name": "m.jsonl"}, "index": {"name": "i.tsv"}},
    }
    (shard / "manifest.json").write_text("{" if damage == "manifest" else json.dumps(manifest))
    (shard / "m.jsonl").write_text('{"messages": []}\n{"messages": []}\n')
    (shard / "i.tsv").write_text("1\tp\tk\tagent\n")
    with pytest.raises(TrainingDataError, match=shard.name):
        read_training_data(tmp_path, forgotten={})
