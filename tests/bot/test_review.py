"""The review queue and the dashboard's reads, on SQLite and PostgreSQL: verdicts and what the
real export then writes, the ``review`` command and the audit line, conversation search, one
thread, activity per hour, reply latency."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlmodel import col, select

from bot.commands import AUDIT_ARGUMENT_CHARS
from bot.conversation import Role, utcnow
from bot.learning import Pseudonymizer
from bot.storage import (
    AnsweredBy,
    Database,
    DeliveryState,
    ExchangeRecord,
    ExchangeReviewRecord,
    MessageRecord,
    ReviewStatus,
    ReviewVerdict,
    activity_by_hour,
    channel_settings,
    conversation_thread,
    correct_exchange,
    deletion_log,
    export_shards,
    forget_user,
    mark_message_deleted,
    pending_review_count,
    record_answer,
    record_correction,
    record_incoming,
    reply_latency,
    review_exchange,
    review_queue,
    search_conversations,
    set_delivery,
    set_rating,
    set_training_opt_out,
)
from tests.bot.test_export import agent_exchange, bot_exchange, exporter_for, read_lines
from tests.bot.test_learning import commands_for, request
from tests.conftest import make_message

KEY = b"test-pseudonym-key"


def exported_pairs(database: Database, directory: Path, **options: object) -> set[tuple[str, str]]:
    """Run the real export once; the (question, answer) pairs it wrote."""
    result = exporter_for(database, directory, **options).run()
    if result.path is None:
        return set()
    return {(line["user"], line["agent"]) for line in read_lines(result.path, "completions")}


def review(database: Database, exchange_id: int, verdict: str, reviewer: str = "console:A (A)"):
    with database.session() as session:
        return review_exchange(
            session=session, exchange_id=exchange_id, verdict=verdict, reviewer=reviewer
        )


def answer_id_of(database: Database, exchange_id: int) -> str:
    with database.session() as session:
        exchange = session.get(ExchangeRecord, exchange_id)
        assert exchange is not None
        answer = session.get(MessageRecord, exchange.answer_message_id)
        assert answer is not None and answer.platform_message_id is not None
        return answer.platform_message_id


# --------------------------------------------------------------------------- the queue


def test_the_queue_holds_the_unvetted_bot_answers_oldest_first(
    database: Database, tmp_path: Path
) -> None:
    exported = bot_exchange(database, "Exported?", "Yes.", thread="e", rating=1)
    assert exported_pairs(database, tmp_path) == {("Exported?", "Yes.")}
    first = bot_exchange(database, "Unrated?", "Maybe.", thread="a")
    upvoted = bot_exchange(database, "Liked?", "Liked answer.", thread="b", rating=1)
    downvoted = bot_exchange(database, "Disliked?", "Bad answer.", thread="c", rating=-1)
    agent_exchange(database, "Agent question?", "Agent answer.", thread="d")
    corrected = bot_exchange(database, "Fix me?", "Poor.", thread="f")
    with database.session() as session:
        assert record_correction(
            session=session,
            platform="console",
            channel="C1",
            thread="f",
            corrected_message_id=None,
            text="Much better.",
            admin_id="ADMIN",
            admin_name="Admin",
        )
    deleted = bot_exchange(database, "Deleted later?", "Gone.", thread="g")
    with database.session() as session:
        assert mark_message_deleted(
            session=session,
            platform="console",
            channel="C1",
            platform_message_id=answer_id_of(database, deleted),
        )
        set_training_opt_out(
            session=session, platform="console", channel="OFF", opt_out=True, updated_by="A"
        )
    bot_exchange(database, "Opted out?", "Not for training.", channel="OFF")
    approved = bot_exchange(database, "Approved?", "Fine.", thread="h")
    assert review(database, approved, "approved").ok
    newest = bot_exchange(database, "Newest?", "Newest answer.", thread="i")
    with database.session() as session:  # a second rater: the score is the sum
        set_rating(
            session=session,
            platform="console",
            channel="C1",
            answer_message_id=answer_id_of(database, upvoted),
            rater_id="other",
            value=1,
        )

    with database.session() as session:
        queue = review_queue(session=session)
        waiting = pending_review_count(session=session)
        page = review_queue(session=session, limit=2, offset=1)

    assert [item.exchange_id for item in queue] == [first, upvoted, downvoted, newest]
    assert exported not in {item.exchange_id for item in queue}
    assert corrected not in {item.exchange_id for item in queue}
    assert waiting == 4
    assert [item.exchange_id for item in page] == [upvoted, downvoted]
    by_id = {item.exchange_id: item for item in queue}
    assert (by_id[upvoted].score, by_id[upvoted].upvotes, by_id[upvoted].downvotes) == (2, 2, 0)
    assert (by_id[downvoted].score, by_id[downvoted].downvotes) == (-1, 1)
    assert by_id[first].score == 0
    item = by_id[first]
    assert (item.question, item.answer, item.answered_by) == ("Unrated?", "Maybe.", "bot")
    assert (item.platform, item.channel, item.thread, item.model_version) == (
        "console",
        "C1",
        "a",
        "v1",
    )
    assert item.created_at.tzinfo is not None
    assert all(a.created_at <= b.created_at for a, b in itertools.pairwise(queue))


def test_an_approved_answer_is_exported_even_unrated_and_a_rejected_one_never(
    database: Database, tmp_path: Path
) -> None:
    approved = bot_exchange(database, "Approve me?", "Approved answer.", thread="a")
    approved_downvoted = bot_exchange(
        database, "Disputed?", "Admin likes it.", thread="b", rating=-1
    )
    rejected = bot_exchange(database, "Reject me?", "Upvoted but wrong.", thread="c", rating=1)
    rejected_unrated = bot_exchange(database, "Reject unrated?", "Wrong too.", thread="d")
    bot_exchange(database, "Left alone?", "Unrated.", thread="e")
    for exchange_id, verdict in (
        (approved, "approved"),
        (approved_downvoted, "approved"),
        (rejected, "rejected"),
        (rejected_unrated, "rejected"),
    ):
        assert review(database, exchange_id, verdict).ok

    result = exporter_for(database, tmp_path).run()
    assert result.path is not None
    pairs = {(line["user"], line["agent"]) for line in read_lines(result.path, "completions")}
    assert pairs == {("Approve me?", "Approved answer."), ("Disputed?", "Admin likes it.")}
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["sources"] == {"approved": 2}
    # With unrated answers let in, the rejected ones still stay out.
    assert exported_pairs(database, tmp_path, include_unrated=True) == {("Left alone?", "Unrated.")}
    assert exported_pairs(database, tmp_path, include_unrated=True) == set()


def test_an_approved_answer_ranks_like_an_upvoted_one_among_near_duplicates(
    database: Database, tmp_path: Path
) -> None:
    older = bot_exchange(database, "Reset my password?", "Approved.", thread="a")
    bot_exchange(database, "reset my password", "Unrated, newer.", thread="b")
    assert review(database, older, "approved").ok

    result = exporter_for(database, tmp_path, include_unrated=True).run()

    assert result.path is not None and result.superseded == 1
    assert [line["agent"] for line in read_lines(result.path, "completions")] == ["Approved."]


def test_an_edit_exports_the_correction_and_never_the_original(
    database: Database, tmp_path: Path
) -> None:
    original = bot_exchange(database, "What is the SLA?", "No idea.", thread="a", rating=1)
    with database.session() as session:
        outcome = correct_exchange(
            session=session,
            exchange_id=original,
            answer="  99.9% monthly.  ",
            reviewer="dashboard:admin (Admin)",
            admin_id="admin",
            admin_name="Admin",
        )
    assert outcome.ok and outcome.verdict == ReviewVerdict.CORRECTED
    assert outcome.correction_exchange_id is not None
    with database.session() as session:
        correction = session.get(ExchangeRecord, outcome.correction_exchange_id)
        assert correction is not None
        assert correction.answered_by == AnsweredBy.CORRECTION
        better = session.get(MessageRecord, correction.answer_message_id)
        verdict = session.exec(
            select(ExchangeReviewRecord).where(ExchangeReviewRecord.exchange_id == original)
        ).one()
        queue = review_queue(session=session)
    assert better is not None and better.text == "99.9% monthly."
    assert (better.author_id, better.author_name) == ("admin", "Admin")
    assert (verdict.verdict, verdict.reviewer) == ("corrected", "dashboard:admin (Admin)")
    assert queue == []

    result = exporter_for(database, tmp_path).run()
    assert result.path is not None and result.superseded == 0
    assert read_lines(result.path, "completions") == [
        {"user": "What is the SLA?", "agent": "99.9% monthly."}
    ]
    assert json.loads((result.path / "manifest.json").read_text())["sources"] == {"correction": 1}


def test_a_correction_by_command_marks_the_original_corrected(database: Database) -> None:
    """``!correct`` and the queue's edit store a correction the same way."""
    original = bot_exchange(database, "Q?", "Poor.", thread="x", rating=1)
    with database.session() as session:
        record_correction(
            session=session,
            platform="console",
            channel="C1",
            thread="x",
            corrected_message_id=None,
            text="Good.",
            admin_id="ADMIN",
            admin_name="Admin",
        )
        verdict = session.exec(select(ExchangeReviewRecord)).one()
    assert (verdict.exchange_id, verdict.verdict, verdict.reviewer) == (
        original,
        "corrected",
        "console:ADMIN (Admin)",
    )


