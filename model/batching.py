"""Iteration-level batching: many requests decoded together over ``model.forward``.

One worker thread owns the model. Requests wait in a bounded queue; between two decoding steps
the worker admits as many as the batch has room for, prefills them packed (their prompts end to
end in one sequence, each attending only to itself, so no padding is computed) and joins their
KV caches to the running batch's :class:`~transformers.DynamicCache` (left-padded to a common
length). Each step then feeds every row its last token with an
attention mask over its own positions and explicit position ids, so a row's logits are those
it would have alone: greedy decoding in float32 gives each request the tokens an unbatched
``model.generate`` gives it. A request ends the step it ends (a stop token, its token limit, a
stop string, its deadline, or its caller going away) and frees its place; the rows of ended
requests leave the cache together once they are a quarter of the batch, and the padding
columns no row needs any more are cut off then.

Why our own scheduler rather than transformers' continuous-batching manager
(``model.generate_batch`` / ``init_continuous_batching``): on this machine's CPU the manager is
slower on both benchmark models (0.8-1.5x plain ``generate`` on the default model against
6.9-7.5x here; 4.1-9.7x against 8.9-10.5x on a 200M model), measured side by side by
``benchmarks/serving.py`` (rows (b) and (e)).

A forward pass that raises takes down no one by accident: the rows of the failed step are each
run again on their own, and only those that fail alone get the error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from bot.contracts import ModelBusy
from model.batch_requests import (
    BatchSettings,
    Decoding,
    GenerationRequest,
    GenerationTimeout,
    SchedulerClosed,
    SchedulerStats,
)
from model.fast_linear import model_parameters
from model.kv_cache import cache_layers, left_pad, roomy_cache, unpack_rows

logger = logging.getLogger(__name__)

#: The most prompt tokens one packed prefill holds (a longer prompt goes alone). Its attention
#: mask is this squared, and its attention computes every pair of the pack's positions, so
#: packs stay a size at which the matmuls are efficient and the waste is small.
PREFILL_TOKENS = 1024


@dataclass
class _Batch:
    """The running batch: its rows, their joint KV cache and attention mask (``[rows, T]``,
    0 for left padding), and each row's last token (fed to the next step)."""

    rows: list[GenerationRequest]
    cache: DynamicCache
    mask: torch.Tensor
    last: torch.Tensor


#: A model with fewer parameters decodes on one torch thread on the CPU (see decoding_threads).
SMALL_MODEL_PARAMETERS = 50_000_000


def decoding_threads(model: Any, *, device: str, requested: int) -> int | None:
    """The torch threads a scheduler decodes on: ``requested`` (MODEL_THREADS) when set; else
    one for a model under :data:`SMALL_MODEL_PARAMETERS` on the CPU, else ``None`` (torch's
    own count, every core).

    A small model's decoding step is Python overhead around tiny matrices: a second torch
    thread has little to share and spins against the event loop's thread. Measured side by
    side through a real ``chatbot run`` on 2 cores (benchmarks/serving_end_to_end.py, the
    default model, Slack and Discord, two rounds): 32 mentions at once 25-42 replies/s on two
    threads against 36-38 on one, 8 one by one 5.9-7.7 against 7.4-8.3, and the bot's CPU per
    reply halved (38-68 -> 26-28 ms at once, 223-270 -> 114-129 one by one). The service
    alone (benchmarks/serving.py) is the same for 32 at once (0.36 and 0.35 s) but slower on
    one thread for 128 at once (0.83 -> 1.05 s, bigger matrices than the bot's batches of
    at most BATCH_MAX_SIZE=32). The 200M model's matrices keep both cores busy (a decoding
    step is compute bound), so it keeps torch's count.
    """
    if requested:
        return requested
    if not str(device).startswith("cpu"):
        return None
    return 1 if model_parameters(model) < SMALL_MODEL_PARAMETERS else None


