"""The export on SQLite and PostgreSQL: selection, formats, exactly-once, crash safety, leases."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select

from bot.conversation import Role
from bot.learning import (
    FORMATS,
    Exporter,
    ExportError,
    ExportOptions,
    Pseudonymizer,
    data_files,
    part_name,
    shard_files,
    shard_folders,
)
from bot.storage import (
    AnsweredBy,
    ChannelSettingRecord,
    Database,
    ExchangeRecord,
    ExportShardRecord,
    record_agent_answer,
    record_answer,
    record_correction,
    record_incoming,
    set_rating,
    set_training_opt_out,
    training_allowed,
)
from model.prompt import format_prompt
from tests.conftest import make_message

REPO = Path(__file__).resolve().parents[2]
KEY = b"test-pseudonym-key"


def exporter_for(database: Database, directory: Path, **options: object) -> Exporter:
    return Exporter(
        database=database,
        options=ExportOptions(directory=directory, **options),  # type: ignore[arg-type]
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(KEY),
    )


def bot_exchange(
    database: Database,
    question: str,
    answer: str,
    *,
    thread: str = "T1",
    channel: str = "C1",
    rating: int | None = None,
    author: str = "U1",
    author_name: str | None = None,
    parent_channel: str = "",
    bot_name: str = "bot",
) -> int:
    """A user message answered by the bot (optionally rated); returns the exchange id.
    ``parent_channel``: the channel that ``channel`` is a thread of (Discord)."""
    message = make_message(question, thread=thread, channel=channel, author_id=author)
    message = dataclasses.replace(
        message,
        parent_channel=parent_channel,
        author_name=message.author_name if author_name is None else author_name,
    )
    with database.session() as session:
        asked = record_incoming(session=session, message=message)
        assert asked is not None and asked.id is not None
        reply_id = f"bot-{asked.id}"
        _, exchange = record_answer(
            session=session,
            user_message_id=asked.id,
            text=answer,
            answered_by=AnsweredBy.BOT,
            author_id="bot",
            author_name=bot_name,
            model_version="v1",
            platform_message_id=reply_id,
        )
        if rating is not None:
            set_rating(
                session=session,
                platform="console",
                channel=channel,
                answer_message_id=reply_id,
                rater_id="rater",
                value=rating,
            )
    assert exchange.id is not None
    return exchange.id


def agent_exchange(
    database: Database,
    question: str,
    answer: str,
    *,
    thread: str,
    author_name: str | None = None,
    agent_name: str | None = None,
) -> None:
    asked = make_message(question, thread=thread)
    answered = make_message(answer, thread=thread, author_id="AGENT", role=Role.HUMAN_AGENT)
    if author_name is not None:
        asked = dataclasses.replace(asked, author_name=author_name)
    if agent_name is not None:
        answered = dataclasses.replace(answered, author_name=agent_name)
    with database.session() as session:
        record_incoming(session=session, message=asked)
        record_agent_answer(session=session, message=answered)


def read_lines(shard: Path, key: str) -> list[dict]:
    return [
        json.loads(line)
        for path in shard_files(shard, key)
        for line in path.read_text().splitlines()
    ]


def all_exported_users(directory: Path) -> list[str]:
    return [
        line["user"]
        for shard in shard_folders(directory)
        for line in read_lines(shard, "completions")
    ]


def test_selects_agent_answers_corrections_and_upvoted_replies(
    database: Database, tmp_path: Path
) -> None:
    agent_exchange(database, "How do I export data?", "Use Settings → Export.", thread="agent")
    bot_exchange(database, "Is there an API?", "Yes, a REST API.", thread="up", rating=1)
    bot_exchange(database, "Unrated question?", "Unrated answer.", thread="plain")
    bot_exchange(database, "Bad question?", "Wrong answer.", thread="down", rating=-1)
    bot_exchange(database, "Corrected question?", "A poor answer.", thread="fix")
    with database.session() as session:
        assert record_correction(
            session=session,
            platform="console",
            channel="C1",
            thread="fix",
            corrected_message_id=None,
            text="A much better answer.",
            admin_id="ADMIN",
            admin_name="Admin",
        )
    result = exporter_for(database, tmp_path).run()

    assert result.shard is not None and result.path is not None
    pairs = {(line["user"], line["agent"]) for line in read_lines(result.path, "completions")}
    assert pairs == {
        ("How do I export data?", "Use Settings → Export."),
        ("Is there an API?", "Yes, a REST API."),
        ("Corrected question?", "A much better answer."),
    }
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["sources"] == {"correction": 1, "human_agent": 1, "upvoted": 1}
    assert manifest["exchanges"] == 3 and manifest["schema_version"] == 2


def test_unrated_replies_only_when_asked_and_never_downvoted(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "Unrated question?", "Unrated answer.", thread="plain")
    bot_exchange(database, "Bad question?", "Wrong answer.", thread="down", rating=-1)
    result = exporter_for(database, tmp_path, include_unrated=True).run()

    assert result.path is not None
    assert [line["user"] for line in read_lines(result.path, "completions")] == [
        "Unrated question?"
    ]


def test_the_three_formats_carry_the_same_exchange_with_context(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "Hello", "Hi! How can I help?", thread="ctx")
    bot_exchange(
        database, "How do I reset my password?", "Click 'Forgot password?'.", thread="ctx", rating=1
    )
    result = exporter_for(database, tmp_path).run()

    assert result.path is not None
    [completion] = read_lines(result.path, "completions")
    [instruct] = read_lines(result.path, "instruct")
    [conversation] = read_lines(result.path, "messages")
    expected_messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Click 'Forgot password?'."},
    ]
    assert completion == {
        "user": "How do I reset my password?",
        "agent": "Click 'Forgot password?'.",
    }
    assert conversation == {"messages": expected_messages}
    assert instruct == {"text": format_prompt(expected_messages)}
    assert instruct["text"] == (
        "<s>[INST] Hello [/INST] Hi! How can I help? </s>"
        "<s>[INST] How do I reset my password? [/INST] Click 'Forgot password?'. </s>"
    )


def test_datasets_and_trl_take_the_messages_form_as_it_is(
    database: Database, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import is_conversational

    for n in range(3):
        bot_exchange(database, f"Question {n}?", f"Answer {n}.", thread=f"t{n}", rating=1)
    result = exporter_for(database, tmp_path).run()

    assert result.path is not None
    loaded = datasets.load_dataset(
        "json", data_files=data_files(result.path, "messages"), split="train"
    )
    assert loaded.column_names == ["messages"] and len(loaded) == 3
    assert all(is_conversational(example) for example in loaded)
    completions = datasets.load_dataset(
        "json", data_files=data_files(result.path, "completions"), split="train"
    )
    assert sorted(completions.column_names) == ["agent", "user"]


def test_near_duplicates_are_exported_once_newest_answer_wins(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "How do I reset my password?", "Old answer.", thread="a", rating=1)
    bot_exchange(database, "how do i reset my password", "Newer answer.", thread="b", rating=1)
    bot_exchange(database, "How do I reset my password!!", "Newest answer.", thread="c", rating=1)
    bot_exchange(database, "Something else?", "Other.", thread="d", rating=1)
    result = exporter_for(database, tmp_path).run()

    assert result.path is not None
    answers = sorted(line["agent"] for line in read_lines(result.path, "completions"))
    assert answers == ["Newest answer.", "Other."]
    assert result.superseded == 2
    again = exporter_for(database, tmp_path).run()
    assert again.shard is None  # the superseded ones were consumed too


def test_each_run_exports_only_what_is_new(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "First?", "One.", thread="a", rating=1)
    late = bot_exchange(database, "Rated later?", "Two.", thread="b")
    first = exporter_for(database, tmp_path).run()
    nothing = exporter_for(database, tmp_path).run()
    with database.session() as session:
        set_rating(
            session=session,
            platform="console",
            channel="C1",
            answer_message_id=_answer_platform_id(database, late),
            rater_id="rater",
            value=1,
        )
    bot_exchange(database, "Third?", "Three.", thread="c", rating=1)
    second = exporter_for(database, tmp_path).run()

    assert (
        first.exchanges == 1
        and nothing.shard is None
        and nothing.describe() == "Nothing new to export."
    )
    assert second.path is not None
    assert sorted(all_exported_users(tmp_path)) == ["First?", "Rated later?", "Third?"]
    assert len(shard_folders(tmp_path)) == 2


def _answer_platform_id(database: Database, exchange_id: int) -> str:
    with database.session() as session:
        exchange = session.get(ExchangeRecord, exchange_id)
        assert exchange is not None
        return f"bot-{exchange.user_message_id}"


def test_redaction_and_pseudonyms_before_anything_is_written(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(
        database,
        "I'm jane@example.com, call +1 (415) 555-0132",
        "Thanks <@U024BE7LH>, card 4111 1111 1111 1111 noted.",
        rating=1,
        author="U-jane",
    )
    result = exporter_for(database, tmp_path).run()

    assert result.path is not None
    [line] = read_lines(result.path, "completions")
    assert line == {
        "user": "I'm <EMAIL>, call <PHONE>",
        "agent": "Thanks <USER>, card <CARD> noted.",
    }
    everything = "".join(
        path.read_text() for key in FORMATS for path in shard_files(result.path, key)
    )
    assert "jane@example.com" not in everything and "U-jane" not in everything
    [index_file] = shard_files(result.path, "index")
    [index_line] = index_file.read_text().splitlines()
    assert index_line.split("\t")[1] == Pseudonymizer(KEY)("console", "U-jane")


def test_opted_out_channels_and_deleted_messages_stay_out(
    database: Database, tmp_path: Path
) -> None:
    with database.session() as session:
        set_training_opt_out(
            session=session, platform="console", channel="private", opt_out=True, updated_by="A"
        )
    bot_exchange(database, "Private question?", "Private answer.", channel="private", rating=1)
    bot_exchange(database, "Public question?", "Public answer.", channel="public", rating=1)
    gone = bot_exchange(database, "Deleted question?", "Answer.", thread="del", rating=1)
    with database.session() as session:
        exchange = session.get(ExchangeRecord, gone)
        assert exchange is not None
        session.execute(
            text("UPDATE messages SET deleted_at = stored_at, text = '' WHERE id = :id"),
            {"id": exchange.user_message_id},
        )
        session.commit()
    exporter_for(database, tmp_path).run()

    assert all_exported_users(tmp_path) == ["Public question?"]


def test_phone_regions_are_an_export_option(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Ring 020 7946 0958 or +49 30 901820?", "Will do.", rating=1)
    default = exporter_for(database, tmp_path / "default", create_directory=True).run()
    with database.engine.begin() as connection:
        connection.execute(text("DELETE FROM export_marks"))
    us_only = exporter_for(
        database, tmp_path / "us", create_directory=True, phone_regions=("US",)
    ).run()

    assert default.path is not None and us_only.path is not None
    assert [line["user"] for line in read_lines(default.path, "completions")] == [
        "Ring <PHONE> or <PHONE>?"
    ]
    assert [line["user"] for line in read_lines(us_only.path, "completions")] == [
        "Ring 020 7946 0958 or <PHONE>?"
    ]


def test_training_off_covers_the_threads_of_a_channel(database: Database, tmp_path: Path) -> None:
    with database.session() as session:
        set_training_opt_out(
            session=session, platform="console", channel="parent", opt_out=True, updated_by="A"
        )
    in_thread = bot_exchange(
        database,
        "Thread question?",
        "Answer.",
        channel="thread-1",
        parent_channel="parent",
        rating=1,
    )
    bot_exchange(database, "Elsewhere?", "Answer.", channel="other", rating=1)

    with database.session() as session:
        exchange = session.get(ExchangeRecord, in_thread)
        assert exchange is not None and exchange.for_training is False
        assert not training_allowed(
            session=session, platform="console", channel="thread-1", parent_channel="parent"
        )
        # Without the parent given, it is the one recorded with the thread's conversation.
        assert not training_allowed(session=session, platform="console", channel="thread-1")
        assert not training_allowed(session=session, platform="console", channel="parent")
        assert training_allowed(session=session, platform="console", channel="other")
        assert training_allowed(
            session=session, platform="console", channel="thread-2", parent_channel="elsewhere"
        )
    exporter_for(database, tmp_path).run()
    assert all_exported_users(tmp_path) == ["Elsewhere?"]


def test_training_off_withdraws_what_was_not_exported_yet_for_good(
    database: Database, tmp_path: Path
) -> None:
    """Turning training off leaves out the channel's exchanges not exported yet, its threads'
    too; turning it on again brings only what is said from then on."""
    bot_exchange(database, "Exported before?", "Yes.", channel="quiet", thread="a", rating=1)
    exporter_for(database, tmp_path).run()
    before = bot_exchange(database, "Said before?", "A.", channel="quiet", thread="b", rating=1)
    thread = bot_exchange(
        database, "In a thread?", "A.", channel="quiet-thread", parent_channel="quiet", rating=1
    )
    bot_exchange(database, "Loud question?", "A.", channel="loud", rating=1)

    def training(opt_out: bool) -> None:
        with database.session() as session:
            set_training_opt_out(
                session=session,
                platform="console",
                channel="quiet",
                opt_out=opt_out,
                updated_by="A",
            )

    training(False)  # turning it on where it is on changes nothing
    training(True)
    exporter_for(database, tmp_path).run()
    training(False)
    bot_exchange(database, "Said after?", "A.", channel="quiet", thread="c", rating=1)
    bot_exchange(
        database,
        "Thread after?",
        "A.",
        channel="quiet-thread",
        parent_channel="quiet",
        thread="d",
        rating=1,
    )
    exporter_for(database, tmp_path).run()

    assert sorted(all_exported_users(tmp_path)) == [
        "Exported before?",
        "Loud question?",
        "Said after?",
        "Thread after?",
    ]
    with database.session() as session:
        for exchange_id in (before, thread):
            exchange = session.get(ExchangeRecord, exchange_id)
            assert exchange is not None and exchange.for_training is False


def test_the_export_leaves_out_channels_opted_out_now(database: Database, tmp_path: Path) -> None:
    """The pick itself checks the opt-outs, whatever the exchanges were marked with when they
    were recorded: here the setting is written behind the storage functions' back."""
    bot_exchange(database, "Channel question?", "A.", channel="quiet", rating=1)
    bot_exchange(
        database, "Thread question?", "A.", channel="quiet-t", parent_channel="quiet", rating=1
    )
    bot_exchange(database, "Same channel id, other platform?", "A.", channel="other", rating=1)
    bot_exchange(database, "Loud question?", "A.", channel="loud", rating=1)
    with database.session() as session:
        for platform, channel in (("console", "quiet"), ("slack", "other")):
            session.add(
                ChannelSettingRecord(
                    platform=platform,
                    channel=channel,
                    training_opt_out=True,
                    updated_at=datetime.now(UTC),
                )
            )
        session.commit()
    result = exporter_for(database, tmp_path).run()

    assert sorted(all_exported_users(tmp_path)) == [
        "Loud question?",
        "Same channel id, other platform?",
    ]
    assert result.superseded == 0