def test_the_last_review_wins_with_its_reviewer_and_time(
    database: Database, tmp_path: Path
) -> None:
    exchange = bot_exchange(database, "Undecided?", "Answer.", thread="a")
    assert review(database, exchange, "approved", reviewer="console:A (Ann)").ok
    with database.session() as session:
        first = session.exec(select(ExchangeReviewRecord)).one()
    rejected = review(database, exchange, ReviewVerdict.REJECTED, reviewer="slack:B (Bob)")

    assert (
        rejected.ok
        and rejected.message == f"Rejected exchange {exchange}: it will never be exported."
    )
    with database.session() as session:
        (last,) = session.exec(select(ExchangeReviewRecord)).all()
    assert (last.verdict, last.reviewer) == ("rejected", "slack:B (Bob)")
    assert last.reviewed_at >= first.reviewed_at
    assert exported_pairs(database, tmp_path, include_unrated=True) == set()


def test_reviews_that_cannot_apply_say_why(database: Database, tmp_path: Path) -> None:
    exported = bot_exchange(database, "Exported?", "Yes.", thread="a", rating=1)
    assert exported_pairs(database, tmp_path) == {("Exported?", "Yes.")}
    deleted = bot_exchange(database, "Deleted?", "Answer.", thread="b")
    with database.session() as session:
        set_training_opt_out(
            session=session, platform="console", channel="OFF", opt_out=True, updated_by="A"
        )
        mark_message_deleted(
            session=session,
            platform="console",
            channel="C1",
            platform_message_id=answer_id_of(database, deleted),
        )
    opted_out = bot_exchange(database, "Off?", "Answer.", channel="OFF")
    agent_exchange(database, "Agent?", "Agent answer.", thread="c")
    with database.session() as session:
        agent_record = session.exec(
            select(ExchangeRecord).where(ExchangeRecord.answered_by == AnsweredBy.HUMAN_AGENT.value)
        ).one()
    assert agent_record.id is not None
    agent = agent_record.id
    fine = bot_exchange(database, "Fine?", "Fine.", thread="d")

    def edit(exchange_id: int, answer: str = "Better."):
        with database.session() as session:
            return correct_exchange(
                session=session, exchange_id=exchange_id, answer=answer, reviewer="r"
            )

    assert review(database, 999_999, "approved").status == ReviewStatus.NOT_FOUND
    assert review(database, 999_999, "approved").message == "There is no exchange 999999."
    assert edit(999_999).status == ReviewStatus.NOT_FOUND
    gone = review(database, deleted, "approved")
    assert gone.status == ReviewStatus.DELETED and "deleted" in gone.message
    done = review(database, exported, "rejected")
    assert done.status == ReviewStatus.EXPORTED and "already in an export shard" in done.message
    assert edit(exported).status == ReviewStatus.EXPORTED
    assert review(database, opted_out, "approved").status == ReviewStatus.NOT_FOR_TRAINING
    not_bot = edit(agent)
    assert not_bot.status == ReviewStatus.NOT_EDITABLE and "human agent" in not_bot.message
    assert edit(fine, "   ").status == ReviewStatus.INVALID
    with pytest.raises(ValueError, match="approves or rejects"):
        review(database, fine, "corrected")
    with pytest.raises(ValueError):
        review(database, fine, "maybe")
    with database.session() as session:
        assert session.exec(select(ExchangeReviewRecord)).all() == []
        assert pending_review_count(session=session) == 1