class BatchScheduler:
    """Decodes the requests it is given in batches, on a worker thread of its own.

    ``model`` is a loaded causal LM (``eval()``, on ``device``). Submit from the event loop
    (:meth:`submit`); every request's ``done`` future is settled on the loop it was submitted
    from, so one scheduler serves any number of loops.
    """

    def __init__(
        self, model: Any, *, device: str, decoding: Decoding, settings: BatchSettings, name: str
    ) -> None:
        self.model = model
        self.device = device
        self.decoding = decoding
        self.settings = settings
        self._processors = self._logits_processors(decoding)
        self._stop_strings: StopStringCriteria | None = None
        self._pending: deque[GenerationRequest] = deque()
        self._active = 0
        self._finished = 0
        self._tokens = 0
        self._steps = 0
        self._largest = 0
        self._closing = False
        #: How many waiting requests wake the worker (``None``: it is decoding and looks
        #: between steps); read and set under the condition.
        self._wake_at: int | None = 1
        self._threads: int | None = None  # torch threads the worker should use (None: as is)
        self._default_threads = decoding_threads(model, device=device, requested=settings.threads)
        self._running_threads = 0
        # Read here, not on the worker: torch starts each new thread on the count last set
        # anywhere in the process (one, after a small model's worker), where a thread that
        # ran torch work before keeps its own (the process's).
        self._every_core = torch.get_num_threads()
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"model-batch-{name}", daemon=True)
        self._thread.start()

    def use_stop_strings(self, tokenizer: Any) -> None:
        """End rows at :attr:`Decoding.stop_strings` (needs the tokenizer's vocabulary)."""
        if self.decoding.stop_strings:
            self._stop_strings = StopStringCriteria(tokenizer, list(self.decoding.stop_strings))

    @staticmethod
    def _logits_processors(decoding: Decoding) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if decoding.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
        if decoding.temperature > 0:
            processors.append(TemperatureLogitsWarper(decoding.temperature))
            if decoding.top_p < 1.0:
                processors.append(TopPLogitsWarper(decoding.top_p))
        return processors

    # --- the event loop's side --------------------------------------------------------------

    def submit(
        self,
        *,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> GenerationRequest:
        """Queue a request (from a running event loop); await its ``done`` for the ids.

        Raises:
            ModelBusy: ``queue_size`` requests are waiting already.
            SchedulerClosed: the scheduler is closing.
            ValueError: an empty prompt or a token limit below 1.
        """
        if not prompt_ids:
            raise ValueError("the prompt holds no tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        loop = asyncio.get_running_loop()
        request = GenerationRequest(
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            deadline=time.monotonic() + self.settings.timeout,
            loop=loop,
            done=loop.create_future(),
            on_token=on_token,
            on_end=on_end,
        )
        with self._condition:
            if self._closing:
                raise SchedulerClosed("the model is shutting down")
            if len(self._pending) >= self.settings.queue_size:
                raise ModelBusy(f"{len(self._pending)} requests are waiting for the model already")
            self._pending.append(request)
            if self._wake_at is not None and len(self._pending) >= self._wake_at:
                self._condition.notify()
        return request

    def use_threads(self, threads: int | None) -> None:
        """Have the worker decode on ``threads`` torch threads from its next step (``None``:
        its own count, :func:`decoding_threads`). torch's thread count is per thread, so the
        worker sets it itself."""
        with self._condition:
            self._threads = threads

    def stats(self) -> SchedulerStats:
        with self._condition:
            return SchedulerStats(
                active=self._active,
                waiting=len(self._pending),
                finished=self._finished,
                steps=self._steps,
                largest_batch=self._largest,
                threads=self._running_threads,
                generated_tokens=self._tokens,
                closing=self._closing,
            )

    def close(self, *, timeout: float | None = None) -> None:
        """Take no more requests, finish those queued and running, stop the thread (blocking)."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join(timeout)

    # --- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            admitted = self._wait_for_work(running=batch is not None)
            if admitted is None:
                return
            wanted = self._threads or self._default_threads or self._every_core
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
            self._running_threads = wanted
            try:
                with torch.inference_mode():
                    if admitted:
                        batch = _join(_compacted(batch), self._prefill(admitted))
                    if batch is not None:
                        batch = self._step(batch)
            except Exception as error:  # a bug of ours: fail what is running, keep serving
                logger.exception("the batch scheduler failed")
                with self._condition:
                    for request in {*(batch.rows if batch else []), *admitted}:
                        self._end(request, error)
                batch = None
            with self._condition:
                self._active = len(_live(batch)) if batch else 0

    def _wait_for_work(self, *, running: bool) -> list[GenerationRequest] | None:
        """The requests to admit now (``[]``: none, keep decoding); ``None``: stop."""
        with self._condition:
            while not running and not self._pending:
                if self._closing:
                    return None
                self._wake_at = 1
                self._condition.wait()
            room = self.settings.max_batch - self._active
            if not running and self.settings.max_wait > 0 and len(self._pending) < room:
                # An idle model: let the requests arriving together share the first step.
                # Woken only once they fill the batch: a wake-up per arrival takes the
                # interpreter lock from the loop that is submitting the rest.
                self._wake_at = room
                until = time.monotonic() + self.settings.max_wait
                while len(self._pending) < room and (left := until - time.monotonic()) > 0:
                    if self._closing:
                        break
                    self._condition.wait(left)
            self._wake_at = None  # decoding: the worker looks at the queue between steps
            admitted: list[GenerationRequest] = []
            now = time.monotonic()
            while self._pending and len(admitted) < room:
                request = self._pending.popleft()
                if request.cancelled:
                    self._end(request)
                elif now > request.deadline:
                    self._end(request, GenerationTimeout.after(self.settings.timeout))
                else:
                    admitted.append(request)
            self._active += len(admitted)
            return admitted

    def _end(self, request: GenerationRequest, error: BaseException | None = None) -> None:
        if not request.finished:
            request._finish(error)
            self._finished += 1
            self._tokens += len(request.generated)

    def _prefill(self, requests: list[GenerationRequest]) -> _Batch | None:
        """Prefill the requests' sequences, packed :data:`PREFILL_TOKENS` at a time: a batch
        of those still going."""
        batch: _Batch | None = None
        for pack in _packs(requests, budget=PREFILL_TOKENS):
            batch = _join(batch, self._prefill_pack(pack))
        return batch

    def _prefill_pack(self, requests: list[GenerationRequest]) -> _Batch | None:
        """One packed forward pass. If it raises, each request runs again on its own; those
        failing alone end with their error."""
        try:
            return self._prefill_packed(requests)
        except Exception as error:
            if len(requests) == 1:
                logger.warning("a generation failed: %s", error)
                with self._condition:
                    self._end(requests[0], error)
                return None
            logger.warning("a batch of %d failed (%s); running each alone", len(requests), error)
        batch: _Batch | None = None
        for request in requests:
            batch = _join(batch, self._prefill_pack([request]))
        return batch

    def _prefill_packed(self, requests: list[GenerationRequest]) -> _Batch | None:
        """Run the sequences end to end as one row; each position sees the earlier positions
        of its own sequence only, and its position id counts from its sequence's start. The
        cache is then laid out as one left-padded row per request."""
        sequences = [request.ids for request in requests]
        length = torch.tensor([len(ids) for ids in sequences])
        total, width = int(length.sum()), int(length.max())
        input_ids = torch.tensor([[t for ids in sequences for t in ids]], dtype=torch.long)
        segment = torch.repeat_interleave(torch.arange(len(sequences)), length)
        starts = length.cumsum(0) - length
        position = torch.arange(total) - starts[segment]
        allowed = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
        ends = starts + length - 1
        device = self.device
        cache = roomy_cache()
        output = self.model(
            input_ids=input_ids.to(device),
            attention_mask=self._packed_mask(allowed[None, None].to(device)),
            position_ids=position[None].to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=ends.to(device),
        )
        self._count_step(len(requests))
        tokens = self._choose(output.logits[0], requests)
        # Row r's cache: its own positions, right-aligned in ``width`` columns; the columns
        # before it (padding) point at any position and are masked out.
        columns = torch.arange(width)
        padding = width - length
        source = (starts[:, None] + columns[None, :] - padding[:, None]).clamp(min=0)
        mask = (columns[None, :] >= padding[:, None]).long().to(device)
        index = source.flatten().to(device)
        layers = [
            (
                unpack_rows(layer.keys, index, len(requests)),
                unpack_rows(layer.values, index, len(requests)),
            )
            for layer in cache_layers(cache)
        ]
        batch = _Batch(requests, roomy_cache(layers), mask, tokens)
        return self._advance(batch, tokens)

    def _packed_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (``[1, 1, T, T]``, True where a query may see a key) as the attention
        implementation takes a 4-D mask: boolean for SDPA, additive for the others."""
        if self._uses_sdpa:
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _step(self, batch: _Batch) -> _Batch | None:
        """One decoding step for every row still wanted; the batch that goes on."""
        wanted = self._drop_unwanted(batch)
        if wanted is None:
            return None
        batch = wanted
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        try:
            output = self.model(
                input_ids=batch.last[:, None],
                attention_mask=self._decoding_mask(mask),
                position_ids=batch.mask.sum(-1, keepdim=True),
                cache=batch.cache,
                use_cache=True,
            )
        except Exception as error:
            logger.warning("a decoding step failed (%s); running each row alone", error)
            # Each row's last token is in its ids, not in its cache: a fresh prefill redoes it.
            return self._prefill([request for request in batch.rows if not request.finished])
        self._count_step(len(_live(batch)))
        batch.mask = mask
        tokens = self._choose(output.logits[:, -1, :], batch.rows)
        return self._advance(batch, tokens)

    def _decoding_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask for a decoding step (one new position per row).

        For SDPA, the 4-D boolean mask transformers would build from ``mask`` (a query of one
        position may see every real key before it), built directly: a tenth off each step of
        the default model (4.5 -> 4.0 ms for 32 rows), the same tokens. Other attention
        implementations get the 2-D mask to build their own.
        """
        if self._uses_sdpa:
            return mask[:, None, None, :].bool()
        return mask

    @property
    def _uses_sdpa(self) -> bool:
        """Whether the model attends through SDPA, which takes a boolean 4-D mask as is (read
        each time: the attention implementation can be changed on a loaded model)."""
        return getattr(self.model.config, "_attn_implementation", None) == "sdpa"

    def _count_step(self, rows: int) -> None:
        with self._condition:
            self._steps += 1
            self._largest = max(self._largest, rows)

    def _choose(self, logits: torch.Tensor, rows: list[GenerationRequest]) -> torch.Tensor:
        """Each row's next token: greedy, or sampled as :class:`Decoding` says."""
        logits = logits.float()
        if self._processors:
            ids: Any = self._padded([row.ids for row in rows])
            logits = self._processors(ids, logits)
        if self.decoding.temperature > 0:
            return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]
        return logits.argmax(dim=-1)

    def _padded(self, sequences: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in sequences)
        padded = torch.full((len(sequences), width), self.decoding.pad_id, dtype=torch.long)
        for row, ids in enumerate(sequences):
            padded[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        return padded.to(self.device)

    def _advance(self, batch: _Batch, tokens: torch.Tensor) -> _Batch | None:
        """Give each row its new token; end the rows that are done; the rest go on."""
        chosen: list[int] = tokens.tolist()
        ended: list[tuple[GenerationRequest, BaseException | None]] = []
        going: list[int] = []
        for index, (request, token) in enumerate(zip(batch.rows, chosen, strict=True)):
            if request.finished:  # ended before: its row waits for the batch's compaction
                continue
            if token in self.decoding.stop_ids:
                ended.append((request, None))
                continue
            request.generated.append(token)
            if request.on_token is not None:
                try:
                    request.on_token(token)
                except Exception as listener_error:  # its listener is gone: so is the request
                    ended.append((request, listener_error))
                    continue
            if len(request.generated) >= request.max_new_tokens:
                ended.append((request, None))
            else:
                going.append(index)
        if self._stop_strings is not None and going:
            tails = self._padded([batch.rows[i].generated[-32:] for i in going])
            stopped = self._stop_strings(tails, None).tolist()
            for index, stop in zip(list(going), stopped, strict=True):
                if stop:
                    ended.append((batch.rows[index], None))
                    going.remove(index)
        with self._condition:
            for request, failure in ended:
                self._end(request, failure)
        return _going_on(batch, tokens)

    def _drop_unwanted(self, batch: _Batch) -> _Batch | None:
        """Rows whose caller went away or whose deadline passed end before the step."""
        now = time.monotonic()
        with self._condition:
            for request in batch.rows:
                if request.finished:
                    continue
                if request.cancelled:
                    self._end(request)
                elif now > request.deadline:
                    self._end(request, GenerationTimeout.after(self.settings.timeout))
        return _going_on(batch, batch.last)


def _live(batch: _Batch) -> list[int]:
    return [index for index, request in enumerate(batch.rows) if not request.finished]


def _going_on(batch: _Batch, tokens: torch.Tensor) -> _Batch | None:
    """The batch after a step that may have ended rows: ``None`` once none is live, compacted
    once a quarter of its rows have ended. An ended row's request is settled at once; its row
    stays in the cache, decoded for nothing, until then: compacting copies every layer's keys
    and values twice, and doing it each time one row ended took about a tenth of the default
    model's decoding time."""
    live = _live(batch)
    if live and (len(batch.rows) - len(live)) * 4 < len(batch.rows):
        batch.last = tokens
        return batch
    return _select(batch, live, tokens)


def _compacted(batch: _Batch | None) -> _Batch | None:
    """``batch`` without its ended rows (before others join it)."""
    return None if batch is None else _select(batch, _live(batch), batch.last)


def _select(batch: _Batch, keep: list[int], tokens: torch.Tensor) -> _Batch | None:
    """The batch narrowed to the rows ``keep``, with the padding none of them needs cut off."""
    if not keep:
        return None
    batch.last = tokens
    if len(keep) == len(batch.rows):
        # Only rows leaving free padding columns: the longest row, joined or prefilled,
        # always fills the first one.
        return batch
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    batch.mask = batch.mask[index]
    batch.last = tokens[index]
    batch.rows = [batch.rows[i] for i in keep]
    used = batch.mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start > 0:
        batch.mask = batch.mask[:, start:]
        for layer in cache_layers(batch.cache):
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
    return batch


def _packs(requests: list[GenerationRequest], *, budget: int) -> list[list[GenerationRequest]]:
    """The requests in arrival order, cut into packs of at most ``budget`` tokens (a longer
    request is a pack of its own)."""
    packs: list[list[GenerationRequest]] = []
    tokens = 0
    for request in requests:
        size = len(request.prompt_ids) + len(request.generated)
        if not packs or tokens + size > budget:
            packs.append([])
            tokens = 0
        packs[-1].append(request)
        tokens += size
    return packs


def _join(batch: _Batch | None, joining: _Batch | None) -> _Batch | None:
    """One batch of both: the shorter one's cache and mask left-padded to the longer one's."""
    if batch is None or joining is None:
        return batch or joining
    width = max(batch.mask.shape[1], joining.mask.shape[1])
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for mine, theirs in zip(cache_layers(batch.cache), cache_layers(joining.cache), strict=True):
        keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
        values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        layers.append((keys, values))
    mask = torch.cat([left_pad(batch.mask, width), left_pad(joining.mask, width)])
    return _Batch(
        rows=batch.rows + joining.rows,
        cache=roomy_cache(layers),
        mask=mask,
        last=torch.cat([batch.last, joining.last]),
    )
