"""Export of good exchanges as fine-tuning data: one new shard per run, exactly once.

Which exchanges: answers from human agents and admin corrections rank first, 👍-rated bot
replies next; 👎-rated and unrated bot replies are left out (``include_unrated`` lets unrated
ones in), and so is anything from a channel with training turned off. Among near-duplicate
questions (same :func:`bot.storage.text_key`) the best-ranked, then newest, answer is written;
the others are marked as consumed by the same shard.

A shard is a folder with the three formats, an index and a manifest::

    shard-<UTC time>-<random>/
        completions.jsonl   {"user": "...", "agent": "..."}
        instruct.jsonl      {"text": "<s>[INST] ... [/INST] ... </s>"}  (context included)
        messages.jsonl      {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
        index.tsv           exchange id, user pseudonym, question key, source — line by line,
                            so that a later forget-me can drop a user's lines from old shards
        manifest.json       counts, time range, schema version, content hash

Crash safety: the shard is written into a hidden temporary folder and fsynced; then one
database transaction records the shard and marks its exchanges (the commit point); then the
folder is renamed into place. :meth:`Exporter.recover`, run first by every export, finishes
that rename for a committed shard or deletes an uncommitted folder, so a process killed at any
step leaves either no shard and no change in the database, or both. A database lease makes
several instances on one database take turns.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from bot.conversation import utcnow
from bot.redaction import Pseudonymizer, redact
from bot.storage import Database, ExportShardRecord, LeaseRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LEASE_NAME = "export"
SHARD_PREFIX = "shard-"
TEMP_PREFIX = ".tmp-"
FILES = {
    "completions": "completions.jsonl",
    "instruct": "instruct.jsonl",
    "messages": "messages.jsonl",
    "index": "index.tsv",
}

#: Formats a list of ``{"role", "content"}`` messages as training text (``model.prompt``).
Formatter = Callable[[Sequence[Mapping[str, str]]], str]


class ExportError(Exception):
    """The export could not run; nothing was written and nothing was marked."""


@dataclass(frozen=True, slots=True)
class ExportOptions:
    directory: Path
    include_unrated: bool = False  # let unrated bot replies in (👎-rated never are)
    context_turns: int = 6  # earlier messages of the conversation given with each exchange
    max_chars: int = 20_000  # longer questions or answers are skipped (and counted)
    lease_seconds: float = 120.0  # a crashed holder's lease lapses after this
    create_directory: bool = False  # create a missing export directory (the default one)


@dataclass(frozen=True, slots=True)
class ExportResult:
    shard: str | None  # the new shard's name; None when nothing was exported
    path: Path | None
    exchanges: int = 0
    superseded: int = 0
    skipped_too_long: int = 0
    skipped_reason: str | None = None  # why the run did nothing (lease held elsewhere, ...)

    def describe(self) -> str:
        if self.skipped_reason:
            return f"Export skipped: {self.skipped_reason}."
        if self.shard is None:
            return "Nothing new to export."
        return (
            f"Exported {self.exchanges} exchanges to {self.shard} "
            f"({self.superseded} near-duplicates left out, {self.skipped_too_long} too long)."
        )


ProgressCallback = Callable[[int, int], None]  # (exchanges done, exchanges in total)
StepCallback = Callable[[str], None]  # named steps, for crash tests


@dataclass(slots=True)
class _ShardWriter:
    """The temporary folder of a shard being written, with running hashes.

    Lines are collected per file and written in batches: one encode, hash update and write
    per batch rather than per line.
    """

    folder: Path
    handles: dict[str, IO[bytes]] = field(default_factory=dict)
    hashes: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, list[str]] = field(default_factory=dict)

    def open(self) -> None:
        self.folder.mkdir()
        for key, name in FILES.items():
            self.handles[key] = open(self.folder / name, "wb", buffering=1 << 20)  # noqa: SIM115
            self.hashes[key] = hashlib.sha256()
            self.pending[key] = []

    def flush_lines(self) -> None:
        for key, lines in self.pending.items():
            if lines:
                data = "".join(lines).encode("utf-8")
                lines.clear()
                self.handles[key].write(data)
                self.hashes[key].update(data)

    def close(self) -> None:
        """Flush, fsync and close every file (errors such as a full disk propagate)."""
        self.flush_lines()
        for handle in self.handles.values():
            handle.flush()
            os.fsync(handle.fileno())
        while self.handles:
            self.handles.popitem()[1].close()

    def discard(self) -> None:
        """Drop the half-written shard; buffered data that cannot be written is let go."""
        while self.handles:
            with contextlib.suppress(OSError):
                self.handles.popitem()[1].close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _lease_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _holder_is_dead(holder: str) -> bool:
    """A lease held by a process of this host that no longer runs can be taken over at once."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_PICK_SQL = """
