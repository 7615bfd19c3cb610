"""Serving: load a causal LM folder once, answer chat messages (greedy decoding by default).

Usage::

    from model.loading import ensure_default_model
    from model.service import LocalModel
    path = ensure_default_model(Path("data/model"))      # builds it on first run
    model = LocalModel.load(path)
    reply = await model.generate(messages=[{"role": "user", "content": "Hi"}])

Every prompt has the layout of :func:`model.prompt.format_prompt`, the one formatter shared with
training, but is tokenized segment by segment (:class:`model.prompt_encoding.PromptEncoder`):
the template's control tokens go in by id and message text is encoded as plain text only, so
no text can forge structure whatever the tokenizer's normaliser does. Generation stops at any
control token (the model starting a turn of its own, ``[INST]``, as well as ``</s>``), and the
reply, streamed or not, is cut before any control string spelled out in text
(:class:`model.prompt.ReplyCleaner`). Decoding follows :class:`GenerationSettings` (greedy
unless a temperature is set; extra stop strings end a reply and are left out of it). The
version names the weights: a hash of a local folder's config and weight files' contents, or a
hub id's resolved commit (:mod:`model.loading`).

Generation runs on one dedicated worker thread, so the event loop never blocks and requests are
answered one at a time (the model is not re-entrant, and two CPU cores gain nothing from running
two generations at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from model.loading import (
    ModelLoadError,
    _check_local_folder,
    _is_local_reference,
    folder_version,
    hub_version,
    resolve_hub_commit,
)
from model.prompt import (
    CONTROL_STRINGS,
    ReplyCleaner,
    clean_reply,
    format_prompt,
    neutralise,
)
from model.prompt_encoding import PromptEncoder

logger = logging.getLogger(__name__)

#: Used when a model's config names no context window.
FALLBACK_CONTEXT_WINDOW = 2048
#: The dtypes a model may be loaded in, by the names MODEL_DTYPE takes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How replies are decoded; the defaults are greedy decoding with no extra stops.

    Raises ValueError for a value transformers would reject or misuse.
    """

    #: 0: greedy (deterministic); above 0: sampling, hotter is more varied.
    temperature: float = 0.0
    #: Nucleus sampling: sample from the fewest tokens whose probability reaches this (1: all).
    top_p: float = 1.0
    #: Above 1 discourages repeating tokens already in the prompt or reply (1: off).
    repetition_penalty: float = 1.0
    #: Text that ends the reply, itself left out (on top of the template's control strings).
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0, not {self.repetition_penalty}")
        if any(not stop for stop in self.stop_strings):
            raise ValueError("stop_strings must not hold an empty string")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``model.generate`` arguments for these settings (none of the stops)."""
        kwargs: dict[str, Any] = {"do_sample": self.sampling}
        if self.sampling:  # transformers warns about sampling arguments given to greedy search
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


class StopCutter:
    """Cuts text, also arriving piece by piece, before the first of some stop strings.

    Unlike :class:`model.prompt.ReplyCleaner` (control strings, whose fragments are never
    text), a possible start of a stop string still held back when the reply ends is text
    (``pass`` is not ``password``) and is given back by :meth:`finish`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._longest = max((len(stop) for stop in self.stops), default=0)
        self._held = ""
        self._cut = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show now."""
        if self._cut or not self.stops:
            return "" if self._cut else text
        text = self._held + text
        self._held = ""
        found = [index for stop in self.stops if (index := text.find(stop)) >= 0]
        if found:
            self._cut = True
            return text[: min(found)]
        for length in range(min(len(text), self._longest - 1), 0, -1):
            if any(stop.startswith(text[-length:]) for stop in self.stops):
                self._held = text[-length:]
                return text[:-length]
        return text

    def finish(self) -> str:
        """What was held back: the reply ended before it became a stop string."""
        held, self._held = self._held, ""
        return "" if self._cut else held

    def cut(self, text: str) -> str:
        """``text`` before its first stop string (a whole reply)."""
        return self.feed(text) + self.finish()


class LocalModel:
    """A loaded causal LM and its tokenizer, answering chat messages (greedily by default)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        version: str,
        device: str,
        context_window: int | None = None,
        history_pairs: int | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        """Wrap an already loaded model and tokenizer (use :meth:`load` normally).

        ``generation`` says how replies are decoded (default: greedy, no extra stop strings).

        ``history_pairs`` caps how many earlier user/assistant pairs go into a prompt (None: as
        many as fit). By default it comes from the model's ``config.chat_history_pairs``, which
        the bootstrap sets to 0 for the default model (trained on single exchanges only).
        """
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self.device = device
        self.generation = generation or GenerationSettings()
        self.context_window = context_window or self._context_window_of(model, tokenizer)
        if history_pairs is None:
            declared = getattr(model.config, "chat_history_pairs", None)
            history_pairs = declared if isinstance(declared, int) and declared >= 0 else None
        self.history_pairs = history_pairs
        self.prompt_encoder = PromptEncoder(tokenizer)
        controls = self.prompt_encoder.control_ids
        eos_id = tokenizer.eos_token_id
        #: Generation stops at any control token, [INST] (a new user turn) as well as eos.
        self.stop_ids = list(
            dict.fromkeys([*([eos_id] if eos_id is not None else []), *controls.values()])
        )
        #: Control strings without a token of their own stop generation as text, and so do
        #: the configured stop strings.
        self.stop_strings = list(
            dict.fromkeys(
                [*(c for c in CONTROL_STRINGS if c not in controls), *self.generation.stop_strings]
            )
        )
        #: The strings no reply may contain (see :class:`model.prompt.ReplyCleaner`).
        self.reply_controls = (*CONTROL_STRINGS, *controls)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-generate")

    @staticmethod
    def _context_window_of(model: Any, tokenizer: Any) -> int:
        window = getattr(model.config, "max_position_embeddings", None)
        if isinstance(window, int) and window > 0:
            return window
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            return limit
        return FALLBACK_CONTEXT_WINDOW

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        generation: GenerationSettings | None = None,
    ) -> LocalModel:
        """Load a Hugging Face causal-LM folder (or hub id); ``generation`` as in the constructor.

        ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and ``dtype`` (``auto``,
        ``float32``, ``bfloat16``, ``float16``) default to ``auto``: CUDA with bfloat16 when
        available, otherwise the CPU with float32.

        Raises:
            ModelLoadError: the device or dtype is unknown or the device is not available, or
                the folder is missing, is not a model folder, or its files are corrupt or
                incompatible.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Checked first: a device that is not there is said at once, not after loading.
        device = cls.resolve_device(device or "auto")
        torch_dtype = cls.resolve_dtype(dtype or "auto", device=device)
        local = _is_local_reference(path)
        reference: str | Path = Path(path).expanduser() if local else str(path)
        if isinstance(reference, Path):
            _check_local_folder(reference)
        where = (
            str(reference)
            if local
            else f"{reference} (no such folder, so tried as a Hugging Face hub id)"
        )
        # A hub id is pinned to one commit: tokenizer and weights come from the same state of
        # the repository, and the commit is the version.
        commit = None if isinstance(reference, Path) else resolve_hub_commit(reference)
        pinned: dict[str, Any] = {"revision": commit} if commit else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(reference, **pinned)
        except Exception as error:
            raise ModelLoadError(f"could not load the tokenizer from {where}: {error}") from error
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                reference, dtype=torch_dtype, **pinned
            )
        except Exception as error:
            raise ModelLoadError(
                f"could not load the model weights from {where} (corrupt or incompatible "
                f"files?): {error}"
            ) from error
        model.to(device)
        model.eval()
        if isinstance(reference, Path):
            version = folder_version(reference)
        else:
            version = hub_version(reference, commit=commit, config=model.config)
        return cls(model, tokenizer, version=version, device=device, generation=generation)

    @staticmethod
    def resolve_device(device: str) -> str:
        """``auto``: ``cuda`` when torch sees a GPU, else ``cpu``; others checked, unchanged.

        Raises:
            ModelLoadError: the device is unknown, or is a CUDA device this machine lacks.
        """
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return device
        kind, _, index = device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device} is not available: torch finds no CUDA GPU on this machine "
                "(use the device auto or cpu)"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device} is not available: this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
            )
        return device

    @staticmethod
    def resolve_dtype(dtype: str, *, device: str) -> torch.dtype:
        """``auto``: bfloat16 on CUDA, float32 on the CPU; otherwise the named dtype.

        Raises:
            ModelLoadError: the dtype is none of auto, float32, bfloat16, float16.
        """
        if dtype == "auto":
            return torch.bfloat16 if device.startswith("cuda") else torch.float32
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
        return DTYPES[dtype]

    # --- prompt building -------------------------------------------------------------------

    def _count_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        return len(self._encode_prompt(messages))

    def _encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.prompt_encoder.encode(messages)

    def _truncate_content(
        self, head: list[dict[str, str]], role: str, content: str, budget: int
    ) -> str:
        """The longest beginning of ``content`` such that ``head + [message]`` fits ``budget``."""
        ids = self.prompt_encoder.encode_text(neutralise(content.strip()))
        keep = len(ids)
        while keep > 0:
            candidate = self.tokenizer.decode(ids[:keep], skip_special_tokens=False).strip()
            used = self._count_tokens([*head, {"role": role, "content": candidate}])
            if used <= budget:
                return candidate
            keep -= max(1, used - budget)
        return ""

    def fit_to_context(
        self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128
    ) -> list[dict[str, str]]:
        """Return the messages to actually prompt with, so prompt + answer fit the window.

        Keeps at most :attr:`history_pairs` earlier pairs, then drops whole user/assistant
        pairs, oldest first, keeping a leading system message and the newest turns. If the
        system message and the last user message alone are still too long, keeps the beginning
        of the last user message (and logs a warning); a system message that leaves no room at
        all is dropped.

        Raises:
            PromptFormatError: the messages are not a valid dialogue ending with a user turn.
            ValueError: ``max_new_tokens`` leaves no room for a prompt.
        """
        budget = self.context_window - max_new_tokens
        if budget < 8:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                f"{self.context_window}-token context window"
            )
        copies = [{"role": m["role"], "content": m["content"]} for m in messages]
        format_prompt(copies)  # validates roles; raises PromptFormatError
        if copies[-1]["role"] != "user":
            from model.prompt import PromptFormatError

            raise PromptFormatError("the last message must be a user message")
        system = copies[:1] if copies[0]["role"] == "system" else []
        history = copies[len(system) : -1]  # whole (user, assistant) pairs
        if self.history_pairs is not None:
            history = history[len(history) - 2 * self.history_pairs :] if self.history_pairs else []
        last = copies[-1]

        # Binary search for the fewest dropped pairs that fit (more dropped = fewer tokens).
        def fits(dropped_pairs: int) -> bool:
            kept = history[2 * dropped_pairs :]
            return self._count_tokens([*system, *kept, last]) <= budget

        pairs = len(history) // 2
        if fits(0):
            return [*system, *history, last]
        low, high = 1, pairs
        if not fits(pairs):
            low = pairs + 1
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        if low <= pairs:
            logger.info("dropped the %d oldest exchanges to fit the context window", low)
            return [*system, *history[2 * low :], last]

        # Even the last user message alone is too long: keep its beginning.
        if system and self._count_tokens([*system, {"role": "user", "content": ""}]) >= budget:
            logger.warning("the system message alone overflows the context window; dropped it")
            system = []
        content = self._truncate_content(system, "user", last["content"], budget)
        logger.warning(
            "the last user message (%d characters) overflows the %d-token context window; "
            "kept its first %d characters",
            len(last["content"]),
            self.context_window,
            len(content),
        )
        return [*system, {"role": "user", "content": content}]

    # --- generation ------------------------------------------------------------------------

    def generate_sync(
        self,
        *,
        messages: Sequence[Mapping[str, str]],
        max_new_tokens: int = 128,
        streamer: BaseStreamer | None = None,
    ) -> str:
        """Answer ``messages`` (ending with a user message) as :attr:`generation` says; blocking.

        Stops at eos or any other control token or at a configured stop string; the reply is
        cut before a control string spelled out in text (:func:`model.prompt.clean_reply`) and
        before a stop string. ``streamer`` (a transformers
        streamer) receives the tokens as they are generated, uncleaned.
        """
        fitted = self.fit_to_context(messages, max_new_tokens=max_new_tokens)
        prompt_ids = self._encode_prompt(fitted)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id
        stopping: dict[str, Any] = {}
        if self.stop_strings:
            stopping = {"stop_strings": self.stop_strings, "tokenizer": self.tokenizer}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                **self.generation.generate_kwargs(),
                eos_token_id=self.stop_ids or None,
                pad_token_id=pad_id if pad_id is not None else eos_id,
                streamer=streamer,
                **stopping,
            )
        new_tokens = output[0, input_ids.shape[1] :]
        text: str = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        reply = clean_reply(text, self.reply_controls)
        return StopCutter(self.generation.stop_strings).cut(reply).strip()

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> str:
        """Like :meth:`generate_sync`, on the model's worker thread (never blocks the loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            lambda: self.generate_sync(messages=messages, max_new_tokens=max_new_tokens),
        )

    async def stream(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128
    ) -> AsyncIterator[str]:
        """Yield the reply piece by piece (whole words) while the worker thread generates it.

        The pieces are cleaned like :meth:`generate_sync`'s reply and add up to it (less the
        whitespace it strips): none holds a control string, and a possible start of one is held
        back until the next piece shows what it is.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cleaner = ReplyCleaner(self.reply_controls)
        stops = StopCutter(self.generation.stop_strings)
        streamer = _LoopStreamer(
            self.tokenizer, loop=loop, pieces=pieces, cleaner=cleaner, stops=stops
        )
        generation = loop.run_in_executor(
            self._executor,
            lambda: self.generate_sync(
                messages=messages, max_new_tokens=max_new_tokens, streamer=streamer
            ),
        )
        # Ends the stream even when generation fails before the streamer's own end.
        generation.add_done_callback(lambda _future: pieces.put_nowait(None))
        while (piece := await pieces.get()) is not None:
            yield piece
        await generation  # raises what generation raised

    def close(self) -> None:
        """Stop the worker thread (pending generations still finish)."""
        self._executor.shutdown(wait=True)


class _LoopStreamer(TextStreamer):
    """Hands decoded text, cleaned, from the generation thread to an asyncio queue."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        loop: asyncio.AbstractEventLoop,
        pieces: asyncio.Queue[str | None],
        cleaner: ReplyCleaner,
        stops: StopCutter,
    ) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop = loop
        self.pieces = pieces
        self.cleaner = cleaner
        self.stops = stops

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        # Control strings first, then stop strings: as generate_sync cuts the whole reply.
        text = self.cleaner.feed(text)
        if stream_end:
            text += self.cleaner.finish()
        text = self.stops.feed(text)
        if stream_end:
            text += self.stops.finish()
        if text:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, text)