def test_shards_hold_no_display_names_and_no_mentioned_ids(
    database: Database, tmp_path: Path
) -> None:
    """Authors' display names (``messages.author_name``) never reach a shard, and mentions in
    the platforms' raw forms become <USER>."""
    names = ["Alice Liddell", "Bob Agent", "Helpful Bot Name", "Carol Admin", "Dave Context"]
    mentioned = ["U0123ABC", "123456789012345678", "876543210987654321", "112233445566778899"]
    bot_exchange(
        database,
        "Hello <@U0123ABC>",
        "Hi!",
        thread="m",
        author="U-alice",
        author_name="Dave Context",
    )
    bot_exchange(
        database,
        "Can <@123456789012345678> or <@U0456DEF|alice.liddell> help?",
        "Ask <@!876543210987654321> or <@&112233445566778899>.",
        thread="m",
        rating=1,
        author="U-alice",
        author_name="Alice Liddell",
        bot_name="Helpful Bot Name",
    )
    agent_exchange(
        database,
        "Is <@U0123ABC> around?",
        "Yes, <@U0123ABC> is.",
        thread="agent",
        author_name="Alice Liddell",
        agent_name="Bob Agent",
    )
    bot_exchange(database, "Poor question?", "Poor answer.", thread="fix")
    with database.session() as session:
        assert record_correction(
            session=session,
            platform="console",
            channel="C1",
            thread="fix",
            corrected_message_id=None,
            text="Better answer.",
            admin_id="ADMIN",
            admin_name="Carol Admin",
        )
    result = exporter_for(database, tmp_path).run()

    assert result.path is not None and result.exchanges == 3
    everything = "".join(path.read_text() for path in sorted(result.path.iterdir()))
    for found in [*names, "alice.liddell", *mentioned, "U0456DEF", "U-alice", "name-"]:
        assert found not in everything
    assert "Can <USER> or <USER> help?" in everything and "Ask <USER> or <USER>." in everything
    assert "Hello <USER>" in everything  # the context