INSERT INTO export_pick (exchange_id, answer_message_id, user_message_id, conversation_id,
                         source, rn)
SELECT id, answer_message_id, user_message_id, conversation_id, source,
       ROW_NUMBER() OVER (PARTITION BY text_key ORDER BY source_rank, id DESC)
FROM (
    SELECT e.id, e.answer_message_id, e.user_message_id, e.conversation_id, q.text_key,
           CASE WHEN e.answered_by IN ('human_agent', 'correction') THEN e.answered_by
                WHEN COALESCE(r.score, 0) > 0 THEN 'upvoted'
                ELSE 'unrated' END AS source,
           CASE WHEN e.answered_by IN ('human_agent', 'correction') THEN 0
                WHEN COALESCE(r.score, 0) > 0 THEN 1
                ELSE 2 END AS source_rank
    FROM exchanges e
    JOIN messages q ON q.id = e.user_message_id
    JOIN messages a ON a.id = e.answer_message_id
    LEFT JOIN (SELECT exchange_id, SUM(value) AS score FROM ratings GROUP BY exchange_id) r
           ON r.exchange_id = e.id
    WHERE e.export_shard_id IS NULL
      AND e.for_training = :yes
      AND e.id <= :max_exchange_id
      AND q.deleted_at IS NULL AND a.deleted_at IS NULL
      AND (e.answered_by IN ('human_agent', 'correction')
           OR COALESCE(r.score, 0) > 0
           OR (:include_unrated = :yes AND r.exchange_id IS NULL))
) ranked
"""

_STREAM_SQL = """
SELECT m.id, m.conversation_id, m.role, {m_text},
       p.exchange_id, p.user_message_id, p.source, {q_text}, q.platform, q.author_id,
       q.text_key, e.created_at
FROM messages m
JOIN (SELECT DISTINCT conversation_id FROM export_pick WHERE rn = 1) c
  ON c.conversation_id = m.conversation_id
