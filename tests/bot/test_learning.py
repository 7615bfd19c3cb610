"""Learning-data commands (forget-me, corrections, opt-out, export) and the scheduled export."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import col, select

from bot.commands import CommandRequest, Commands
from bot.learning import (
    Exporter,
    ExportOptions,
    ExportScheduler,
    LearningActions,
    Pseudonymizer,
    ScheduleError,
    load_pseudonym_key,
    parse_schedule,
    shard_files,
    shard_folders,
)
from bot.storage import (
    AnsweredBy,
    Database,
    DeletionRecord,
    ExchangeRecord,
    MessageRecord,
    RatingRecord,
    Store,
    counts,
    record_incoming,
    set_rating,
)
from model.prompt import format_prompt
from tests.bot.test_export import bot_exchange, read_lines
from tests.conftest import make_message

REPO = Path(__file__).resolve().parents[2]
KEY = b"k"


def commands_for(database: Database, directory: Path) -> Commands:
    store = Store(database)
    exporter = Exporter(
        database=database,
        options=ExportOptions(directory=directory, create_directory=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(KEY),
    )
    learning = LearningActions(store=store, exporter=exporter, pseudonymize=Pseudonymizer(KEY))
    return Commands(store=store, model_version=lambda: "v1", actions=learning.actions())


def request(
    command: str,
    arguments: str = "",
    *,
    user: str = "U1",
    admin: bool = False,
    channel: str = "C1",
    thread: str = "T1",
    replied_to: str | None = None,
) -> CommandRequest:
    return CommandRequest(
        command=command,
        arguments=arguments,
        platform="console",
        workspace="W1",
        channel=channel,
        user_id=user,
        user_name=user,
        user_is_admin=admin,
        thread=thread,
        replied_to=replied_to,
    )


async def test_forget_me_deletes_the_users_data_and_confirms(
    database: Database, tmp_path: Path
) -> None:
    mine = bot_exchange(database, "My secret question?", "Answer to me.", thread="a", author="U1")
    bot_exchange(database, "Someone else's question?", "Answer to them.", thread="b", author="U2")
    with database.session() as session:
        set_rating(  # U1 also rated U2's answer: that rating is U1's data too
            session=session,
            platform="console",
            channel="C1",
            answer_message_id=_reply_id_for_question(database, "Someone else's question?"),
            rater_id="U1",
            value=1,
        )
    commands = commands_for(database, tmp_path / "exports")

    reply = await commands.run(request("forget-me", user="U1"))

    assert reply.startswith("Done. I deleted 2 messages, 1 exchanges and 1 ratings of yours.")
    with database.session() as session:
        texts = [
            m.text
            for m in session.exec(select(MessageRecord).order_by(col(MessageRecord.id))).all()
        ]
        assert session.get(ExchangeRecord, mine) is None
        assert session.exec(select(RatingRecord)).all() == []
        deletion = session.exec(select(DeletionRecord)).one()
    assert texts == ["Someone else's question?", "Answer to them."]
    assert deletion.user_pseudonym == Pseudonymizer(KEY)("console", "U1")
    assert (deletion.messages_deleted, deletion.exchanges_deleted) == (2, 1)


async def test_an_exchange_after_forget_me_is_exported_even_with_a_reused_id(
    database: Database, tmp_path: Path
) -> None:
    """SQLite hands the id of a deleted newest row to the next one: the forgotten exchange's
    export mark must go with it, or the new exchange would pass for exported."""
    forgotten = bot_exchange(database, "Mine?", "Yours.", thread="a", author="U1", rating=1)
    commands = commands_for(database, tmp_path / "exports")
    assert (await commands.run(request("export", admin=True))).startswith("Exported 1 ")
    await commands.run(request("forget-me", user="U1"))
    newer = bot_exchange(database, "Theirs?", "Also yours.", thread="b", author="U2", rating=1)
    if database.engine.dialect.name == "sqlite":
        assert newer == forgotten  # the reuse this test is about

    assert (await commands.run(request("export", admin=True))).startswith("Exported 1 ")
    exported = [
        line["user"]
        for shard in shard_folders(tmp_path / "exports")
        for line in read_lines(shard, "completions")
    ]
    assert exported == ["Mine?", "Theirs?"]


async def test_corrections_are_admin_only_and_rank_first(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "What's the SLA?", "No idea.", thread="sla")
    commands = commands_for(database, tmp_path / "exports")

    refused = await commands.run(request("correct", "99.9% uptime.", thread="sla"))
    stored = await commands.run(
        request("correct", "99.9% uptime, monthly.", admin=True, thread="sla")
    )
    nowhere = await commands.run(request("correct", "x", admin=True, thread="empty"))
    usage = await commands.run(request("correct", "", admin=True, thread="sla"))
    exported = await commands.run(request("export", admin=True))

    assert refused == "Sorry, only admins can use `correct`."
    assert stored == "Thanks, I stored your correction; it will be used for training."
    assert nowhere == "I couldn't find a reply of mine to correct here."
    assert usage.startswith("Reply to one of my messages") and "`!correct" in usage
    assert exported.startswith("Exported 1 exchanges to shard-")
    [shard] = shard_folders(tmp_path / "exports")
    assert read_lines(shard, "completions") == [
        {"user": "What's the SLA?", "agent": "99.9% uptime, monthly."}
    ]
    with database.session() as session:
        sources = {e.answered_by for e in session.exec(select(ExchangeRecord)).all()}
    assert sources == {AnsweredBy.BOT, AnsweredBy.CORRECTION}


async def test_a_correction_can_name_the_reply_it_corrects(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "First?", "First answer.", thread="x")
    bot_exchange(database, "Second?", "Second answer.", thread="x")
    first_reply = _reply_id_for_question(database, "First?")
    commands = commands_for(database, tmp_path / "exports")

    await commands.run(
        request("correct", "Better first.", admin=True, thread="x", replied_to=first_reply)
    )
    await commands.run(request("export", admin=True))

    [shard] = shard_folders(tmp_path / "exports")
    assert [line["agent"] for line in read_lines(shard, "completions")] == ["Better first."]


async def test_a_correction_in_a_thread_corrects_the_newest_answer_of_that_thread(
    database: Database, tmp_path: Path
) -> None:
    bot_exchange(database, "Old in x?", "Old answer.", thread="x")
    bot_exchange(database, "New in x?", "New answer.", thread="x")
    bot_exchange(database, "Newer, in y?", "Y answer.", thread="y")  # the newest overall
    commands = commands_for(database, tmp_path / "exports")

    stored = await commands.run(request("correct", "Better new.", admin=True, thread="x"))

    assert stored == "Thanks, I stored your correction; it will be used for training."
    with database.session() as session:
        (correction,) = session.exec(
            select(ExchangeRecord).where(ExchangeRecord.answered_by == AnsweredBy.CORRECTION)
        ).all()
        question = session.get(MessageRecord, correction.user_message_id)
    assert question is not None and question.text == "New in x?"


def _reply_id_for_question(database: Database, question: str) -> str:
    with database.session() as session:
        asked = session.exec(select(MessageRecord).where(MessageRecord.text == question)).one()
        exchange = session.exec(
            select(ExchangeRecord).where(ExchangeRecord.user_message_id == asked.id)
        ).one()
        reply = session.get(MessageRecord, exchange.answer_message_id)
    assert reply is not None and reply.platform_message_id is not None
    return reply.platform_message_id


async def test_training_off_keeps_a_channel_out_of_exports(
    database: Database, tmp_path: Path
) -> None:
    commands = commands_for(database, tmp_path / "exports")
    assert await commands.run(request("training", "off", channel="quiet")) == (
        "Sorry, only admins can use `training`."
    )
    off = await commands.run(request("training", "off", admin=True, channel="quiet"))
    bot_exchange(database, "Quiet question?", "Quiet answer.", channel="quiet", rating=1)
    bot_exchange(database, "Loud question?", "Loud answer.", channel="loud", rating=1)
    on = await commands.run(request("training", "on", admin=True, channel="quiet"))
    bot_exchange(
        database, "Later quiet question?", "Answer.", channel="quiet", thread="T2", rating=1
    )
    bad = await commands.run(request("training", "maybe", admin=True))
    await commands.run(request("export", admin=True))

    assert off.startswith("Training is now off in this channel") and "still answer" in off
    assert on.startswith("Training is back on in this channel") and "stays out" in on
    assert bad == "Use `training off` or `training on`."
    exported = sorted(
        line["user"]
        for shard in shard_folders(tmp_path / "exports")
        for line in read_lines(shard, "completions")
    )
    assert exported == ["Later quiet question?", "Loud question?"]


async def test_training_off_covers_earlier_exchanges_and_threads_even_after_on_again(
    database: Database, tmp_path: Path
) -> None:
    """What was said in a channel before `training off`, in it or in its threads, stays out of
    every export, also once training is back on."""
    commands = commands_for(database, tmp_path / "exports")
    bot_exchange(database, "Before, in the channel?", "A.", channel="quiet", thread="a", rating=1)
    bot_exchange(
        database, "Before, in a thread?", "A.", channel="t1", parent_channel="quiet", rating=1
    )
    await commands.run(request("training", "off", admin=True, channel="quiet"))
    bot_exchange(
        database, "While off, in a thread?", "A.", channel="t1", parent_channel="quiet", rating=1
    )
    await commands.run(request("export", admin=True))
    await commands.run(request("training", "on", admin=True, channel="quiet"))
    bot_exchange(
        database,
        "After, in a thread?",
        "A.",
        channel="t1",
        parent_channel="quiet",
        thread="b",
        rating=1,
    )
    await commands.run(request("export", admin=True))

    exported = [
        line["user"]
        for shard in shard_folders(tmp_path / "exports")
        for line in read_lines(shard, "completions")
    ]
    assert exported == ["After, in a thread?"]


async def test_status_reports_the_last_export(database: Database, tmp_path: Path) -> None:
    commands = commands_for(database, tmp_path / "exports")
    assert "Last export: never" in await commands.run(request("status", admin=True))
    bot_exchange(database, "Q?", "A.", rating=1)
    await commands.run(request("export", admin=True))
    status = await commands.run(request("status", admin=True))
    assert "Last export: shard-" in status and "(1 exchanges)" in status


def test_the_pseudonym_key_is_created_once_and_kept_private(tmp_path: Path) -> None:
    first = load_pseudonym_key(configured="", data_dir=tmp_path)
    again = load_pseudonym_key(configured="", data_dir=tmp_path)
    assert first == again and len(first) == 64
    assert oct((tmp_path / "pseudonym.key").stat().st_mode & 0o777) == "0o600"
    assert load_pseudonym_key(configured="set", data_dir=tmp_path) == b"set"


@pytest.mark.parametrize("spec", ["interval:0", "interval:abc", "cron:61 * * * *", "weekly"])
def test_bad_schedules_are_configuration_errors(spec: str) -> None:
    with pytest.raises(ScheduleError, match="EXPORT_SCHEDULE"):
        parse_schedule(spec)


def test_schedules_parse() -> None:
    assert parse_schedule("") is None
    assert "interval" in str(parse_schedule("interval:3600"))
    assert "cron" in str(parse_schedule("cron:0 3 * * *"))


async def test_the_scheduled_export_runs_on_its_trigger(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Scheduled?", "Yes.", rating=1)
    exporter = Exporter(
        database=database,
        options=ExportOptions(directory=tmp_path, create_directory=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(KEY),
    )
    trigger = parse_schedule("interval:0.2")
    assert trigger is not None
    scheduler = ExportScheduler(exporter=exporter, trigger=trigger)
    scheduler.start()
    job = scheduler.scheduler.get_job("export")
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 3600)
    try:
        for _ in range(100):
            if scheduler.results:
                break
            await asyncio.sleep(0.05)
    finally:
        scheduler.shutdown()
    assert scheduler.results and scheduler.results[0].exchanges == 1
    await asyncio.sleep(0.05)  # the asyncio scheduler stops on its loop
    assert not scheduler.scheduler.running


def test_chatbot_export_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    database = Database(f"sqlite:///{data / 'chatbot.db'}")
    database.upgrade()
    bot_exchange(database, "CLI?", "Yes.", rating=1)
    with database.session() as session:
        assert counts(session=session).exchanges == 1
    database.dispose()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATA_DIR": str(data)}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "bot", "export"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Exported 1 exchanges to shard-")
    [shard] = shard_folders(data / "exports")
    [completions] = shard_files(shard, "completions")
    assert json.loads(completions.read_text()) == {
        "user": "CLI?",
        "agent": "Yes.",
    }
    missing = subprocess.run(
        [sys.executable, "-m", "bot", "export"],
        cwd=tmp_path,
        env={**env, "EXPORT_DIR": str(tmp_path / "nowhere")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"chatbot: error: export directory {tmp_path / 'nowhere'} does not exist"
    )


async def test_forget_me_is_available_to_everyone(database: Database, tmp_path: Path) -> None:
    with database.session() as session:
        record_incoming(session=session, message=make_message("hello", author_id="U9"))
    reply = await commands_for(database, tmp_path).run(request("forget-me", user="U9"))
    assert reply.startswith("Done. I deleted 1 messages")


def test_the_package_imports_its_modules_on_first_use() -> None:
    """An export worker process imports ``bot.learning.workers`` (so the package's
    ``__init__``) and nothing of the package beyond what writing a part needs: no orchestration,
    chat commands or APScheduler. Every public name still comes from the package."""
    script = (
        "import sys, bot.learning, bot.learning.workers; "
        "print(sorted(m for m in sys.modules if m.startswith(('bot.learning', 'bot.commands', "
        "'apscheduler')))); "
        "print(all(getattr(bot.learning, name) is not None for name in bot.learning.__all__))"
    )
    imported, resolved = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO
    ).stdout.splitlines()
    assert imported == str(
        [
            "bot.learning",
            "bot.learning.errors",
            "bot.learning.redaction",
            "bot.learning.shards",
            "bot.learning.workers",
            "bot.learning.writing",
        ]
    )
    assert resolved == "True"


async def test_forget_me_says_whether_the_serving_model_learned_from_them(
    database: Database, tmp_path: Path
) -> None:
    store = Store(database)
    exporter = Exporter(
        database=database,
        options=ExportOptions(directory=tmp_path, create_directory=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(KEY),
    )
    learned = {Pseudonymizer(KEY)("console", "U1")}
    retrains: list[str] = []

    async def retrain() -> str:
        retrains.append("started")
        return "Promoted as version 2"

    learning = LearningActions(
        store=store,
        exporter=exporter,
        pseudonymize=Pseudonymizer(KEY),
        serving_learned_from=lambda pseudonym: pseudonym in learned,
        after_forget=retrain,
    )
    taught = await learning.forget_me(request("forget-me", user="U1"))
    assert "learned from your messages; the next retrain will not" in taught
    assert "A retrain without them has started." in taught
    stranger = await learning.forget_me(request("forget-me", user="U2"))
    assert "did not learn from your messages" in stranger
    await asyncio.sleep(0)
    assert retrains == ["started"]  # once: only the user it learned from triggers one