def test_manifest_hash_matches_the_files(database: Database, tmp_path: Path) -> None:
    import hashlib

    bot_exchange(database, "Q?", "A.", rating=1)
    result = exporter_for(database, tmp_path).run()
    assert result.path is not None
    manifest = json.loads((result.path / "manifest.json").read_text())
    entries = [entry for files in manifest["files"].values() for entry in files]
    assert sorted(entry["name"] for entry in entries) == sorted(
        path.name for path in result.path.iterdir() if path.name != "manifest.json"
    )
    for entry in entries:
        assert (
            hashlib.sha256((result.path / entry["name"]).read_bytes()).hexdigest()
            == entry["sha256"]
        )
    with database.session() as session:
        shard = session.exec(select(ExportShardRecord)).one()
    assert shard.content_hash == manifest["content_hash"] and shard.name == result.shard
    assert manifest["time_range"]["first"] is not None


def test_huge_texts_are_skipped_and_counted(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Huge? " + "x" * 30_000, "A.", thread="huge", rating=1)
    bot_exchange(database, "Normal?", "B.", thread="ok", rating=1)
    result = exporter_for(database, tmp_path, max_chars=20_000).run()

    assert result.exchanges == 1 and result.skipped_too_long == 1
    assert all_exported_users(tmp_path) == ["Normal?"]


def test_a_part_of_only_huge_texts_is_still_counted(database: Database, tmp_path: Path) -> None:
    for n in range(9):
        bot_exchange(database, f"Normal {n}?", "B.", thread=f"ok{n}", rating=1)
    # The tenth conversation, alone in the last of four parts: no line, one skipped.
    bot_exchange(database, "Huge? " + "x" * 30_000, "A.", thread="huge", rating=1)
    result = exporter_for(database, tmp_path, workers=2, parallel_from=1).run()

    assert result.processes == 2
    assert result.exchanges == 9 and result.skipped_too_long == 1
    assert result.path is not None
    assert json.loads((result.path / "manifest.json").read_text())["skipped_too_long"] == 1


def test_invalid_utf8_in_sqlite_is_exported_with_replacement_characters(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'bad.db'}")
    database.upgrade()
    exchange_id = bot_exchange(database, "placeholder", "Fine answer.", rating=1)
    with database.session() as session:
        exchange = session.get(ExchangeRecord, exchange_id)
        assert exchange is not None
        session.execute(
            text("UPDATE messages SET text = CAST(X'4869FFFE21' AS TEXT) WHERE id = :id"),
            {"id": exchange.user_message_id},
        )
        session.commit()
    result = exporter_for(database, tmp_path / "out", create_directory=True).run()
    assert all_exported_users(tmp_path / "out") == ["Hi\ufffd\ufffd!"]
    assert result.exchanges == 1
    database.dispose()


# --------------------------------------------------------------------------- failures


def assert_nothing_changed(database: Database, directory: Path) -> None:
    with database.session() as session:
        marked = session.execute(text("SELECT exchange_id FROM export_marks")).all()
        shards = session.exec(select(ExportShardRecord)).all()
    assert marked == [] and shards == []
    if directory.exists():
        assert list(directory.iterdir()) == []


def test_a_missing_directory_is_a_clear_error(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Q?", "A.", rating=1)
    with pytest.raises(ExportError, match="does not exist"):
        exporter_for(database, tmp_path / "missing").run()
    assert_nothing_changed(database, tmp_path / "missing")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real full disk (needs root, as CI and the dev machines run)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_leaves_no_partial_shard(database: Database, small_tmpfs: Path) -> None:
    for n in range(40):  # about 200 KB across the formats, for 64 KiB of disk
        bot_exchange(
            database,
            f"Question number {n}? " + "words " * 200,
            "An answer. " * 100,
            thread=f"t{n}",
            rating=1,
        )
    with pytest.raises(ExportError, match="is full"):
        exporter_for(database, small_tmpfs).run()
    assert_nothing_changed(database, small_tmpfs)


def test_a_read_only_directory_is_a_clear_error(database: Database, small_tmpfs: Path) -> None:
    bot_exchange(database, "Q?", "A.", rating=1)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(ExportError, match="not writable"):
        exporter_for(database, small_tmpfs).run()
    assert_nothing_changed(database, small_tmpfs)


def test_a_database_that_goes_away_mid_export(postgres_database: Database, tmp_path: Path) -> None:
    database = postgres_database
    with database.engine.begin() as connection:
        connection.execute(
            text("TRUNCATE exchanges, messages, conversations, export_shards, leases CASCADE")
        )
    bot_exchange(database, "Q?", "A.", rating=1)

    def kill_connections(step: str) -> None:
        if step == "selected":
            with database.engine.connect() as admin:
                admin.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )

    with pytest.raises(ExportError, match="database error"):
        exporter_for(database, tmp_path).run(on_step=kill_connections)
    assert_nothing_changed(database, tmp_path)
    assert exporter_for(database, tmp_path).run().exchanges == 1  # and it works again


# --------------------------------------------------------------------------- concurrency


def test_only_one_instance_exports_at_a_time(database: Database, tmp_path: Path, caplog) -> None:
    for n in range(20):
        bot_exchange(database, f"Q{n}?", f"A{n}.", thread=f"t{n}", rating=1)
    barrier = threading.Barrier(3)
    results = []

    def run() -> None:
        barrier.wait()
        results.append(exporter_for(database, tmp_path).run())

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    exported = sum(result.exchanges for result in results)
    skipped = [r for r in results if r.skipped_reason]
    assert exported == 20
    assert sorted(all_exported_users(tmp_path)) == sorted(f"Q{n}?" for n in range(20))
    assert len(skipped) == len([r for r in caplog.records if "export skipped" in r.getMessage()])


def test_a_held_lease_makes_other_instances_skip(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Q?", "A.", rating=1)
    holder = exporter_for(database, tmp_path)
    assert holder.lease.acquire()
    skipped = exporter_for(database, tmp_path).run()
    assert skipped.skipped_reason == "another instance is exporting"
    holder.lease.release()
    assert exporter_for(database, tmp_path).run().exchanges == 1


# --------------------------------------------------------------------------- several processes


def varied_exchanges(database: Database, count: int) -> set[str]:
    """``count`` upvoted or agent-answered questions over many conversations, three to a
    conversation (so context matters), and for each fifth an older near-duplicate elsewhere
    (superseded); returns the questions that should be written."""
    winners = set()
    for n in range(count):
        thread = f"t{n // 3}"
        question = f"Agent question {n}?" if n % 2 else f"Bot question {n}?"
        if n % 5 == 0:
            bot_exchange(database, question.upper().rstrip("?"), "Old.", thread=f"d{n}", rating=1)
        if n % 2:
            agent_exchange(database, question, f"Agent answer {n}.", thread=thread)
        else:
            bot_exchange(database, question, f"Bot answer {n}.", thread=thread, rating=1)
        winners.add(question)
    return winners


def every_line(shard: Path) -> dict[str, list[str]]:
    return {
        key: sorted(
            line for path in shard_files(shard, key) for line in path.read_text().splitlines()
        )
        for key in FORMATS
    }


def test_a_large_export_is_written_by_several_processes_with_the_same_lines(
    database: Database, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    expected = varied_exchanges(database, 60)

    reports: list[tuple[int, int]] = []
    parallel = exporter_for(
        database, tmp_path / "parallel", create_directory=True, workers=2, parallel_from=1
    ).run(progress=lambda done, total: reports.append((done, total)))
    with database.engine.begin() as connection:  # forget that export, then write it again alone
        connection.execute(text("DELETE FROM export_marks"))
        connection.execute(text("DELETE FROM export_shards"))
    alone = exporter_for(database, tmp_path / "alone", create_directory=True).run()

    assert parallel.processes == 2 and alone.processes == 1
    assert reports[-1] == (60, 60) and [d for d, _ in reports] == sorted(d for d, _ in reports)
    [worker_peak] = parallel.worker_peak_memory_mb  # reported by the worker itself
    assert 20 < worker_peak < 1000 and alone.worker_peak_memory_mb == ()
    assert parallel.path is not None and alone.path is not None
    assert (
        (parallel.exchanges, parallel.superseded)
        == (alone.exchanges, alone.superseded)
        == (
            60,
            12,
        )
    )
    assert sorted(all_exported_users(tmp_path / "parallel")) == sorted(expected)
    assert every_line(parallel.path) == every_line(alone.path)
    assert len(shard_files(parallel.path, "messages")) >= 2
    assert len(shard_files(alone.path, "messages")) == 1
    manifest = json.loads((parallel.path / "manifest.json").read_text())
    for key in FORMATS:
        listed = manifest["files"][key]
        assert [entry["name"] for entry in listed] == [
            p.name for p in shard_files(parallel.path, key)
        ]
        assert sum(entry["lines"] for entry in listed) == 60
    loaded = datasets.load_dataset(
        "json", data_files=data_files(parallel.path, "messages"), split="train"
    )
    assert len(loaded) == 60


def test_parts_left_empty_are_dropped_and_the_rest_renamed(
    database: Database, tmp_path: Path
) -> None:
    for n in range(10):  # one conversation: every part but one is empty
        bot_exchange(database, f"Same thread {n}?", f"Answer {n}.", thread="one", rating=1)
    result = exporter_for(
        database, tmp_path / "out", create_directory=True, workers=2, parallel_from=1
    ).run()
    assert result.path is not None and result.processes == 2
    assert sorted(p.name for p in result.path.iterdir()) == sorted(
        [part_name(key, 0, 1) for key in FORMATS] + ["manifest.json"]
    )
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert [entry["lines"] for entry in manifest["files"]["instruct"]] == [10]
    last = read_lines(result.path, "messages")[-1]["messages"]
    # Six earlier messages of context (EXPORT_CONTEXT_TURNS), the question, the answer.
    assert len(last) == 8 and last[0]["content"] == "Same thread 6?"
    assert last[-1]["content"] == "Answer 9."


def test_each_run_reports_its_own_processes(database: Database, tmp_path: Path) -> None:
    exporter = exporter_for(database, tmp_path, workers=2, parallel_from=20)
    varied_exchanges(database, 30)
    first = exporter.run()
    bot_exchange(database, "One more?", "Yes.", thread="late", rating=1)
    second = exporter.run()  # small: written by this process alone

    assert (first.processes, len(first.worker_peak_memory_mb)) == (2, 1)
    assert (second.processes, second.worker_peak_memory_mb) == (1, ())
    assert second.path is not None
    assert json.loads((second.path / "manifest.json").read_text())["processes"] == 1


def test_an_export_goes_on_alone_when_workers_cannot_start(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import errno
    import multiprocessing.context

    def refuse(self: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
    expected = varied_exchanges(database, 20)
    with caplog.at_level(logging.WARNING, logger="bot.learning.workers"):
        result = exporter_for(
            database, tmp_path / "out", create_directory=True, workers=3, parallel_from=1
        ).run()
    assert result.processes == 1 and result.exchanges == 20
    assert sorted(all_exported_users(tmp_path / "out")) == sorted(expected)
    assert "cannot start workers" in caplog.text


def test_a_failing_worker_stops_the_export_and_changes_nothing(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.formatters import FAILED_MARKER, fails_in_a_worker

    monkeypatch.setenv(FAILED_MARKER, str(tmp_path / "a-worker-failed"))
    varied_exchanges(database, 30)
    exports = tmp_path / "exports"
    exports.mkdir()
    exporter = Exporter(
        database=database,
        options=ExportOptions(directory=exports, workers=2, parallel_from=1),
        formatter=fails_in_a_worker,
        pseudonymize=Pseudonymizer(KEY),
    )
    with pytest.raises(ExportError, match="the formatter broke in a worker"):
        exporter.run()
    assert_nothing_changed(database, exports)
    assert exporter_for(database, exports).run().exchanges == 30  # nothing was lost


# --------------------------------------------------------------------------- kills

KILL_SCRIPT = """
import os, sys, time
from pathlib import Path
from bot.learning import Exporter, ExportOptions, Pseudonymizer
from bot.storage import Database
from model.prompt import format_prompt

url, directory, kill_at, marker = sys.argv[1:5]

def step(name):
    if name == kill_at:
        Path(marker).write_text(name)
        time.sleep(600)  # the test kills us here

exporter = Exporter(database=Database(url), options=ExportOptions(directory=Path(directory)),
                    formatter=format_prompt, pseudonymize=Pseudonymizer(b"k"))
exporter.run(on_step=step)
"""


def wait_for(marker: Path, process: subprocess.Popen[bytes]) -> None:
    """Until the export in ``process`` writes ``marker`` (where the test kills it)."""
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the export never got there"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_at", ["leased", "recovered", "selected", "written", "committed"])
def test_a_kill_at_any_step_neither_duplicates_nor_skips(
    database: Database, tmp_path: Path, kill_at: str
) -> None:
    directory = tmp_path / "exports"
    directory.mkdir()
    for n in range(30):
        bot_exchange(database, f"Before {n}?", f"A{n}.", thread=f"b{n}", rating=1)
    marker = tmp_path / "marker"
    url = database.engine.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, url, str(directory), kill_at, str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    with database.session() as session:
        committed = session.exec(select(ExportShardRecord)).all()
    published = shard_folders(directory)
    # Without recovery: a published shard always has its record (never the other way round).
    assert {p.name for p in published} <= {s.name for s in committed}
    for n in range(5):
        bot_exchange(database, f"After {n}?", f"B{n}.", thread=f"a{n}", rating=1)
    exporter_for(database, directory).run()

    exported = all_exported_users(directory)
    expected = [f"Before {n}?" for n in range(30)] + [f"After {n}?" for n in range(5)]
    assert sorted(exported) == sorted(expected)  # every one, exactly once
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
    with database.session() as session:
        names = {s.name for s in session.exec(select(ExportShardRecord)).all()}
    assert names == {p.name for p in shard_folders(directory)}


PARALLEL_KILL_SCRIPT = """
import sys, time
from pathlib import Path
from bot.learning import Exporter, ExportOptions, Pseudonymizer
from bot.storage import Database
from tests.fakes.formatters import slow

url, directory, marker = sys.argv[1:4]

def progress(done, total):
    Path(marker).write_text(str(done))
    time.sleep(600)  # the test kills us here, while the worker is still writing

exporter = Exporter(database=Database(url),
                    options=ExportOptions(directory=Path(directory), workers=2, parallel_from=1),
                    formatter=slow, pseudonymize=Pseudonymizer(b"k"))
exporter.run(progress=progress)
"""


def processes_tagged(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_workers_stop_when_the_exporting_process_is_killed(
    database: Database, tmp_path: Path
) -> None:
    directory = tmp_path / "exports"
    directory.mkdir()
    expected = varied_exchanges(database, 90)
    marker = tmp_path / "marker"
    tag = f"EXPORT_TEST_TAG={uuid.uuid4().hex}"
    url = database.engine.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [sys.executable, "-c", PARALLEL_KILL_SCRIPT, url, str(directory), str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO), tag.split("=")[0]: tag.split("=")[1]},
        stderr=subprocess.PIPE,
    )
    wait_for(marker, process)
    workers = [
        pid
        for pid in processes_tagged(tag)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert workers, "no worker process at work"
    process.send_signal(signal.SIGKILL)
    process.wait()

    # A worker has two or more parts of 20-odd exchanges at 0.2 s each left: had it gone on
    # writing, it would need ten seconds or more.
    deadline = time.monotonic() + 4
    while processes_tagged(tag):  # the orphaned worker is stopped at once
        assert time.monotonic() < deadline, "the worker outlived the exporting process"
        time.sleep(0.1)
    result = exporter_for(database, directory).run()

    assert result.exchanges == 90
    assert sorted(all_exported_users(directory)) == sorted(expected)
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
