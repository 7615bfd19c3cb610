"""Writing one part of a shard: the part's conversations streamed from the database message by
message, turned into the lines of every format (redacted, with their context) and written,
hashed and fsynced. The same code runs in the exporting process and in its workers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from bot.conversation import alternating_messages
from bot.learning.redaction import DEFAULT_PHONE_REGIONS, redact
from bot.learning.shards import FORMATS, PartResult, part_name

#: Formats a list of ``{"role", "content"}`` messages as training text (``model.prompt``).
Formatter = Callable[[Sequence[Mapping[str, str]]], str]
#: Keyed pseudonym of a user id on a platform (:class:`bot.learning.redaction.Pseudonymizer`).
Pseudonymize = Callable[[str, str], str]
Tick = Callable[[int], None]  # called with the exchanges seen since the last call

# One part's conversations (a range of conversation ids), message by message in order; the
# winners' answers carry their exchange. Questions come from the stream itself (they are
# messages of the conversation). The range is repeated on ``messages`` so that the planners
# estimate the part's size well (PostgreSQL chose nested loops over a modulo, 40% slower), and
# written as IN (...) so that SQLite walks its (conversation_id, rowid) index in order and
# streams without sorting.
_STREAM_SQL = """
SELECT m.id, m.conversation_id, m.role, {text},
       s.exchange_id, s.user_message_id, s.source, s.platform, s.author_id, s.text_key
FROM messages m
LEFT JOIN export_scratch s ON s.answer_message_id = m.id AND s.rn = 1
WHERE m.conversation_id BETWEEN {low} AND {high}
  AND m.conversation_id IN (SELECT conversation_id FROM export_scratch
                            WHERE rn = 1 AND conversation_id BETWEEN {low} AND {high})
  AND m.deleted_at IS NULL AND m.id <= {max_message_id}
ORDER BY m.conversation_id, m.id
"""


@dataclass(frozen=True, slots=True)
class Job:
    """What a writer needs to write parts of a shard (picklable: it goes to worker processes)."""

    url: str
    folder: Path
    parts: int
    first_conversation: int  # part k: conversation ids from first + k * width, width of them
    conversations_per_part: int
    max_message_id: int
    context_turns: int
    max_chars: int
    formatter: Formatter
    pseudonymize: Pseudonymize
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS


def write_part(job: Job, part: int, connection: Connection, tick: Tick) -> PartResult:
    """Write part ``part`` of ``job.parts``: the conversations in the part's range of ids (see
    :class:`Job`). Each file is written in batches, hashed on the way and fsynced."""
    result = PartResult(part)
    names = {key: part_name(key, part, job.parts) for key in FORMATS}
    handles: dict[str, IO[bytes]] = {}
    hashes: dict[str, Any] = {}
    pending: dict[str, list[str]] = {key: [] for key in FORMATS}
    lines = dict.fromkeys(FORMATS, 0)

    def flush() -> None:
        for key, batch in pending.items():
            if batch:
                data = "".join(batch).encode("utf-8")
                lines[key] += len(batch)
                batch.clear()
                handles[key].write(data)
                hashes[key].update(data)

    try:
        for key, name in names.items():
            handles[key] = open(job.folder / name, "wb", buffering=1 << 20)  # noqa: SIM115
            hashes[key] = hashlib.sha256()
        rows = _stream(connection, job, part)
        _format_rows(rows, job, pending, result, flush, tick, _question_lookup(connection))
        flush()
        for key, handle in handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            result.files[key] = (names[key], hashes[key].hexdigest(), lines[key])
    finally:
        while handles:
            with contextlib.suppress(OSError):  # a full disk: the caller reports the first error
                handles.popitem()[1].close()
    return result


def _stream(connection: Connection, job: Job, part: int) -> Iterator[tuple[Any, ...]]:
    """The part's messages in order, straight from the driver's cursor (a server-side one on
    PostgreSQL), in batches: the ORM's per-row machinery would cost more than the export."""
    driver = connection.connection.driver_connection
    assert driver is not None
    low = job.first_conversation + part * job.conversations_per_part
    numbers = {
        "low": int(low),
        "high": int(low + job.conversations_per_part - 1),
        "max_message_id": int(job.max_message_id),
    }
    if connection.dialect.name == "postgresql":
        # A cursor is planned for its first rows by default (nested loops); this one is read to
        # the end, and sorts a part at a time in memory.
        connection.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
        connection.execute(text("SET LOCAL work_mem = '64MB'"))
        cursor = driver.cursor(name=f"export_part_{part}")
        sql = _STREAM_SQL.format(text="m.text", **numbers)
        previous_factory = None
    else:
        # The message text comes as bytes and is decoded below, invalid UTF-8 with U+FFFD;
        # every other column takes sqlite3's C decoder instead of the connection's Python-level
        # text factory (see bot.storage), which costs more than the export.
        cursor = driver.cursor()
        cursor.row_factory = None
        sql = _STREAM_SQL.format(text="CAST(m.text AS BLOB)", **numbers)
        previous_factory = driver.text_factory
        driver.text_factory = str
    try:
        cursor.execute(sql)
        while batch := cursor.fetchmany(5000):
            yield from batch
    finally:
        cursor.close()
        if previous_factory is not None:
            driver.text_factory = previous_factory
        connection.rollback()


