"""Export of good exchanges as fine-tuning data: one new shard per run, exactly once.

Which exchanges: answers from human agents and admin corrections rank first, 👍-rated bot
replies next; 👎-rated and unrated bot replies are left out (``include_unrated`` lets unrated
ones in), and so is anything from a channel with training turned off, or from a thread of one
(checked at every export, also for exchanges recorded before it was turned off; turning it off
withdraws those for good, see :func:`bot.storage.set_training_opt_out`). Among near-duplicate
questions (same :func:`bot.storage.text_key`) the best-ranked, then newest, answer is written;
the others are marked as consumed by the same shard.

A shard is a folder with the three formats and an index, each in one or more parts named the
way Hugging Face names data files (``messages-00000-of-00002.jsonl``; a glob such as
``messages-*.jsonl`` loads them all, see :func:`data_files`), and a manifest::

    shard-<UTC time>-<random>/
        completions-*.jsonl   {"user": "...", "agent": "..."}
        instruct-*.jsonl      {"text": "<s>[INST] ... [/INST] ... </s>"}  (context included)
        messages-*.jsonl      {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
        index-*.tsv           exchange id, user pseudonym, question key, source — line by line,
                              so that a later forget-me can drop a user's lines from old shards
        manifest.json         counts, time range, schema version, every file's hash

Large exports are written by several processes at once (one per CPU core, at most four), each
taking whole conversations, so that every line keeps its context; small ones by this process
alone, in a single part.

Crash safety: the shard is written into a hidden temporary folder and fsynced; then one
database transaction records the shard and marks its exchanges (the commit point); then the
folder is renamed into place. :meth:`Exporter.recover`, run first by every export, finishes
that rename for a committed shard or deletes an uncommitted folder, so a process killed at any
step leaves either no shard and no change in the database, or both. A database lease makes
several instances on one database take turns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
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

from bot.conversation import alternating_messages, utcnow
from bot.learning.redaction import DEFAULT_PHONE_REGIONS, redact
from bot.storage import Database, ExportShardRecord, LeaseRecord
from bot.storage.claims import holder_is_gone_here, instance_id

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: formats in parts (``messages-00000-of-00002.jsonl``), listed per key
LEASE_NAME = "export"
SHARD_PREFIX = "shard-"
TEMP_PREFIX = ".tmp-"
SCRATCH_TABLE = "export_scratch"
#: Every file kind of a shard: key -> (name stem, extension).
FORMATS = {
    "completions": ("completions", "jsonl"),
    "instruct": ("instruct", "jsonl"),
    "messages": ("messages", "jsonl"),
    "index": ("index", "tsv"),
}
MAX_WORKERS = 4

#: Formats a list of ``{"role", "content"}`` messages as training text (``model.prompt``).
Formatter = Callable[[Sequence[Mapping[str, str]]], str]
#: Keyed pseudonym of a user id on a platform (:class:`bot.learning.redaction.Pseudonymizer`).
Pseudonymize = Callable[[str, str], str]


class ExportError(Exception):
    """The export could not run; nothing was written and nothing was marked."""


def part_name(key: str, part: int, parts: int) -> str:
    """The file name of one part of one format, as Hugging Face names data files."""
    stem, extension = FORMATS[key]
    return f"{stem}-{part:05d}-of-{parts:05d}.{extension}"


def shard_files(shard: Path, key: str) -> list[Path]:
    """The files of one format in a shard, in order."""
    stem, extension = FORMATS[key]
    return sorted(shard.glob(f"{stem}-*-of-*.{extension}"))


def data_files(shard: Path, key: str) -> str:
    """A glob of one format's files, for ``datasets.load_dataset("json", data_files=...)``."""
    stem, extension = FORMATS[key]
    return str(shard / f"{stem}-*-of-*.{extension}")