LEFT JOIN export_pick p ON p.answer_message_id = m.id AND p.rn = 1
LEFT JOIN exchanges e ON e.id = p.exchange_id
LEFT JOIN messages q ON q.id = p.user_message_id
WHERE m.deleted_at IS NULL
ORDER BY m.conversation_id, m.id
"""


class Exporter:
    """Runs exports against one database into one directory."""

    def __init__(
        self,
        *,
        database: Database,
        options: ExportOptions,
        formatter: Formatter,
        pseudonymize: Pseudonymizer,
    ) -> None:
        self.database = database
        self.options = options
        self.formatter = formatter
        self.pseudonymize = pseudonymize
        self.holder = _lease_holder()

    # ------------------------------------------------------------------ public

    def run(
        self,
        *,
        progress: ProgressCallback | None = None,
        on_step: StepCallback | None = None,
    ) -> ExportResult:
        """Export every exchange not exported before into one new shard.

        Raises:
            ExportError: the directory is missing, read-only or full, or the database failed;
                no shard is left behind and no exchange is marked.
        """
        step = on_step or (lambda _name: None)
        directory = self._checked_directory()
        try:
            if not self._acquire_lease():
                logger.warning("export skipped: another instance holds the export lease")
                return ExportResult(None, None, skipped_reason="another instance is exporting")
        except SQLAlchemyError as error:
            raise ExportError(f"database error before export: {_reason(error)}") from error
        step("leased")
        try:
            self.recover()
            step("recovered")
            return self._export(directory, progress, step)
        finally:
            with contextlib.suppress(SQLAlchemyError):
                self._release_lease()

    def recover(self) -> None:
        """Finish or undo what a killed export left (call with the lease held)."""
        directory = self.options.directory
        if not directory.is_dir():
            return
        with self.database.engine.connect() as connection:
            committed = set(connection.execute(text("SELECT name FROM export_shards")).scalars())
        for temporary in directory.glob(f"{TEMP_PREFIX}{SHARD_PREFIX}*"):
            name = temporary.name.removeprefix(TEMP_PREFIX)
            if name in committed and not (directory / name).exists():
                logger.warning("recovery: publishing committed shard %s", name)
                temporary.rename(directory / name)
                _fsync_directory(directory)
            else:
                logger.warning("recovery: removing uncommitted shard folder %s", temporary.name)
                shutil.rmtree(temporary, ignore_errors=True)

    # ------------------------------------------------------------------ steps

    def _checked_directory(self) -> Path:
        directory = self.options.directory
        if not directory.exists():
            if not self.options.create_directory:
                raise ExportError(f"export directory {directory} does not exist")
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ExportError(f"cannot create export directory {directory}: {error}") from None
        if not directory.is_dir():
            raise ExportError(f"export directory {directory} is not a directory")
        if not os.access(directory, os.W_OK):
            raise ExportError(f"export directory {directory} is not writable")
        return directory

    def _export(
        self, directory: Path, progress: ProgressCallback | None, step: StepCallback
    ) -> ExportResult:
        name = f"{SHARD_PREFIX}{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        writer = _ShardWriter(directory / f"{TEMP_PREFIX}{name}")
        try:
            with self.database.engine.connect() as connection:
                picked, superseded = self._pick(connection)
                step("selected")
                if picked == 0:
                    connection.rollback()
                    return ExportResult(None, None)
                stats = self._write(connection, writer, picked, progress)
                step("written")
                self._commit(connection, name, stats, superseded, writer)
            step("committed")
        except OSError as error:
            writer.discard()
            raise ExportError(_describe_os_error(error, directory)) from error
        except SQLAlchemyError as error:
            writer.discard()
            raise ExportError(f"database error during export: {_reason(error)}") from error
        except BaseException:
            writer.discard()
            raise
        # Committed: publishing can only be finished from here, by us or by recovery.
        final = directory / name
        writer.folder.rename(final)
        _fsync_directory(directory)
        step("published")
        logger.info("exported %d exchanges to %s", stats.exchanges, final)
        return ExportResult(
            name,
            final,
            exchanges=stats.exchanges,
            superseded=superseded,
            skipped_too_long=stats.too_long,
        )

    def _pick(self, connection: Connection) -> tuple[int, int]:
        """Snapshot this run's candidates into a temporary table; (winners, superseded)."""
        connection.execute(text("DROP TABLE IF EXISTS export_pick"))
        connection.execute(
            text(
                "CREATE TEMPORARY TABLE export_pick (exchange_id BIGINT PRIMARY KEY, "
                "answer_message_id BIGINT, user_message_id BIGINT, conversation_id BIGINT, "
                "source VARCHAR(16), rn BIGINT)"
            )
        )
        max_id = connection.execute(text("SELECT COALESCE(MAX(id), 0) FROM exchanges")).scalar_one()
        connection.execute(
            text(_PICK_SQL),
            {
                "max_exchange_id": max_id,
                "include_unrated": self.options.include_unrated,
                "yes": True,
            },
        )
        connection.execute(
            text("CREATE INDEX export_pick_answer ON export_pick (answer_message_id)")
        )
        # Temporary tables get no statistics by themselves; without them PostgreSQL plans the
        # stream below as nested loops over whole tables.
        connection.execute(text("ANALYZE export_pick"))
        winners, superseded = connection.execute(
            text(
                "SELECT COALESCE(SUM(CASE WHEN rn = 1 THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN rn > 1 THEN 1 ELSE 0 END), 0) FROM export_pick"
            )
        ).one()
        return int(winners), int(superseded)

    def _write(
        self,
        connection: Connection,
        writer: _ShardWriter,
        total: int,
        progress: ProgressCallback | None,
    ) -> _Stats:
        writer.open()
        stats = _Stats()
        self._write_rows(self._rows(connection), writer, stats, total, progress)
        writer.close()
        manifest = self._manifest(writer, stats)
        manifest_path = writer.folder / "manifest.json"
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(writer.folder)
        stats.content_hash = manifest["content_hash"]
        return stats

    def _rows(self, connection: Connection) -> Iterator[tuple[Any, ...]]:
        """The candidates' conversations, message by message, in order.

        Straight from the driver's cursor (a server-side one on PostgreSQL), in batches: the
        ORM's per-row machinery would cost more than the rest of the export together.
        """
        driver = connection.connection.driver_connection
        assert driver is not None
        if connection.dialect.name == "postgresql":
            # A cursor is planned for its first rows by default (nested loops); this one is
            # read to the end.
            connection.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
            cursor = driver.cursor(name="export_stream")
            sql = _STREAM_SQL.format(m_text="m.text", q_text="q.text")
        else:
            # The two message texts come as bytes and are decoded below, invalid UTF-8 with
            # U+FFFD; every other column takes sqlite3's C decoder instead of the connection's
            # Python-level text factory (see bot.storage), which costs more than the export.
            cursor = driver.cursor()
            cursor.row_factory = None
            sql = _STREAM_SQL.format(m_text="CAST(m.text AS BLOB)", q_text="CAST(q.text AS BLOB)")
            previous_factory = driver.text_factory
            driver.text_factory = str
        try:
            cursor.execute(sql)
            while batch := cursor.fetchmany(5000):
                yield from batch
        finally:
            cursor.close()
            if connection.dialect.name != "postgresql":
                driver.text_factory = previous_factory

    def _write_rows(
        self,
        rows: Iterator[tuple[Any, ...]],
        writer: _ShardWriter,
        stats: _Stats,
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        """Turn the message stream into shard lines; the hot loop of the export.

        Each message is redacted once, when it enters the rolling context of its
        conversation; the exchange's lines reuse those redacted texts.
        """
        encode = json.encoder.encode_basestring  # C, no ASCII escaping
        formatter = self.formatter
        pseudonymize = self.pseudonymize
        limit = self.options.max_chars
        keep = self.options.context_turns
        completions = writer.pending["completions"].append
        instructs = writer.pending["instruct"].append
        conversations = writer.pending["messages"].append
        index = writer.pending["index"].append
        # (message id, "user" | "assistant", redacted text); long enough for the context plus
        # the messages between a question and its answer.
        context: deque[tuple[int, str, str]] = deque(maxlen=keep + 8)
        current_conversation = None
        renewed_at = time.monotonic()
        for (
            message_id,
            conversation_id,
            role,
            message_text,
            exchange_id,
            user_message_id,
            source,
            question_text,
            platform,
            author_id,
            question_key,
            created_at,
        ) in rows:
            if conversation_id != current_conversation:
                context.clear()
                current_conversation = conversation_id
            if type(message_text) is bytes:
                message_text = message_text.decode("utf-8", "replace")
            if type(question_text) is bytes:
                question_text = question_text.decode("utf-8", "replace")
            chat_role = "user" if role == "user" else "assistant"
            if exchange_id is None:
                if role != "system" and message_text:
                    context.append((message_id, chat_role, redact(message_text)))
                continue
            stats.seen += 1
            if len(message_text) > limit or len(question_text or "") > limit:
                stats.too_long += 1
                continue
            answer = redact(message_text)
            if context and context[-1][0] == user_message_id:  # the usual case: Q, then A
                turns = list(context)
            else:
                turns = [turn for turn in context if turn[0] <= user_message_id]
            if not turns or turns[-1][0] != user_message_id:
                turns.append((user_message_id, "user", redact(question_text or "")))
            context.append((message_id, chat_role, answer))
            question = turns[-1][2]
            if not question.strip() or not answer.strip():
                continue
            conversation = _alternating(turns[-(keep + 1) :])
            conversation.append({"role": "assistant", "content": answer})
            encoded_question = encode(question)
            encoded_answer = encode(answer)
            completions(f'{{"user": {encoded_question}, "agent": {encoded_answer}}}\n')
            instructs(f'{{"text": {encode(formatter(conversation))}}}\n')
            conversations(
                '{"messages": ['
                + ", ".join(
                    f'{{"role": "{m["role"]}", "content": {encode(m["content"])}}}'
                    for m in conversation
                )
                + "]}\n"
            )
            index(
                f"{exchange_id}\t{pseudonymize(platform or '', author_id or '')}\t"
                f"{question_key}\t{source}\n"
            )
            stats.count(source, created_at)
            if stats.exchanges % 5000 == 0:
                writer.flush_lines()
                if progress is not None:
                    progress(stats.seen, total)
                if time.monotonic() - renewed_at > self.options.lease_seconds / 4:
                    self._renew_lease()
                    renewed_at = time.monotonic()
        if progress is not None:
            progress(stats.seen, total)

    def _commit(
        self,
        connection: Connection,
        name: str,
        stats: _Stats,
        superseded: int,
        writer: _ShardWriter,
    ) -> None:
        """The commit point: record the shard and mark its exchanges in one transaction."""
        # End the read transaction first: SQLite cannot turn a stale read snapshot into a
        # write, and the marks below only need the temporary table.
        connection.commit()
        with connection.begin():
            shard_id = connection.execute(
                ExportShardRecord.__table__.insert().returning(ExportShardRecord.__table__.c.id),  # type: ignore[attr-defined]
                {
                    "name": name,
                    "created_at": utcnow(),
                    "exchange_count": stats.exchanges,
                    "superseded_count": superseded,
                    "first_exchange_at": _as_datetime(stats.first_at) if stats.first_at else None,
                    "last_exchange_at": _as_datetime(stats.last_at) if stats.last_at else None,
                    "schema_version": SCHEMA_VERSION,
                    "content_hash": stats.content_hash,
                },
            ).scalar_one()
            connection.execute(
                text(
                    "UPDATE exchanges SET export_shard_id = :shard "
                    "WHERE id IN (SELECT exchange_id FROM export_pick)"
                ),
                {"shard": shard_id},
            )

    def _manifest(self, writer: _ShardWriter, stats: _Stats) -> dict[str, Any]:
        files = {
            key: {"name": FILES[key], "sha256": digest.hexdigest()}
            for key, digest in writer.hashes.items()
        }
        content = hashlib.sha256()
        for key in sorted(files):
            content.update(f"{files[key]['name']}:{files[key]['sha256']}\n".encode())
        return {
            "schema_version": SCHEMA_VERSION,
            "shard": writer.folder.name.removeprefix(TEMP_PREFIX),
            "created_at": utcnow().isoformat(),
            "exchanges": stats.exchanges,
            "skipped_too_long": stats.too_long,
            "sources": dict(sorted(stats.sources.items())),
            "time_range": {
                "first": _as_datetime(stats.first_at).isoformat() if stats.first_at else None,
                "last": _as_datetime(stats.last_at).isoformat() if stats.last_at else None,
            },
            "files": files,
            "content_hash": content.hexdigest(),
            "formats": {
                "completions": 'dictionary form: {"user": ..., "agent": ...}',
                "instruct": 'Llama-2 [INST] text: {"text": ...}',
                "messages": 'conversational: {"messages": [{"role", "content"}, ...]}',
            },
        }

    # ------------------------------------------------------------------ lease

    def _acquire_lease(self) -> bool:
        now = utcnow()
        expires = now + timedelta(seconds=self.options.lease_seconds)
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            current = connection.execute(
                select(table.c.holder, table.c.expires_at).where(table.c.name == LEASE_NAME)
            ).first()
            if current is not None:
                holder, expires_at = current
                lapsed = _as_datetime(expires_at) < now or _holder_is_dead(holder)
                if not lapsed and holder != self.holder:
                    return False
                # Conditional on the holder we saw, so two instances cannot both take it over.
                taken = connection.execute(
                    update(table)
                    .where(table.c.name == LEASE_NAME, table.c.holder == holder)
                    .values(holder=self.holder, expires_at=expires)
                )
                return taken.rowcount == 1
        try:
            with self.database.engine.begin() as connection:
                connection.execute(
                    table.insert().values(name=LEASE_NAME, holder=self.holder, expires_at=expires)
                )
        except IntegrityError:
            return False  # another instance inserted it first
        return True

    def _renew_lease(self) -> None:
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            connection.execute(
                update(table)
                .where(table.c.name == LEASE_NAME, table.c.holder == self.holder)
                .values(expires_at=utcnow() + timedelta(seconds=self.options.lease_seconds))
            )

    def _release_lease(self) -> None:
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            connection.execute(
                delete(table).where(table.c.name == LEASE_NAME, table.c.holder == self.holder)
            )


@dataclass(slots=True)
class _Stats:
    exchanges: int = 0
    seen: int = 0
    too_long: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    first_at: datetime | None = None
    last_at: datetime | None = None
    content_hash: str = ""

    def count(self, source: str, created_at: Any) -> None:
        self.exchanges += 1
        self.sources[source] = self.sources.get(source, 0) + 1
        # Min/max on the raw values (ISO text on SQLite, datetimes on PostgreSQL): both order
        # correctly and parsing every one would cost more than the comparison.
        if self.first_at is None or created_at < self.first_at:
            self.first_at = created_at
        if self.last_at is None or created_at > self.last_at:
            self.last_at = created_at


def _alternating(turns: list[tuple[int, str, str]]) -> list[dict[str, str]]:
    """Chat messages that alternate user/assistant, starting with a user turn (as
    :func:`bot.conversation.to_chat_messages`), from (id, role, text) turns."""
    messages: list[dict[str, str]] = []
    for _, role, content in turns:
        if not messages:
            if role == "user":
                messages.append({"role": role, "content": content})
        elif messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _as_datetime(value: Any) -> datetime:
    """SQLite hands back timestamps as text; PostgreSQL as aware datetimes."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _reason(error: SQLAlchemyError) -> str:
    return str(getattr(error, "orig", error)).strip().splitlines()[0]


def _describe_os_error(error: OSError, directory: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"export directory {directory} is full ({error.strerror})"
    if error.errno in {errno.EROFS, errno.EACCES, errno.EPERM}:
        return f"export directory {directory} is not writable ({error.strerror})"
    return f"cannot write to export directory {directory}: {error}"


def shard_folders(directory: Path) -> list[Path]:
    """The published shards in ``directory``, oldest first."""
    return sorted(p for p in directory.glob(f"{SHARD_PREFIX}*") if p.is_dir())
