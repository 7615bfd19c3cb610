"""The worker processes of a large export.

Large exports are written by several processes at once (one per CPU core, at most four, see
:data:`MAX_WORKERS`), each taking whole conversations (a part of the shard at a time), so that
every line keeps its context; small ones by the exporting process alone, in a single part.
Workers are spawned, not forked (the exporting process has threads), so each imports this
module afresh: it, and the package's ``__init__``, import only what writing a part needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from bot.learning.errors import ExportError, describe_database_error, describe_os_error
from bot.learning.shards import PartResult
from bot.learning.writing import Job, Tick, write_part
from bot.storage import Database

logger = logging.getLogger(__name__)

MAX_WORKERS = 4


class Workers:
    """Worker processes for one export: started first (imports take them a second or so),
    then handed the job. Parts go out through a shared counter; workers report through a
    queue. A worker that fails stops the export (its error is raised by :meth:`write`);
    workers die with the exporting process."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: this process has threads
        self.next_part = context.Value("i", 0)
        self.seen = context.Value("q", 0)
        self.jobs: multiprocessing.Queue[Job | None] = context.Queue()
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
    def start(cls, count: int) -> Workers | None:
        """Start ``count`` workers; None (the export goes on alone) when the system refuses."""
        try:
            return cls(count)
        except OSError as error:
            logger.warning("export goes on in one process: cannot start workers (%s)", error)
            return None

    def write(self, job: Job, database: Database, tick: Tick) -> list[PartResult]:
        """Write ``job.parts`` parts with this process and the workers."""
        for _ in self.processes:
            self.jobs.put(job)
        results: list[PartResult] = []
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
                results.append(write_part(job, part, connection, shared_tick))
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
                reports.put(("part", write_part(job, part, connection, tick)))
        reports.put(("finished", peak_memory_mb()))
    except OSError as error:
        reports.put(("error", describe_os_error(error, job.folder.parent)))
    except SQLAlchemyError as error:
        reports.put(("error", describe_database_error(error)))
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