@dataclass(frozen=True, slots=True)
class ExportOptions:
    directory: Path
    include_unrated: bool = False  # let unrated bot replies in (👎-rated never are)
    context_turns: int = 6  # earlier messages of the conversation given with each exchange
    max_chars: int = 20_000  # longer questions or answers are skipped (and counted)
    lease_seconds: float = 120.0  # a crashed holder's lease lapses after this
    create_directory: bool = False  # create a missing export directory (the default one)
    workers: int = 0  # processes writing a large export; 0: one per CPU core, at most 4
    parallel_from: int = 50_000  # exports with fewer candidates are written by this process
    # Regions whose national phone formats redaction knows (international ones always count).
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS


@dataclass(frozen=True, slots=True)
class ExportResult:
    shard: str | None  # the new shard's name; None when nothing was exported
    path: Path | None
    exchanges: int = 0
    superseded: int = 0
    skipped_too_long: int = 0
    skipped_reason: str | None = None  # why the run did nothing (lease held elsewhere, ...)
    processes: int = 1  # how many processes wrote the shard
    worker_peak_memory_mb: tuple[float, ...] = ()  # each worker process's peak resident memory

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


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# The candidates of this run, with what the writers need of each, in a scratch table that every
# writing process can read (UNLOGGED on PostgreSQL: it is rebuilt by every run). ``rn`` is 1 for
# the winner of each near-duplicate group. CREATE TABLE AS rather than INSERT: PostgreSQL plans
# it in parallel (an INSERT never is), about twice as fast on a million exchanges. It takes no
# bind parameters, so the two values below are formatted in (an int and a boolean).
# Conversations in a channel with training off now, or in a thread of one, are left out, also
# those recorded before it was turned off (``set_training_opt_out`` withdraws those for good;
# this covers a setting written otherwise, or one written while the export runs). The few
# opted-out channels drive that subquery (CROSS JOIN: SQLite keeps the order as written), so
# with none it costs nothing.
_PICK_SQL = """
CREATE {unlogged}TABLE export_scratch AS
SELECT id AS exchange_id, answer_message_id, user_message_id, conversation_id, source,
       ROW_NUMBER() OVER (PARTITION BY text_key ORDER BY source_rank, id DESC) AS rn,
       created_at, platform, author_id, text_key
FROM (
    SELECT e.id, e.answer_message_id, e.user_message_id, e.conversation_id, e.created_at,
           q.text_key, q.platform, q.author_id,
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
    WHERE e.for_training = {yes}
      AND e.id <= {max_exchange_id}
      AND q.deleted_at IS NULL AND a.deleted_at IS NULL
      AND (e.answered_by IN ('human_agent', 'correction')
           OR COALESCE(r.score, 0) > 0
           OR ({include_unrated} AND r.exchange_id IS NULL))
      AND NOT EXISTS (SELECT 1 FROM export_marks x WHERE x.exchange_id = e.id)
      AND e.conversation_id NOT IN (SELECT c.id FROM channel_settings s CROSS JOIN conversations c
                                    WHERE s.training_opt_out = {yes} AND c.platform = s.platform
                                      AND (c.channel = s.channel OR c.parent_channel = s.channel))
) ranked
"""

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
class _Job:
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


@dataclass(frozen=True, slots=True)
class _Picked:
    winners: int  # exchanges to write (the best of each near-duplicate group)
    superseded: int  # near-duplicates consumed without a line of their own
    max_message_id: int  # newest message at the pick: later ones are not context
    first_conversation: int  # the winners' conversations lie in this id range
    last_conversation: int


@dataclass(slots=True)
class _PartResult:
    part: int
    files: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # key: name, hash, lines
    exchanges: int = 0
    too_long: int = 0
    sources: dict[str, int] = field(default_factory=dict)


Tick = Callable[[int], None]  # called with the exchanges seen since the last call


