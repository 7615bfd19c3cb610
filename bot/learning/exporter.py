"""Export of good exchanges as fine-tuning data: one new shard per run, exactly once.

Which exchanges: answers from human agents and admin corrections rank first, 👍-rated bot
replies and those an admin approved in the review queue next; 👎-rated and unrated bot replies
are left out (``include_unrated`` lets unrated ones in), so are the ones an admin rejected or
corrected (:mod:`bot.storage.review`), and so is anything from a channel with training turned
off, or from a thread of one (checked at every export, also for exchanges recorded before it
was turned off; turning it off withdraws those for good, see
:func:`bot.storage.set_training_opt_out`). Among near-duplicate questions (same
:func:`bot.storage.text_key`) the best-ranked, then newest, answer is written; the others are
marked as consumed by the same shard (:mod:`bot.learning.selection`).

A shard is a folder with the three formats and an index, each in one or more parts named the
way Hugging Face names data files (``messages-00000-of-00002.jsonl``; a glob such as
``messages-*.jsonl`` loads them all, see :func:`bot.learning.shards.data_files`), and a
manifest (:mod:`bot.learning.shards`; the lines are written by :mod:`bot.learning.writing`)::

    shard-<UTC time>-<random>/
        completions-*.jsonl   {"user": "...", "agent": "..."}
        instruct-*.jsonl      {"text": "<s>[INST] ... [/INST] ... </s>"}  (context included)
        messages-*.jsonl      {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
        index-*.tsv           exchange id, user pseudonym, question key, source — line by line,
                              so that a later forget-me can drop a user's lines from old shards
        manifest.json         counts, time range, schema version, every file's hash

Large exports are written by several processes at once (one per CPU core, at most four), each
taking whole conversations, so that every line keeps its context; small ones by this process
alone, in a single part (:mod:`bot.learning.workers`).

Crash safety: the shard is written into a hidden temporary folder and fsynced; then one
database transaction records the shard and marks its exchanges (the commit point); then the
folder is renamed into place. :meth:`Exporter.recover`, run first by every export, finishes
that rename for a committed shard or deletes an uncommitted folder, so a process killed at any
step leaves either no shard and no change in the database, or both. A database lease makes
several instances on one database take turns (:mod:`bot.learning.lease`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from bot.conversation import utcnow
from bot.learning.errors import ExportError, describe_database_error, describe_os_error, reason
from bot.learning.lease import Lease
from bot.learning.redaction import DEFAULT_PHONE_REGIONS
from bot.learning.selection import (
    Picked,
    drop_scratch,
    mark_exported,
    newer_than_exported,
    pick,
    time_range,
)
from bot.learning.shards import (
    SCHEMA_VERSION,
    PartResult,
    fsync_directory,
    new_shard_name,
    publish,
    recover_folders,
    temporary_folder,
    write_manifest,
)
from bot.learning.workers import MAX_WORKERS, Workers
from bot.learning.writing import Formatter, Job, Pseudonymize, write_part
from bot.storage import Database, ExportShardRecord
from bot.storage.claims import instance_id

logger = logging.getLogger(__name__)


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
        self.lease = Lease(database, holder=self.holder, seconds=options.lease_seconds)

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
            if not self.lease.acquire():
                logger.warning("export skipped: another instance holds the export lease")
                return ExportResult(None, None, skipped_reason="another instance is exporting")
        except SQLAlchemyError as error:
            raise ExportError(f"database error before export: {reason(error)}") from error
        step("leased")
        try:
            self.recover()
            step("recovered")
            return self._export(directory, progress, step)
        finally:
            with contextlib.suppress(SQLAlchemyError):
                drop_scratch(self.database)
            with contextlib.suppress(SQLAlchemyError):
                self.lease.release()

    def recover(self) -> None:
        """Finish or undo what a killed export left (call with the lease held)."""
        directory = self.options.directory
        if not directory.is_dir():
            return
        with self.database.engine.connect() as connection:
            committed = set(connection.execute(text("SELECT name FROM export_shards")).scalars())
        recover_folders(directory, committed)

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
        name = new_shard_name()
        folder = temporary_folder(directory, name)
        workers: Workers | None = None
        try:
            if self._processes_wanted() > 1 and self._probably_large():
                # They take a second or so to start: let them do it while the pick runs.
                workers = Workers.start(self._processes_wanted() - 1)
            with self.database.engine.connect() as connection:
                picked = pick(
                    connection,
                    include_unrated=self.options.include_unrated,
                    threads=self._processes_wanted(),
                )
                step("selected")
                if picked.winners + picked.superseded == 0:
                    return ExportResult(None, None)
                folder.mkdir()
                large = picked.winners >= self.options.parallel_from
                if not large and workers is not None:
                    workers.stop()
                    workers = None
                elif large and workers is None and self._processes_wanted() > 1:
                    workers = Workers.start(self._processes_wanted() - 1)
                results = self._write(folder, picked, progress, workers)
                processes = 1 if workers is None else len(workers.processes) + 1
                manifest = write_manifest(folder, name, results, processes, time_range(connection))
                step("written")
                self._commit(connection, name, manifest, picked.superseded)
            step("committed")
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExportError(describe_os_error(error, directory)) from error
        except SQLAlchemyError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExportError(describe_database_error(error)) from error
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            if workers is not None:
                workers.stop()
        # Committed: publishing can only be finished from here, by us or by recovery.
        final = publish(folder)
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

    def _processes_wanted(self) -> int:
        return self.options.workers or min(os.cpu_count() or 1, MAX_WORKERS)

    def _probably_large(self) -> bool:
        """Whether this run will likely write at least ``parallel_from`` exchanges (counts the
        exchanges newer than the newest exported one)."""
        return newer_than_exported(self.database) >= self.options.parallel_from

    def _write(
        self,
        folder: Path,
        picked: Picked,
        progress: ProgressCallback | None,
        workers: Workers | None,
    ) -> list[PartResult]:
        """Write every part of the shard into ``folder``, alone or with ``workers``."""
        total = picked.winners
        processes = 1 if workers is None else len(workers.processes) + 1
        # Two parts per process, handed out in turn, so that a process that started late or
        # met long conversations takes fewer of them (more parts cost PostgreSQL more joins).
        parts = 1 if processes == 1 else processes * 2
        span = picked.last_conversation - picked.first_conversation + 1
        job = Job(
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
                self.lease.renew()
                renewed_at = time.monotonic()

        if workers is None:
            with self.database.engine.connect() as connection:
                results = [write_part(job, 0, connection, tick)]
        else:
            results = workers.write(job, self.database, tick)
        if progress is not None:
            progress(total, total)
        fsync_directory(folder)
        return results

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
            mark_exported(connection, shard_id)
