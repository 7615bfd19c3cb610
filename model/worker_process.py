"""The model service in a process of its own (``MODEL_PROCESS=separate``, the default).

CPython runs one thread at a time per process. In the bot's process the model's worker thread
(its Python between torch calls, the streamers) took turns with the event loop (the platforms'
HTTP, the pipeline) and the store's thread: with 32 Slack mentions at once the bot ran on one
core, at 9 ms of CPU a reply, while the other core idled. Here the model decodes in a child
process on a core of its own, and the bot's process only sends each request's messages and
reads back its reply.

:class:`ModelProcess` (in the bot) speaks the model service's interface: ``generate``,
``stream``, ``swap``, ``stats``, ``version``, ``use_threads``, ``aclose``. The child
(``python -m model.worker_process FD``) runs a :class:`model.service.ModelService` and answers
over a socket pair, pickled messages in batches:

- to the child: ``("generate", id, messages, max_new_tokens, stream)``, ``("cancel", id)``,
  ``("swap", id, path)``, ``("threads", n)``, ``("close",)``;
- to the bot: ``("piece", id, text)``, ``("done", id, text, version, note)``,
  ``("error", id, kind, text)``, ``("swapped", id, version, source)``, each batch with the
  scheduler's stats.

A child that dies (killed, out of memory) fails the requests it held (each user gets the
apology) and is started again on the model it served; until it is ready, new requests are told
the bot is busy. A child whose bot went away (even killed) sees its socket close and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bot.contracts import GeneratedReply, ModelBusy, ReplyStream
from model.batch_requests import (
    BatchSettings,
    GenerationTimeout,
    SchedulerStats,
    caller_deadline,
)
from model.generation import GenerationSettings
from model.loading import ModelLoadError
from model.prompt import PromptFormatError

logger = logging.getLogger(__name__)

#: Seconds the child may take to load its model (building nothing: the folder exists).
START_TIMEOUT = 600.0
#: Seconds ``close`` waits for the child to finish the requests in flight and exit.
CLOSE_TIMEOUT = 60.0
#: How often an otherwise quiet child reports its scheduler's stats (when they changed).
STATS_EVERY = 1.0


class ModelProcessError(RuntimeError):
    """The model process failed a request (it stopped, or the model raised)."""


#: The errors that cross the process boundary as themselves; any other arrives as
#: :class:`ModelProcessError` with its message.
_ERRORS: dict[str, type[Exception]] = {
    "busy": ModelBusy,
    "timeout": GenerationTimeout,
    "prompt": PromptFormatError,
    "value": ValueError,
    "load": ModelLoadError,
}


def _error_kind(error: BaseException) -> str:
    # In the table's order: a PromptFormatError is a ValueError, and is told as itself.
    return next((kind for kind, type_ in _ERRORS.items() if isinstance(error, type_)), "error")


def _error_from(kind: str, text: str) -> Exception:
    return _ERRORS.get(kind, ModelProcessError)(text)


@dataclass(frozen=True, kw_only=True)
class ChildOptions:
    """What the child loads and how it serves (sent to it first)."""

    path: str
    device: str | None
    dtype: str | None
    generation: GenerationSettings | None
    batch: BatchSettings
    pack_linear: bool
    log_level: str


@dataclass(eq=False)
class _Pending:
    """A request the child holds, as the bot's side sees it."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any]
    pieces: asyncio.Queue[str | None] | None = None  # streamed: None ends it


@dataclass(eq=False)
class _Child:
    process: subprocess.Popen[bytes]
    connection: Connection
    started_at: float = field(default_factory=time.monotonic)