def _question_lookup(connection: Connection) -> Callable[[int], str | None]:
    """The text of a question that is no longer in a conversation's rolling context (asked
    long before its answer); None when it was deleted since the pick."""
    driver = connection.connection.driver_connection
    assert driver is not None
    postgres = connection.dialect.name == "postgresql"
    sql = "SELECT {text} FROM messages WHERE id = {mark} AND deleted_at IS NULL".format(
        text="text" if postgres else "CAST(text AS BLOB)", mark="%s" if postgres else "?"
    )

    def lookup(message_id: int) -> str | None:
        cursor = driver.cursor()
        try:
            cursor.execute(sql, (message_id,))
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None:
            return None
        value = row[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    return lookup


@functools.cache
def _redactor(phone_regions: tuple[str, ...]) -> Callable[[str], str]:
    """:func:`bot.learning.redaction.redact` with these phone regions, remembered for short texts:
    answers repeat (a bot's answers, human agents' canned replies), and redaction is most of
    the per-line work. Long texts are not kept, so the cache stays within a few megabytes. One
    per set of regions (one per export, in practice), so the cache's key is the text alone."""

    def redacted_once(text: str) -> str:
        return redact(text, phone_regions=phone_regions)

    remembered = functools.lru_cache(maxsize=4096)(redacted_once)

    def redacted(text: str) -> str:
        return remembered(text) if len(text) <= 1000 else redacted_once(text)

    return redacted


def _format_rows(
    rows: Iterator[tuple[Any, ...]],
    job: Job,
    pending: dict[str, list[str]],
    result: PartResult,
    flush: Callable[[], None],
    tick: Tick,
    lookup: Callable[[int], str | None],
) -> None:
    """Turn the message stream into shard lines; the hot loop of the export.

    Each message is redacted once, when it enters the rolling context of its conversation;
    the exchange's lines reuse those redacted texts.
    """
    encode = json.encoder.encode_basestring  # C, no ASCII escaping
    formatter = job.formatter
    pseudonymize = job.pseudonymize
    redacted = _redactor(job.phone_regions)
    limit = job.max_chars
    keep = job.context_turns
    completions = pending["completions"].append
    instructs = pending["instruct"].append
    conversations = pending["messages"].append
    index = pending["index"].append
    sources = result.sources
    pseudonyms: dict[tuple[str, str], str] = {}  # the users of this part, seen again and again
    # (message id, "user" | "assistant", redacted text); long enough for the context plus the
    # messages between a question and its answer.
    context: deque[tuple[int, str, str]] = deque(maxlen=keep + 8)
    current_conversation = None
    written = too_long = since_tick = 0
    for (
        message_id,
        conversation_id,
        role,
        message_text,
        exchange_id,
        user_message_id,
        source,
        platform,
        author_id,
        question_key,
    ) in rows:
        if conversation_id != current_conversation:
            context.clear()
            current_conversation = conversation_id
        if type(message_text) is bytes:
            message_text = message_text.decode("utf-8", "replace")
        chat_role = "user" if role == "user" else "assistant"
        if exchange_id is None:
            if role != "system" and message_text:
                context.append((message_id, chat_role, redacted(message_text)))
            continue
        since_tick += 1
        if since_tick == 5000:
            flush()
            tick(since_tick)
            since_tick = 0
        if context and context[-1][0] == user_message_id:  # the usual case: Q, then A
            turns = list(context)
        else:
            turns = [turn for turn in context if turn[0] <= user_message_id]
            if not turns or turns[-1][0] != user_message_id:
                question_text = lookup(user_message_id)
                if question_text is None:  # deleted since the pick
                    continue
                if len(question_text) > limit:
                    too_long += 1
                    continue
                turns.append((user_message_id, "user", redacted(question_text)))
        if len(message_text) > limit or len(turns[-1][2]) > limit:
            too_long += 1
            context.append((message_id, chat_role, ""))
            continue
        answer = redacted(message_text)
        context.append((message_id, chat_role, answer))
        question = turns[-1][2]
        if not question or not answer or question.isspace() or answer.isspace():
            continue
        if len(turns) == 1:
            conversation = [{"role": "user", "content": question}]
        else:
            conversation = alternating_messages(
                (role, text) for _, role, text in turns[-(keep + 1) :]
            )
        conversation.append({"role": "assistant", "content": answer})
        encoded_question = encode(question)
        encoded_answer = encode(answer)
        completions(f'{{"user": {encoded_question}, "agent": {encoded_answer}}}\n')
        instructs(f'{{"text": {encode(formatter(conversation))}}}\n')
        if len(conversation) == 2 and conversation[0]["content"] is question:  # no context
            conversations(
                f'{{"messages": [{{"role": "user", "content": {encoded_question}}}, '
                f'{{"role": "assistant", "content": {encoded_answer}}}]}}\n'
            )
        else:
            conversations(
                '{"messages": ['
                + ", ".join(
                    f'{{"role": "{m["role"]}", "content": {encode(m["content"])}}}'
                    for m in conversation
                )
                + "]}\n"
            )
        pseudonym = pseudonyms.get((platform, author_id))
        if pseudonym is None:
            if len(pseudonyms) >= 50_000:  # bounded: about 13 MB
                pseudonyms.clear()
            pseudonym = pseudonyms[(platform, author_id)] = pseudonymize(
                platform or "", author_id or ""
            )
        index(f"{exchange_id}\t{pseudonym}\t{question_key}\t{source}\n")
        sources[source] = sources.get(source, 0) + 1
        written += 1
    tick(since_tick)
    result.exchanges += written
    result.too_long += too_long