def test_a_forgotten_users_verdicts_go_with_their_exchanges(database: Database) -> None:
    exchange = bot_exchange(database, "Mine?", "Yours.", thread="a", author="U9")
    assert review(database, exchange, "approved").ok
    with database.session() as session:
        forget_user(session=session, platform="console", user_id="U9", user_pseudonym="p")
        assert session.exec(select(ExchangeReviewRecord)).all() == []


# --------------------------------------------------------------------------- the command


async def test_the_review_command_is_for_admins_and_every_run_is_audited(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = bot_exchange(database, "First?", "First answer.", thread="a")
    second = bot_exchange(database, "Second?", "Second answer.", thread="b")
    third = bot_exchange(database, "Third?", "Third answer.", thread="c")
    commands = commands_for(database, tmp_path / "exports")
    long_answer = "A much better answer. " * 20

    with caplog.at_level(logging.INFO, logger="chatbot.audit"):
        refused = await commands.run(request("review", f"approve {first}", user="U5"))
        summary = await commands.run(request("review", admin=True, user="ADMIN"))
        approved = await commands.run(request("review", f"approve {first}", admin=True))
        rejected = await commands.run(request("review", f"REJECT {second}", admin=True))
        edited = await commands.run(request("review", f"edit {third} {long_answer}", admin=True))
        missing = await commands.run(request("review", "approve 4242", admin=True))
        usage = await commands.run(request("review", "approve x", admin=True))
        no_answer = await commands.run(request("review", f"edit {third}", admin=True))
        unknown = await commands.run(request("revue", "approve 1", user="U5"))
        empty = await commands.run(request("review", "", admin=True))

    assert refused == "Sorry, only admins can use `review`."
    assert summary == (
        f"3 answers are waiting for review; the oldest: {first}, {second}, {third}. "
        "`review approve N`, `review reject N` or `review edit N <better answer>`."
    )
    assert approved == f"Approved exchange {first}: it will be exported as training data."
    assert rejected == f"Rejected exchange {second}: it will never be exported."
    assert edited.startswith(f"Stored the corrected answer of exchange {third} (as exchange ")
    assert missing == "There is no exchange 4242."
    assert usage.startswith("Usage: `review`") and no_answer == usage
    assert unknown.startswith("I don't know the command `revue`.")
    assert empty == "No answers are waiting for review."
    with database.session() as session:
        verdicts = {
            r.exchange_id: (r.verdict, r.reviewer)
            for r in session.exec(select(ExchangeReviewRecord)).all()
        }
    assert verdicts == {
        first: ("approved", "console:U1 (U1)"),
        second: ("rejected", "console:U1 (U1)"),
        third: ("corrected", "console:U1 (U1)"),
    }

    lines = [r for r in caplog.records if r.name == "chatbot.audit"]
    assert len(lines) == 10  # one per command, refused and unknown ones too
    outcomes = [(r.audit_command, r.audit_outcome, r.audit_user_id) for r in lines]  # type: ignore[attr-defined]
    assert outcomes[:2] == [("review", "refused", "U5"), ("review", "allowed", "ADMIN")]
    assert outcomes[8] == ("revue", "unknown", "U5")
    assert lines[0].getMessage() == (
        f"command 'review' refused by console user 'U5' ('U5') arguments 'approve {first}'"
    )
    edit_line = lines[4]
    assert edit_line.audit_platform == "console"  # type: ignore[attr-defined]
    assert len(edit_line.audit_arguments) == AUDIT_ARGUMENT_CHARS + 1  # type: ignore[attr-defined]
    assert edit_line.audit_arguments.endswith("…")  # type: ignore[attr-defined]
    assert long_answer not in edit_line.getMessage()


async def test_a_forged_name_cannot_forge_an_audit_line(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = commands_for(database, tmp_path / "exports")
    forged = dataclasses.replace(
        request("export", user="U5"), user_name="x\ncommand 'export' allowed by console user"
    )
    with caplog.at_level(logging.INFO, logger="chatbot.audit"):
        await commands.run(forged)
    (line,) = [r for r in caplog.records if r.name == "chatbot.audit"]
    assert "\n" not in line.getMessage() and line.audit_outcome == "refused"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- search


def store_message(database: Database, text_: str, **fields: object) -> MessageRecord:
    with database.session() as session:
        stored = record_incoming(session=session, message=make_message(text_, **fields))  # type: ignore[arg-type]
    assert stored is not None
    return stored


def test_search_by_text_platform_channel_and_pseudonym(database: Database) -> None:
    percent = store_message(database, "I am 100% sure", thread="p", author_id="U-alice")
    thousand = store_message(database, "I am 1000 sure", thread="q", author_id="U-bob")
    underscore = store_message(database, "call my_func now", thread="r", author_id="U-bob")
    store_message(database, "call myXfunc now", thread="s", author_id="U-bob")
    shout = store_message(database, "HELLO there", platform="slack", channel="CS", thread="t")
    store_message(database, "hello again", platform="discord", channel="TH", thread="u")
    with database.session() as session:  # a Discord thread channel inside channel CP
        conversation = session.execute(
            text("SELECT conversation_id FROM messages WHERE text = 'hello again'")
        ).scalar_one()
        session.execute(
            text("UPDATE conversations SET parent_channel = 'CP' WHERE id = :id").bindparams(
                id=conversation
            )
        )
        session.commit()
    deleted = store_message(database, "hello deleted", thread="v", message_id="gone")
    with database.session() as session:
        mark_message_deleted(
            session=session, platform="console", channel="C1", platform_message_id="gone"
        )
    pseudonymize = Pseudonymizer(KEY)

    def search(**filters: object) -> list[int]:
        with database.session() as session:
            hits = search_conversations(session=session, **filters)  # type: ignore[arg-type]
        return [hit.conversation_id for hit in hits]

    assert search(text="100%") == [percent.conversation_id]
    assert search(text="my_func") == [underscore.conversation_id]
    hello = search(text="hello")
    assert set(hello) == {shout.conversation_id, conversation}
    assert hello == sorted(hello, reverse=True)  # newest first
    assert deleted.conversation_id not in hello
    assert search(text="hello", platform="slack") == [shout.conversation_id]
    everything = search()  # no filter: the newest conversations with a live message
    assert everything == sorted(everything, reverse=True) and len(everything) == 6
    assert deleted.conversation_id not in everything
    assert search(platform="discord") == [conversation]
    assert search(limit=2, offset=1) == everything[1:3]
    assert search(channel="CS") == [shout.conversation_id]
    assert search(channel="CP") == [conversation]  # a thread of the channel
    assert search(author_ids=["U-alice"]) == [percent.conversation_id]
    assert search(author_ids=[]) == []
    alice = pseudonymize("console", "U-alice")
    assert search(author_pseudonym=alice, pseudonymize=pseudonymize) == [percent.conversation_id]
    assert search(author_pseudonym="user-0000", pseudonymize=pseudonymize) == []
    assert search(author_pseudonym=alice, pseudonymize=pseudonymize, platform="slack") == []
    assert search(text="sure", limit=1) == [thousand.conversation_id]
    assert search(text="sure", limit=1, offset=1) == [percent.conversation_id]
    with pytest.raises(ValueError, match="pseudonym"):
        search(author_pseudonym=alice)
    with pytest.raises(ValueError):
        search(limit=0)

    with database.session() as session:
        (hit,) = search_conversations(session=session, text="100%")
    assert (hit.platform, hit.channel, hit.thread, hit.matches) == ("console", "C1", "p", 1)
    assert hit.snippet == "I am 100% sure" and hit.message_count == 1
    assert hit.last_message_at is not None and hit.last_message_at.tzinfo is not None
    with database.session() as session:
        (newest,) = search_conversations(session=session, platform="discord")
    assert (newest.matches, newest.message_count, newest.snippet) == (1, 1, "hello again")
    assert newest.parent_channel == "CP"


# --------------------------------------------------------------------------- one thread


def test_a_thread_shows_who_answered_with_ratings_models_and_verdicts(
    database: Database, tmp_path: Path
) -> None:
    bot = bot_exchange(database, "Bot question?", "Bot answer.", thread="t", author="U-alice")
    with database.session() as session:
        set_rating(
            session=session,
            platform="console",
            channel="C1",
            answer_message_id=answer_id_of(database, bot),
            rater_id="r2",
            value=-1,
        )
        set_rating(
            session=session,
            platform="console",
            channel="C1",
            answer_message_id=answer_id_of(database, bot),
            rater_id="r3",
            value=1,
        )
    agent_exchange(database, "Agent question?", "Agent answer.", thread="t")
    fixed = bot_exchange(database, "Fix question?", "Wrong.", thread="t")
    with database.session() as session:
        correct_exchange(session=session, exchange_id=fixed, answer="Right.", reviewer="r")
    store_message(database, "Deleted question", thread="t", message_id="del")
    with database.session() as session:
        mark_message_deleted(
            session=session, platform="console", channel="C1", platform_message_id="del"
        )
        conversation_id = session.get(ExchangeRecord, bot).conversation_id  # type: ignore[union-attr]
    pseudonymize = Pseudonymizer(KEY)

    with database.session() as session:
        thread = conversation_thread(
            session=session, conversation_id=conversation_id, pseudonymize=pseudonymize
        )
        assert conversation_thread(session=session, conversation_id=999_999) == []

    summary = [(m.role, m.answered_by, m.text, m.verdict) for m in thread]
    assert summary == [
        ("user", None, "Bot question?", None),
        ("assistant", "bot", "Bot answer.", None),
        ("user", None, "Agent question?", None),
        ("human_agent", "human_agent", "Agent answer.", None),
        ("user", None, "Fix question?", None),
        ("assistant", "bot", "Wrong.", "corrected"),
        ("human_agent", "correction", "Right.", None),
        ("user", None, "", None),
    ]
    question, answer = thread[0], thread[1]
    assert question.author_pseudonym == pseudonymize("console", "U-alice")
    assert answer.author_pseudonym is None  # only users are named by pseudonym
    assert (answer.upvotes, answer.downvotes, answer.score) == (1, 1, 0)
    assert answer.model_version == "v1" and answer.exchange_id == bot
    assert answer.question_message_id == question.message_id
    assert thread[5].reviewer == "r" and thread[5].reviewed_at is not None
    assert thread[-1].deleted and not thread[0].deleted
    assert question.sent_at.tzinfo is not None
    assert not any(m.exported for m in thread)
    exporter_for(database, tmp_path).run()
    with database.session() as session:
        exported = conversation_thread(session=session, conversation_id=conversation_id)
    assert [m.exported for m in exported if m.exchange_id] == [False, True, False, True]


# --------------------------------------------------------------------------- activity


def _set_stored_at(database: Database, message_id: int, when: datetime) -> None:
    with database.session() as session:
        session.execute(
            update(MessageRecord).where(col(MessageRecord.id) == message_id).values(stored_at=when)
        )
        session.commit()


def _bot_reply(database: Database, question_id: int, *, sent: bool = True) -> MessageRecord:
    with database.session() as session:
        answer, _ = record_answer(
            session=session,
            user_message_id=question_id,
            text="reply",
            answered_by=AnsweredBy.BOT,
            author_id="bot",
            author_name="bot",
            model_version="v1",
        )
        assert answer.id is not None
        set_delivery(
            session=session,
            answer_message_id=answer.id,
            state=DeliveryState.SENT if sent else DeliveryState.FAILED,
        )
    return answer


def test_activity_counts_messages_in_and_replies_out_per_utc_hour(database: Database) -> None:
    now = datetime(2026, 11, 28, 12, 30, tzinfo=UTC)
    times = {
        "too old": now - timedelta(hours=2, minutes=31),  # 09:59
        "ten": now - timedelta(hours=2, minutes=30),  # 10:00
        "twelve": now - timedelta(minutes=29),  # 12:01
        "later": now + timedelta(minutes=15),  # 12:45, still this hour
    }
    for name, when in times.items():
        question = store_message(database, name)
        assert question.id is not None
        _set_stored_at(database, question.id, when)
        if name in ("ten", "twelve"):
            reply = _bot_reply(database, question.id)
            assert reply.id is not None
            _set_stored_at(database, reply.id, when + timedelta(seconds=5))
    failed_question = store_message(database, "failed")
    assert failed_question.id is not None
    _set_stored_at(database, failed_question.id, times["too old"])
    failed = _bot_reply(database, failed_question.id, sent=False)
    assert failed.id is not None
    _set_stored_at(database, failed.id, times["twelve"])  # never reached its platform
    with database.session() as session:
        agent = record_incoming(
            session=session,
            message=make_message("agent says", role=Role.HUMAN_AGENT, author_id="AGENT"),
        )
    assert agent is not None and agent.id is not None
    _set_stored_at(database, agent.id, times["twelve"])

    with database.session() as session:
        if database.engine.dialect.name == "postgresql":
            # Hours are UTC hours, whatever the connection's time zone.
            session.execute(text("SET TIME ZONE 'Asia/Kolkata'"))
        activity = activity_by_hour(session=session, hours=3, now=now)
        with pytest.raises(ValueError):
            activity_by_hour(session=session, hours=0)

    assert [(a.hour.hour, a.messages_in, a.replies_out) for a in activity] == [
        (10, 1, 1),
        (11, 0, 0),
        (12, 2, 1),
    ]
    assert all(a.hour.tzinfo is not None for a in activity)


def test_reply_latency_percentiles_from_stored_times(database: Database) -> None:
    start = utcnow() - timedelta(hours=1)
    for number, seconds in enumerate([1.0, 2.0, 3.0, 10.0, 500.0]):
        question = store_message(database, f"question {number}", thread=f"l{number}")
        assert question.id is not None
        asked = start + timedelta(minutes=number) if number < 4 else start - timedelta(hours=5)
        _set_stored_at(database, question.id, asked)
        reply = _bot_reply(database, question.id)
        assert reply.id is not None
        _set_stored_at(database, reply.id, asked + timedelta(seconds=seconds))
    agent_exchange(database, "Agent?", "Not the bot.", thread="agent")

    with database.session() as session:
        latency = reply_latency(session=session, since=start)
        nothing = reply_latency(session=session, since=utcnow() + timedelta(hours=1))
        until = reply_latency(session=session, since=start, until=start + timedelta(minutes=2))

    assert latency.count == 4  # the agent's answer and the one before `since` are left out
    assert (latency.p50_seconds, latency.p99_seconds, latency.max_seconds) == (2.0, 10.0, 10.0)
    assert (nothing.count, nothing.p50_seconds, nothing.p99_seconds) == (0, None, None)
    assert (until.count, until.p50_seconds) == (2, 1.0)


# --------------------------------------------------------------------------- data and privacy


def test_settings_deletions_and_shards(database: Database, tmp_path: Path) -> None:
    bot_exchange(database, "Q?", "A.", rating=1, author="U7")
    exporter_for(database, tmp_path).run()
    with database.session() as session:
        set_training_opt_out(
            session=session, platform="slack", channel="C9", opt_out=True, updated_by="A1"
        )
        set_training_opt_out(
            session=session, platform="discord", channel="D1", opt_out=False, updated_by="A2"
        )
        forget_user(session=session, platform="console", user_id="U7", user_pseudonym="user-77")
        settings = channel_settings(session=session)
        deletions = deletion_log(session=session)
        shards = export_shards(session=session)

    assert [(s.platform, s.channel, s.training_opt_out, s.updated_by) for s in settings] == [
        ("discord", "D1", False, "A2"),
        ("slack", "C9", True, "A1"),
    ]
    assert [
        (d.platform, d.user_pseudonym, d.messages_deleted, d.exchanges_deleted) for d in deletions
    ] == [("console", "user-77", 2, 1)]
    assert deletions[0].requested_at.tzinfo is not None
    (shard,) = shards
    assert shard.name.startswith("shard-") and shard.exchange_count == 1
    assert shard.superseded_count == 0 and shard.created_at.tzinfo is not None
    assert (tmp_path / shard.name / "manifest.json").exists()