class ModelProcess:
    """The model service, run in a child process (see the module's docstring).

    Construction starts the child and waits until its model is loaded.

    Raises:
        ModelLoadError: the folder is missing or broken, or the child did not start.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        generation: GenerationSettings | None = None,
        batch: BatchSettings | None = None,
        pack_linear: bool = True,
        log_level: str = "WARNING",
    ) -> None:
        self.batch = batch or BatchSettings()
        self.options = ChildOptions(
            path=str(path),
            device=device,
            dtype=dtype,
            generation=generation,
            batch=self.batch,
            pack_linear=pack_linear,
            log_level=log_level,
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = threading.Lock()
        self._closing = False
        self._threads: int | None = None
        self._stats = SchedulerStats(active=0, waiting=0, finished=0, steps=0, largest_batch=0)
        self._child: _Child | None = None
        self.version = ""
        self.source = str(path)
        self._start_child()

    # --- the interface the bot uses -------------------------------------------------------

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> GeneratedReply:
        """The reply to ``messages``; raises what :meth:`ModelService.generate` raises, and
        :class:`ModelProcessError` when the child stopped meanwhile."""
        request_id, pending = self._submit(messages, max_new_tokens, streamed=False)
        try:
            async with caller_deadline(self.batch):
                reply: GeneratedReply = await asyncio.shield(pending.done)
            return reply
        finally:
            self._forget(request_id)

    def stream(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> ReplyStream:
        """The reply piece by piece, as :meth:`ModelService.stream` gives it."""
        return ReplyStream(lambda into: self._stream(into, messages, max_new_tokens))

    async def _stream(
        self, into: ReplyStream, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> AsyncGenerator[str, None]:
        request_id, pending = self._submit(messages, max_new_tokens, streamed=True)
        assert pending.pieces is not None
        try:
            async with caller_deadline(self.batch):
                while (piece := await pending.pieces.get()) is not None:
                    yield piece
                into.reply = await pending.done  # raises what the generation raised
        finally:
            self._forget(request_id)

    async def swap(self, path: str | Path) -> str:
        """Serve the model at ``path`` from now on (loaded by the child in the background,
        requests in flight finish on the old one); returns its version.

        Raises:
            ModelLoadError: the folder is missing or broken; the current model keeps serving.
            ModelProcessError: another swap is in progress, or the child stopped.
        """
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop=loop, done=loop.create_future())
        self._pending[request_id] = pending
        try:
            self._send(("swap", request_id, str(path)))
            version: str = await pending.done
            return version
        finally:
            self._pending.pop(request_id, None)

    def stats(self) -> SchedulerStats:
        """The child's scheduler as it last reported (at every reply, and each second)."""
        return self._stats

    @property
    def ready(self) -> bool:
        """Whether it takes requests (a child is serving, not closing)."""
        return self._child is not None and not self._closing and not self._stats.closing

    def use_threads(self, count: int | None) -> None:
        """Decode on ``count`` torch threads (``None``: the model's own choice again); kept
        for a child started again."""
        self._threads = count
        with contextlib.suppress(ModelBusy):
            self._send(("threads", count))

    async def aclose(self) -> None:
        """Finish the requests in flight and stop the child."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Take no more requests, let the child finish those in flight, stop it (blocking)."""
        self._closing = True
        child = self._child
        if child is None:
            return
        with contextlib.suppress(ModelBusy, OSError):
            self._send(("close",))
        try:
            child.process.wait(CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.error("the model process did not stop within %.0f s: killed", CLOSE_TIMEOUT)
            child.process.kill()
            child.process.wait()
        finally:
            with contextlib.suppress(OSError):
                child.connection.close()

    # --- requests -------------------------------------------------------------------------

    def _submit(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int, *, streamed: bool
    ) -> tuple[int, _Pending]:
        if self._closing:
            raise ModelBusy("the model is shutting down")
        loop = asyncio.get_running_loop()
        pending = _Pending(
            loop=loop, done=loop.create_future(), pieces=asyncio.Queue() if streamed else None
        )
        request_id = next(self._ids)
        self._pending[request_id] = pending
        plain = [dict(message) for message in messages]  # a Mapping may not pickle
        try:
            self._send(("generate", request_id, plain, max_new_tokens, streamed))
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return request_id, pending

    def _forget(self, request_id: int) -> None:
        """The caller is done with ``request_id``: if the child still works on it, its row
        leaves the batch."""
        pending = self._pending.pop(request_id, None)
        if pending is not None and not pending.done.done():
            with contextlib.suppress(ModelBusy, OSError):
                self._send(("cancel", request_id))

    def _send(self, message: tuple[Any, ...]) -> None:
        child = self._child
        if child is None:
            raise ModelBusy("the model is restarting")
        try:
            with self._send_lock:
                child.connection.send(message)
        except OSError:
            raise ModelBusy("the model is restarting") from None

    # --- the child ------------------------------------------------------------------------

    def _start_child(self) -> None:
        """Start a child on ``self.source`` and wait until it serves (blocking)."""
        ours, theirs = socket.socketpair()
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        environment["PYTHONPATH"] = os.pathsep.join(
            part for part in (package_root, environment.get("PYTHONPATH", "")) if part
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "model.worker_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=environment,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        connection = Connection(ours.detach())
        options = dataclasses.replace(self.options, path=self.source)
        try:
            connection.send(("start", options, self._threads))
            if not connection.poll(START_TIMEOUT):
                raise ModelLoadError(f"the model process did not start within {START_TIMEOUT:g} s")
            reply = connection.recv()
        except (EOFError, OSError):
            process.wait()
            connection.close()
            raise ModelLoadError(
                f"the model process exited with status {process.returncode} while loading "
                f"{self.source}"
            ) from None
        except ModelLoadError:
            process.kill()
            process.wait()
            connection.close()
            raise
        if reply[0] != "ready":
            process.wait()
            connection.close()
            raise ModelLoadError(reply[1])
        _, self.version, self.source, self._stats = reply
        child = _Child(process, connection)
        self._child = child
        threading.Thread(
            target=self._read, args=(child,), name="model-process-reader", daemon=True
        ).start()

    def _read(self, child: _Child) -> None:
        """The reader thread: hands each batch from the child to the event loops waiting."""
        while True:
            try:
                batch, stats = child.connection.recv()
            except (EOFError, OSError):
                break
            self._stats = stats
            for event in batch:
                if event[0] == "swapped":  # new requests go to it from now on
                    self.version, self.source = event[2], event[3]
            self._hand_to_loops(batch)
        self._child_stopped(child)

    def _hand_to_loops(self, events: list[tuple[Any, ...]]) -> None:
        """From the reader thread: each request's events to its event loop, one wake-up per
        loop (an event of a request nobody waits for any more is dropped)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for event in events:
            pending = self._pending.get(event[1])
            if pending is not None:
                by_loop.setdefault(pending.loop, []).append(event)
        for loop, taken in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(self._deliver, taken)

    def _deliver(self, events: list[tuple[Any, ...]]) -> None:
        """On the requests' event loop: give each its piece, reply or error."""
        for event in events:
            pending = self._pending.get(event[1])
            if pending is None:
                continue
            kind = event[0]
            if kind == "piece":
                if pending.pieces is not None:
                    pending.pieces.put_nowait(event[2])
                continue
            if pending.done.done():
                continue
            if kind == "done":
                _, _, text, version, note = event
                pending.done.set_result(GeneratedReply(text=text, model_version=version, note=note))
            elif kind == "swapped":
                pending.done.set_result(event[2])
            else:
                pending.done.set_exception(_error_from(event[2], event[3]))
            if pending.pieces is not None:
                pending.pieces.put_nowait(None)

    def _child_stopped(self, child: _Child) -> None:
        """The child's socket closed: fail what it held; start a new one unless closing."""
        status = child.process.wait()
        with contextlib.suppress(OSError):
            child.connection.close()
        if self._child is child:
            self._child = None
        self._fail_pending(f"the model process stopped (exit status {status})")
        if self._closing:
            return
        logger.error(
            "the model process stopped (exit status %s) after %.0f s; starting it again",
            status,
            time.monotonic() - child.started_at,
        )
        try:
            self._start_child()
        except ModelLoadError as error:
            logger.error("the model process could not be started again: %s", error)
        else:
            logger.warning("the model process serves %s again", self.version)

    def _fail_pending(self, reason: str) -> None:
        self._hand_to_loops(
            [("error", request_id, "error", reason) for request_id in self._pending]
        )


# --- the child process ----------------------------------------------------------------------


class _Server:
    """The child's side: a model service answering the bot over ``connection``."""

    def __init__(self, connection: Connection, service: Any) -> None:
        self.connection = connection
        self.service = service
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.outgoing: list[tuple[Any, ...]] = []
        self.stopped = asyncio.Event()
        self._flush_soon = False
        self._last_stats: SchedulerStats | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.connection.fileno(), self._readable)
        reporter = asyncio.create_task(self._report_stats())
        try:
            await self.stopped.wait()
        finally:
            loop.remove_reader(self.connection.fileno())
            reporter.cancel()
            await self.service.aclose()  # the requests in flight finish
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self._flush()

    def _readable(self) -> None:
        try:
            while self.connection.poll():
                self._take(self.connection.recv())
        except (EOFError, OSError):  # the bot went away
            self.stopped.set()

    def _take(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "generate":
            _, request_id, messages, max_new_tokens, streamed = message
            self._track(request_id, self._answer(request_id, messages, max_new_tokens, streamed))
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "swap":
            self._track(message[1], self._swap(message[1], message[2]))
        elif kind == "threads":
            self.service.use_threads(message[1])
        elif kind == "close":
            self.stopped.set()

    def _track(self, request_id: int, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks[request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(request_id, None))

    async def _answer(
        self, request_id: int, messages: list[dict[str, str]], max_new_tokens: int, streamed: bool
    ) -> None:
        try:
            if streamed:
                stream = self.service.stream(messages=messages, max_new_tokens=max_new_tokens)
                try:
                    async for piece in stream:
                        self._emit(("piece", request_id, piece))
                finally:
                    await stream.aclose()
                reply = stream.reply
            else:
                reply = await self.service.generate(
                    messages=messages, max_new_tokens=max_new_tokens
                )
        except asyncio.CancelledError:
            return  # the caller went away: nobody waits for an answer
        except Exception as error:
            self._emit(("error", request_id, _error_kind(error), str(error)))
            return
        self._emit(("done", request_id, reply.text, reply.model_version, reply.note))

    async def _swap(self, request_id: int, path: str) -> None:
        try:
            version = await self.service.swap(path)
        except Exception as error:
            self._emit(("error", request_id, _error_kind(error), str(error)))
            return
        self._emit(("swapped", request_id, version, self.service.local.source))

    def _emit(self, event: tuple[Any, ...]) -> None:
        """Send ``event`` with whatever else this turn of the loop produces (one write)."""
        self.outgoing.append(event)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        batch, self.outgoing = self.outgoing, []
        stats = self.service.stats()
        self._last_stats = stats
        try:
            self.connection.send((batch, stats))
        except OSError:  # the bot went away
            self.stopped.set()

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY)
            if self.service.stats() != self._last_stats:
                self._flush()


def child_main(fd: int) -> int:
    """The child process: load the model, say so, answer until the bot closes or goes."""
    # The child lives as long as its socket: the bot stops it (or dies, closing it). A Ctrl-C
    # or a SIGTERM sent to the whole process group is the bot's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(fd)
    try:
        _, options, threads = connection.recv()
    except (EOFError, OSError):
        return 1
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s [model process]: %(message)s",
    )
    from model.service import ModelService

    try:
        service = ModelService.load(
            options.path,
            device=options.device,
            dtype=options.dtype,
            generation=options.generation,
            batch=options.batch,
            pack_linear=options.pack_linear,
        )
    except Exception as error:
        known = isinstance(error, ModelLoadError)
        text = str(error) if known else f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            connection.send(("failed", text))
        return 2
    if threads is not None:
        service.use_threads(threads)
    connection.send(("ready", service.version, service.local.source, service.stats()))
    asyncio.run(_Server(connection, service).serve())
    return 0


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