class Exporter:
    """Runs exports against one database into one directory."""

    def __init__(
        self,
        *,
        database: Database,
        options: ExportOptions,
        formatter: Formatter,
        pseudonymize: Pseudonymize,
    ) -> None:
        self.database = database
        self.options = options
        self.formatter = formatter
        self.pseudonymize = pseudonymize
        self.holder = instance_id()

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
                self._drop_scratch()
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
        name = f"{SHARD_PREFIX}{utcnow():%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"
        folder = directory / f"{TEMP_PREFIX}{name}"
        workers: _Workers | None = None
        try:
            if self._processes_wanted() > 1 and self._probably_large():
                # They take a second or so to start: let them do it while the pick runs.
                workers = _Workers.start(self._processes_wanted() - 1)
            with self.database.engine.connect() as connection:
                picked = self._pick(connection)
                step("selected")
                if picked.winners + picked.superseded == 0:
                    return ExportResult(None, None)
                folder.mkdir()
                large = picked.winners >= self.options.parallel_from
                if not large and workers is not None:
                    workers.stop()
                    workers = None
                elif large and workers is None and self._processes_wanted() > 1:
                    workers = _Workers.start(self._processes_wanted() - 1)
                results = self._write(folder, picked, progress, workers)
                processes = 1 if workers is None else len(workers.processes) + 1
                manifest = self._manifest(connection, folder, name, results, processes)
                step("written")
                self._commit(connection, name, manifest, picked.superseded)
            step("committed")
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExportError(_describe_os_error(error, directory)) from error
        except SQLAlchemyError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExportError(_describe_database_error(error)) from error
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            if workers is not None:
                workers.stop()
        # Committed: publishing can only be finished from here, by us or by recovery.
        final = directory / name
        folder.rename(final)
        _fsync_directory(directory)
        step("published")
        logger.info("exported %d exchanges to %s", manifest["exchanges"], final)
        return ExportResult(
            name,
            final,
            exchanges=manifest["exchanges"],
            superseded=picked.superseded,
            skipped_too_long=manifest["skipped_too_long"],
            processes=processes,
            worker_peak_memory_mb=() if workers is None else tuple(sorted(workers.peaks_mb)),
        )

    def _pick(self, connection: Connection) -> _Picked:
        """Snapshot this run's candidates into the scratch table (committed, so that worker
        processes can read it)."""
        postgres = connection.dialect.name == "postgresql"
        connection.execute(text(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}"))
        if postgres:
            # Enough for the ranking sort and the joins to stay in memory (the default 4 MB
            # spills a million rows to disk several times over).
            connection.execute(text("SET LOCAL work_mem = '64MB'"))
        else:
            # SQLite sorts with helper threads when allowed: the ranking sort and the index
            # below take a fifth less time with two.
            connection.exec_driver_sql(f"PRAGMA threads = {self._processes_wanted()}")
        max_exchange_id, max_message_id = connection.execute(
            text(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM exchanges), "
                "(SELECT COALESCE(MAX(id), 0) FROM messages)"
            )
        ).one()
        true, false = ("TRUE", "FALSE") if postgres else ("1", "0")
        connection.execute(
            text(
                _PICK_SQL.format(
                    unlogged="UNLOGGED " if postgres else "",
                    yes=true,
                    max_exchange_id=int(max_exchange_id),
                    include_unrated=true if self.options.include_unrated else false,
                )
            )
        )
        if not postgres:  # SQLite joins by nested loops; PostgreSQL hashes the part's rows
            connection.execute(
                text(f"CREATE INDEX {SCRATCH_TABLE}_answer ON {SCRATCH_TABLE} (answer_message_id)")
            )
        # Fresh tables have no statistics; without them PostgreSQL plans the stream as nested
        # loops over whole tables.
        connection.execute(text(f"ANALYZE {SCRATCH_TABLE}"))
        winners, superseded, first, last = connection.execute(
            text(
                "SELECT COALESCE(SUM(CASE WHEN rn = 1 THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN rn > 1 THEN 1 ELSE 0 END), 0), "
                "MIN(CASE WHEN rn = 1 THEN conversation_id END), "
                f"MAX(CASE WHEN rn = 1 THEN conversation_id END) FROM {SCRATCH_TABLE}"
            )
        ).one()
        connection.commit()
        if not postgres:
            connection.exec_driver_sql("PRAGMA threads = 0")  # the connection goes back to the pool
        return _Picked(
            winners=int(winners),
            superseded=int(superseded),
            max_message_id=int(max_message_id),
            first_conversation=int(first or 0),
            last_conversation=int(last or 0),
        )

    def _drop_scratch(self) -> None:
        with self.database.engine.begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}"))

    def _processes_wanted(self) -> int:
        return self.options.workers or min(os.cpu_count() or 1, MAX_WORKERS)

    def _probably_large(self) -> bool:
        """Whether this run will likely write at least ``parallel_from`` exchanges: counts the
        exchanges newer than the newest exported one (cheap: a range of the primary key)."""
        with self.database.engine.connect() as connection:
            newer = connection.execute(
                text(
                    "SELECT COUNT(*) FROM exchanges WHERE id > "
                    "(SELECT COALESCE(MAX(exchange_id), 0) FROM export_marks)"
                )
            ).scalar_one()
        return int(newer) >= self.options.parallel_from

    def _write(
        self,
        folder: Path,
        picked: _Picked,
        progress: ProgressCallback | None,
        workers: _Workers | None,
    ) -> list[_PartResult]:
        """Write every part of the shard into ``folder``, alone or with ``workers``."""
        total = picked.winners
        processes = 1 if workers is None else len(workers.processes) + 1
        # Two parts per process, handed out in turn, so that a process that started late or
        # met long conversations takes fewer of them (more parts cost PostgreSQL more joins).
        parts = 1 if processes == 1 else processes * 2
        span = picked.last_conversation - picked.first_conversation + 1
        job = _Job(
            url=self.database.url,
            folder=folder,
            parts=parts,
            first_conversation=picked.first_conversation,
            conversations_per_part=-(-span // parts),
            max_message_id=picked.max_message_id,
            context_turns=self.options.context_turns,
            max_chars=self.options.max_chars,
            formatter=self.formatter,
            pseudonymize=self.pseudonymize,
            phone_regions=self.options.phone_regions,
        )
        done = 0
        renewed_at = time.monotonic()

        def tick(count: int) -> None:
            nonlocal done, renewed_at
            done += count
            if progress is not None:
                progress(min(done, total), total)
            if time.monotonic() - renewed_at > self.options.lease_seconds / 4:
                self._renew_lease()
                renewed_at = time.monotonic()

        if workers is None:
            with self.database.engine.connect() as connection:
                results = [_write_part(job, 0, connection, tick)]
        else:
            results = workers.write(job, self.database, tick)
        if progress is not None:
            progress(total, total)
        _fsync_directory(folder)
        return results

    def _manifest(
        self,
        connection: Connection,
        folder: Path,
        name: str,
        results: list[_PartResult],
        processes: int,
    ) -> dict[str, Any]:
        """Drop the files of parts without lines, name the rest in order, and write the
        manifest (fsynced). Counts are over every part."""
        kept = sorted((r for r in results if r.exchanges), key=lambda r: r.part)
        files: dict[str, list[dict[str, Any]]] = {key: [] for key in FORMATS}
        for position, result in enumerate(kept):
            for key, (temporary, digest, lines) in result.files.items():
                final = part_name(key, position, len(kept))
                if final != temporary:
                    (folder / temporary).rename(folder / final)
                files[key].append({"name": final, "sha256": digest, "lines": lines})
        listed = {entry["name"] for entries in files.values() for entry in entries}
        for leftover in folder.iterdir():  # the files of parts without lines
            if leftover.name not in listed:
                leftover.unlink()
        sources: dict[str, int] = {}
        for result in results:
            for source, count in result.sources.items():
                sources[source] = sources.get(source, 0) + count
        first, last = connection.execute(
            text(f"SELECT MIN(created_at), MAX(created_at) FROM {SCRATCH_TABLE} WHERE rn = 1")
        ).one()
        connection.rollback()
        content = hashlib.sha256()
        for entry in sorted((f for entries in files.values() for f in entries), key=_by_name):
            content.update(f"{entry['name']}:{entry['sha256']}\n".encode())
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "shard": name,
            "processes": processes,
            "created_at": utcnow().isoformat(),
            "exchanges": sum(r.exchanges for r in results),
            "skipped_too_long": sum(r.too_long for r in results),
            "sources": dict(sorted(sources.items())),
            "time_range": {
                "first": _as_datetime(first).isoformat() if first else None,
                "last": _as_datetime(last).isoformat() if last else None,
            },
            "files": files,
            "content_hash": content.hexdigest(),
            "formats": {
                "completions": 'dictionary form: {"user": ..., "agent": ...}',
                "instruct": 'Llama-2 [INST] text: {"text": ...}',
                "messages": 'conversational: {"messages": [{"role", "content"}, ...]}',
                "index": "exchange id, user pseudonym, question key, source (tab-separated)",
            },
        }
        with open(folder / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(folder)
        return manifest

    def _commit(
        self, connection: Connection, name: str, manifest: dict[str, Any], superseded: int
    ) -> None:
        """The commit point: record the shard and mark its exchanges in one transaction."""
        first, last = manifest["time_range"]["first"], manifest["time_range"]["last"]
        with connection.begin():
            shard_id = connection.execute(
                ExportShardRecord.__table__.insert().returning(ExportShardRecord.__table__.c.id),  # type: ignore[attr-defined]
                {
                    "name": name,
                    "created_at": utcnow(),
                    "exchange_count": manifest["exchanges"],
                    "superseded_count": superseded,
                    "first_exchange_at": datetime.fromisoformat(first) if first else None,
                    "last_exchange_at": datetime.fromisoformat(last) if last else None,
                    "schema_version": SCHEMA_VERSION,
                    "content_hash": manifest["content_hash"],
                },
            ).scalar_one()
            connection.execute(
                text(
                    "INSERT INTO export_marks (exchange_id, shard_id) "
                    f"SELECT exchange_id, :shard FROM {SCRATCH_TABLE}"
                ),
                {"shard": shard_id},
            )

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
                lapsed = _as_datetime(expires_at) < now or holder_is_gone_here(holder)
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


# --------------------------------------------------------------------------- writing parts


def _write_part(job: _Job, part: int, connection: Connection, tick: Tick) -> _PartResult:
    """Write part ``part`` of ``job.parts``: the conversations in the part's range of ids (see
    :class:`_Job`). Each file is written in batches, hashed on the way and fsynced."""
    result = _PartResult(part)
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


def _stream(connection: Connection, job: _Job, part: int) -> Iterator[tuple[Any, ...]]:
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
    job: _Job,
    pending: dict[str, list[str]],
    result: _PartResult,
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


class _Workers:
    """Worker processes for one export: started first (imports take them a second or so),
    then handed the job. Parts go out through a shared counter; workers report through a
    queue. A worker that fails stops the export (its error is raised by :meth:`write`);
    workers die with the exporting process."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: this process has threads
        self.next_part = context.Value("i", 0)
        self.seen = context.Value("q", 0)
        self.jobs: multiprocessing.Queue[_Job | None] = context.Queue()
        self.reports: multiprocessing.Queue[tuple[str, Any]] = context.Queue()
        self.peaks_mb: list[float] = []
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(self.jobs, self.next_part, self.seen, self.reports, os.getpid()),
                name=f"export-worker-{number}",
                daemon=True,
            )
            for number in range(1, count + 1)
        ]
        try:
            for process in self.processes:
                process.start()
        except BaseException:
            self.stop()
            raise

    @classmethod
    def start(cls, count: int) -> _Workers | None:
        """Start ``count`` workers; None (the export goes on alone) when the system refuses."""
        try:
            return cls(count)
        except OSError as error:
            logger.warning("export goes on in one process: cannot start workers (%s)", error)
            return None

    def write(self, job: _Job, database: Database, tick: Tick) -> list[_PartResult]:
        """Write ``job.parts`` parts with this process and the workers."""
        for _ in self.processes:
            self.jobs.put(job)
        results: list[_PartResult] = []
        reported = 0
        finished = 0

        def drain(timeout: float | None) -> None:
            """Take the workers' reports; raise at the first failure."""
            nonlocal finished
            while True:
                try:
                    kind, payload = (
                        self.reports.get(timeout=timeout) if timeout else self.reports.get_nowait()
                    )
                except queue.Empty:
                    return
                timeout = None
                if kind == "error":
                    raise ExportError(f"an export worker failed: {payload}")
                if kind == "part":
                    results.append(payload)
                else:  # "finished", with the worker's peak memory
                    finished += 1
                    self.peaks_mb.append(float(payload))

        def shared_tick(count: int) -> None:
            nonlocal reported
            with self.seen.get_lock():
                self.seen.value += count
                total_seen = self.seen.value
            tick(total_seen - reported)
            reported = total_seen
            drain(None)  # a worker's failure stops this process's writing too

        with database.engine.connect() as connection:
            while (part := _claim(self.next_part, job.parts)) is not None:
                results.append(_write_part(job, part, connection, shared_tick))
        while finished < len(self.processes):
            drain(0.5)
            shared_tick(0)
            if finished < len(self.processes) and any(
                p.exitcode not in (None, 0) for p in self.processes
            ):
                drain(0.5)  # its last report may still be on the way
                if finished < len(self.processes):
                    raise ExportError("an export worker process died")
        return results

    def stop(self) -> None:
        for _ in self.processes:
            with contextlib.suppress(ValueError, OSError):
                self.jobs.put(None)  # a worker still waiting for a job leaves
        for process in self.processes:
            if process.pid is None:  # never started
                continue
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
        self.jobs.close()
        self.reports.close()


def _claim(next_part: Any, parts: int) -> int | None:
    with next_part.get_lock():
        part = int(next_part.value)
        if part >= parts:
            return None
        next_part.value = part + 1
    return part


def _worker_main(
    jobs: Any, next_part: Any, seen: Any, reports: Any, parent: int
) -> None:  # pragma: no cover - runs in worker processes (covered by tests through the parent)
    def tick(count: int) -> None:
        if os.getppid() != parent:  # the exporting process died: its shard will be undone
            os._exit(1)
        with seen.get_lock():
            seen.value += count

    _die_with(parent)
    job = jobs.get()
    if job is None:  # the export turned out small, or failed before writing
        return
    database = Database(job.url)
    try:
        with database.engine.connect() as connection:
            while (part := _claim(next_part, job.parts)) is not None:
                reports.put(("part", _write_part(job, part, connection, tick)))
        reports.put(("finished", peak_memory_mb()))
    except OSError as error:
        reports.put(("error", _describe_os_error(error, job.folder.parent)))
    except SQLAlchemyError as error:
        reports.put(("error", _describe_database_error(error)))
    except BaseException as error:  # reported to the parent, which raises it
        reports.put(("error", f"{type(error).__name__}: {error}"))
    finally:
        database.dispose()


def peak_memory_mb() -> float:
    """This process's peak resident memory. VmHWM, where Linux has it: ``ru_maxrss`` survives
    exec, so a process started from a large one would report that one's peak as its own."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:  # pragma: no cover - runs in worker processes
    """Have Linux kill this worker the moment the exporting process dies, rather than let it
    write on for minutes into a folder that recovery removes (elsewhere, ``tick`` notices at
    its next batch)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _by_name(entry: dict[str, Any]) -> str:
    return str(entry["name"])


def _as_datetime(value: Any) -> datetime:
    """SQLite hands back timestamps as text; PostgreSQL as aware datetimes."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _reason(error: SQLAlchemyError) -> str:
    return str(getattr(error, "orig", error)).strip().splitlines()[0]


def _describe_database_error(error: SQLAlchemyError) -> str:
    return f"database error during export: {_reason(error)}"


def _describe_os_error(error: OSError, directory: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"export directory {directory} is full ({error.strerror})"
    if error.errno in {errno.EROFS, errno.EACCES, errno.EPERM}:
        return f"export directory {directory} is not writable ({error.strerror})"
    return f"cannot write to export directory {directory}: {error}"


def shard_folders(directory: Path) -> list[Path]:
    """The published shards in ``directory``, oldest first."""
    return sorted(p for p in directory.glob(f"{SHARD_PREFIX}*") if p.is_dir())
