"""The model service: the bot's reply generator, batching concurrent requests on one model.

Usage::

    service = ModelService.load(path, batch=BatchSettings(max_batch=32))
    reply = await service.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=64)
    reply.text, reply.model_version, reply.note
    stream = service.stream(messages=..., max_new_tokens=64)
    async for piece in stream: ...           # stream.reply once it ends
    await service.swap(new_folder)           # hot swap; raises ModelLoadError, keeps serving

Every request's history is fitted to the context window first (the newest whole turns), off the
event loop, then decoded by the :class:`model.batching.BatchScheduler` together with whatever
else is in flight. Each reply is cleaned of control strings and cut at stop strings, streamed
or not, and carries the version of the model that generated it: a hot swap loads the new folder
in the background, sends new requests to it and lets the old model finish what it has.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from transformers import AsyncTextIteratorStreamer

from bot.contracts import GeneratedReply, ModelBusy, ReplyStream
from bot.heap import settle_heap
from model.batch_requests import (
    BatchSettings,
    Decoding,
    GenerationRequest,
    GenerationTimeout,
    SchedulerClosed,
    SchedulerStats,
    caller_deadline,
    settle,
)
from model.batching import BatchScheduler
from model.context_fit import FittedPrompt
from model.fast_linear import pack_linear_layers, speeds_up
from model.generation import GenerationSettings, StopCutter
from model.loading import ModelLoadError
from model.local_model import LocalModel

__all__ = [
    "BatchSettings",
    "GenerationSettings",
    "GenerationTimeout",
    "LocalModel",
    "ModelBusy",
    "ModelLoadError",
    "ModelService",
    "SchedulerClosed",
    "StopCutter",
    "TokenFeed",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Conversations up to this many characters are fitted on the event loop itself (tens of
#: microseconds): requests arriving together then reach the scheduler in the same moment and
#: share one prefill, where a round trip through a thread each would stagger them. Longer ones
#: are fitted on a thread.
INLINE_FIT_CHARS = 4_000


class _TokenSink(Protocol):
    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class TokenFeed:
    """Hands one request's tokens to its streamer in runs (on the worker thread): the first
    token at once, then what came since at most every ``interval`` seconds, the rest at the end.

    Each hand-over decodes the reply so far and wakes the event loop; token by token, with 32
    replies at once, that was a fifth of the worker's interpreter time and as many event-loop
    wake-ups as tokens, for a reader that shows progress at most once a second.
    """

    def __init__(
        self,
        streamer: _TokenSink,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._streamer = streamer
        self._interval = interval
        self._clock = clock
        self._waiting: list[int] = []
        self._next_at = -float("inf")

    def token(self, token: int) -> None:
        self._waiting.append(token)
        now = self._clock()
        if now >= self._next_at:
            self._hand_over()
            self._next_at = now + self._interval

    def end(self) -> None:
        self._hand_over()
        self._streamer.end()

    def _hand_over(self) -> None:
        if self._waiting:
            self._streamer.put(torch.tensor(self._waiting))
            self._waiting = []


@dataclass(eq=False)
class _Engine:
    """One loaded model and the scheduler decoding on it."""

    local: LocalModel
    scheduler: BatchScheduler

    @property
    def version(self) -> str:
        return self.local.version


class ModelService:
    """Answers chat messages with a local model, many requests at a time (see module doc)."""

    def __init__(
        self,
        local: LocalModel,
        *,
        batch: BatchSettings | None = None,
        dtype: str | None = None,
        pack_linear: bool = True,
    ) -> None:
        """Serve an already loaded :class:`LocalModel` (use :meth:`load` normally).

        ``local`` is served as it is; ``pack_linear`` is for the models swapped in later
        (see :meth:`load`).
        """
        self.batch = batch or BatchSettings()
        self._load_options: dict[str, Any] = {
            "device": local.device,
            "dtype": dtype,
            "generation": local.generation,
            "pack_linear": pack_linear,
        }
        self._serial = 0
        self._threads: int | None = None
        self._engine = self._start(local)
        self._retiring: set[asyncio.Future[None]] = set()
        self._swapping = False
        settle_heap()

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        generation: GenerationSettings | None = None,
        batch: BatchSettings | None = None,
        pack_linear: bool = True,
    ) -> ModelService:
        """Load a model folder (or hub id) and serve it; errors as :meth:`LocalModel.load`.

        ``pack_linear``: on the CPU in float32, hold the linear layers' weights packed for
        oneDNN (:mod:`model.fast_linear`: decoding steps of a 200M model 2-3x faster, of the
        default model 1.9x); the models swapped in later too.
        """
        local = load_for_serving(
            path,
            device=device,
            dtype=dtype,
            generation=generation,
            pack_linear=pack_linear,
        )
        return cls(local, batch=batch, dtype=dtype, pack_linear=pack_linear)

    def _start(self, local: LocalModel) -> _Engine:
        self._serial += 1
        tokenizer = local.tokenizer
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        generation = local.generation
        decoding = Decoding(
            pad_id=pad_id,
            stop_ids=frozenset() if generation.ignore_eos else frozenset(local.stop_ids),
            stop_strings=() if generation.ignore_eos else tuple(local.stop_strings),
            temperature=generation.temperature,
            top_p=generation.top_p,
            repetition_penalty=generation.repetition_penalty,
        )
        scheduler = BatchScheduler(
            local.model,
            device=local.device,
            decoding=decoding,
            settings=self.batch,
            name=str(self._serial),
        )
        scheduler.use_stop_strings(tokenizer)
        scheduler.use_threads(getattr(self, "_threads", None))
        return _Engine(local, scheduler)

    @property
    def version(self) -> str:
        """The version new requests are answered by."""
        return self._engine.version

    @property
    def local(self) -> LocalModel:
        """The model new requests go to."""
        return self._engine.local

    def stats(self) -> SchedulerStats:
        return self._engine.scheduler.stats()

    @property
    def ready(self) -> bool:
        """Whether it takes requests (loaded, not closing)."""
        return not self.stats().closing

    def use_threads(self, threads: int | None) -> None:
        """Decode on ``threads`` torch threads (``None``: as at start), this model and the
        next ones swapped in; a retrain lends the others to its trainer."""
        self._threads = threads
        self._engine.scheduler.use_threads(threads)

    # --- answering --------------------------------------------------------------------------

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> GeneratedReply:
        """The reply to ``messages`` (ending with a user message).

        Raises:
            ModelBusy: the queue is full (the user should try again shortly).
            GenerationTimeout: the reply took longer than ``batch.timeout``.
            PromptFormatError: the messages are not a dialogue ending with a user turn.
            ValueError: ``max_new_tokens`` leaves no room for a prompt.
            Exception: what the model raised for this request.
        """
        engine = self._engine
        prompt = await self._prompt(engine, messages, max_new_tokens)
        request = engine.scheduler.submit(
            prompt_ids=prompt.token_ids, max_new_tokens=max_new_tokens
        )
        try:
            ids = await self._result(request)
        finally:
            request.cancel()  # the caller went away: its row leaves the batch
        text = engine.local.reply_text(ids)
        return GeneratedReply(text=text, model_version=engine.version, note=prompt.note)

    def stream(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> ReplyStream:
        """The reply piece by piece as it is generated; its ``reply`` is set once it ends.

        The pieces add up to :meth:`generate`'s text (less the whitespace that strips) and
        never hold a control string. Raises what :meth:`generate` raises, while iterating.
        """
        return ReplyStream(lambda stream: self._stream(stream, messages, max_new_tokens))

    async def _stream(
        self, into: ReplyStream, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> AsyncGenerator[str, None]:
        engine = self._engine
        local = engine.local
        prompt = await self._prompt(engine, messages, max_new_tokens)
        streamer = AsyncTextIteratorStreamer(local.tokenizer, skip_special_tokens=True)
        feed = TokenFeed(streamer, interval=self.batch.stream_interval)
        request = engine.scheduler.submit(
            prompt_ids=prompt.token_ids,
            max_new_tokens=max_new_tokens,
            on_token=feed.token,
            on_end=feed.end,
        )
        shown = local.reply_filter()  # as reply_text cuts the whole reply
        text = ""
        try:
            async with caller_deadline(self.batch):
                async for raw in streamer:
                    if piece := shown.feed(raw):
                        text += piece
                        yield piece
                    if shown.stopped:
                        break
                if not shown.stopped:
                    await request.done  # raises what the generation raised
                    if tail := shown.finish():
                        text += tail
                        yield tail
        finally:
            request.cancel()
        into.reply = GeneratedReply(
            text=text.strip(), model_version=engine.version, note=prompt.note
        )

    async def _prompt(
        self, engine: _Engine, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> FittedPrompt:
        """The prompt, fitted to the context window; a long one off the event loop (a long
        history takes a while to tokenize)."""
        local = engine.local
        if sum(len(message.get("content") or "") for message in messages) <= INLINE_FIT_CHARS:
            return local.fit_prompt(messages, max_new_tokens=max_new_tokens)
        return await asyncio.to_thread(local.fit_prompt, messages, max_new_tokens=max_new_tokens)

    async def _result(self, request: GenerationRequest) -> list[int]:
        async with caller_deadline(self.batch):
            return await asyncio.shield(request.done)

    # --- hot swap and shutdown --------------------------------------------------------------

    async def swap(self, path: str | Path) -> str:
        """Serve the model at ``path`` from now on; returns its version.

        The folder loads in the background while the current model keeps answering; once it
        is ready, new requests go to it and the requests in flight finish on the old model,
        which is then let go.

        Raises:
            ModelLoadError: the folder is missing or broken; the current model keeps serving.
            RuntimeError: another swap is in progress.
        """
        if self._swapping:
            raise RuntimeError("a model swap is in progress already")
        self._swapping = True
        try:
            local = await in_passing_thread(partial(load_for_serving, path, **self._load_options))
            old, self._engine = self._engine, self._start(local)
        finally:
            self._swapping = False
        logger.info("model %s now serves new requests (was %s)", local.version, old.version)
        retiring = asyncio.ensure_future(self._retire(old))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        return local.version

    @staticmethod
    async def _retire(engine: _Engine) -> None:
        """Let the old model finish its requests, then go: its memory is freed, and the new
        model's objects are settled out of the collector's reach in its place."""
        await asyncio.to_thread(engine.scheduler.close)
        del engine
        gc.unfreeze()  # the old model's objects too, so that their cycles can be collected
        settle_heap()

    async def aclose(self) -> None:
        """Finish the requests in flight and stop (awaitable form of :meth:`close`)."""
        await asyncio.to_thread(self.close)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def close(self) -> None:
        """Take no more requests, finish those in flight, stop the worker (blocking)."""
        self._engine.scheduler.close()


def load_for_serving(
    path: str | Path,
    *,
    device: str | None,
    dtype: str | None,
    generation: GenerationSettings | None,
    pack_linear: bool,
) -> LocalModel:
    """:meth:`LocalModel.load`, then, where it helps (the CPU, float32) and ``pack_linear``
    asks for it, the linear layers' weights packed for oneDNN (:mod:`model.fast_linear`)."""
    local = LocalModel.load(path, device=device, dtype=dtype, generation=generation)
    if pack_linear and speeds_up(local.model, local.device):
        pack_linear_layers(local.model)
    return local


def on_passing_thread(work: Callable[[], T]) -> T:
    """Blocking code's :func:`in_passing_thread`: ``work()`` on a thread that ends with it."""
    with ThreadPoolExecutor(max_workers=1) as once:  # its one thread ends on leaving
        return once.submit(work).result()


async def in_passing_thread(work: Callable[[], T]) -> T:
    """Run blocking torch work on a thread of its own that ends with it.

    A live thread that has run torch work keeps its OpenMP team, and the batch worker then
    runs about 2x slower (measured on the default model: a 32-request batch took 0.26-0.36 s
    instead of 0.10-0.16 s after the main thread multiplied large matrices); a finished thread
    leaves nothing behind. So loading never borrows a long-lived pool thread.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, done, None, error)
        else:
            loop.call_soon_threadsafe(settle, done, result, None)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done
