"""Serving: load a causal LM folder once, answer chat messages with greedy decoding.

Usage::

    from model.service import LocalModel, ensure_default_model
    path = ensure_default_model(Path("data/model"))      # builds it on first run
    model = LocalModel.load(path)
    reply = await model.generate(messages=[{"role": "user", "content": "Hi"}])

Every prompt has the layout of :func:`model.prompt.format_prompt`, the one formatter shared with
training, but is tokenized segment by segment (:class:`PromptEncoder`): the template's control
tokens go in by id and message text is encoded as plain text only, so no text can forge
structure whatever the tokenizer's normaliser does. Generation stops at any control token (the
model starting a turn of its own, ``[INST]``, as well as ``</s>``), and the reply, streamed or
not, is cut before any control string spelled out in text (:class:`model.prompt.ReplyCleaner`).

Generation runs on one dedicated worker thread, so the event loop never blocks and requests are
answered one at a time (the model is not re-entrant, and two CPU cores gain nothing from running
two generations at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from model.prompt import (
    CONTROL_STRINGS,
    ReplyCleaner,
    clean_reply,
    format_prompt,
    neutralise,
    prompt_segments,
)

logger = logging.getLogger(__name__)

#: Used when a model's config names no context window.
FALLBACK_CONTEXT_WINDOW = 2048
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ModelLoadError(Exception):
    """A model folder (or hub id) could not be loaded; the message says why."""


def _is_local_reference(path: str | Path) -> bool:
    """Whether ``path`` names a local folder (rather than a Hugging Face hub id)."""
    if isinstance(path, Path):
        return True
    text = str(path)
    return (
        Path(text).exists()
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")
    )


def _folder_version(folder: Path) -> str:
    """``name-hash``: the hash covers config.json and the weight files' size and mtime."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for name in sorted(p.name for p in folder.iterdir()):
        if name.endswith((".safetensors", ".bin", ".index.json")):
            stat = (folder / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{folder.name}-{digest.hexdigest()[:10]}"


def _check_local_folder(folder: Path) -> None:
    """Raise ModelLoadError unless ``folder`` looks like a Hugging Face model folder."""
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a model folder: it has no config.json "
            "(build the default model with `python -m model.bootstrap DIR`)"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(
        folder.glob("*.safetensors")
    ):
        raise ModelLoadError(f"{folder} is not a model folder: it has no weight files")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{folder} is not a model folder: it has no tokenizer files")


class PromptEncoder:
    """Prompt token ids built from :func:`model.prompt.prompt_segments`, for one tokenizer.

    The template's control strings (``<s>``, ``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``,
    ``</s>``; bos and eos are the tokenizer's own) go in as the tokenizer's ids where it has them
    as added tokens. Everything else, the template's spaces and newlines and the message text, is
    encoded with ``split_special_tokens=True``, so no message text can become a special token,
    even where the tokenizer normalises text before matching its added tokens (NFKC turns
    ``［INST］`` into ``[INST]``; a normaliser may drop the neutralising zero-width space). Added
    tokens that are not special, which ``split_special_tokens`` leaves alone, are caught after
    encoding: the text they came from is encoded again one character at a time. So the plain-text
    ids never hold a control token or any other special token (``<unk>`` aside).

    A control string the tokenizer has no token for is written as text, joined to the text
    around it (as Llama-2's own tokenizer writes ``[INST]``); there the neutraliser in the text
    is all that tells a user's ``[INST]`` from the template's.

    For ordinary text the ids equal those of the whole :func:`~model.prompt.format_prompt`
    string, since a tokenizer splits at its added tokens before anything else.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos: str = tokenizer.bos_token or ""
        self.eos: str = tokenizer.eos_token or ""
        added: dict[str, int] = tokenizer.get_added_vocab()
        controls = {*CONTROL_STRINGS, self.bos, self.eos} - {""}
        #: The control strings that have a token of their own, and its id.
        self.control_ids = {text: added[text] for text in sorted(controls) if text in added}
        special = {*self.control_ids.values(), *tokenizer.all_special_ids}
        #: Ids that plain text must never produce.
        self.forbidden_ids = frozenset(special - {tokenizer.unk_token_id})

    def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt's token ids (raises PromptFormatError like format_prompt)."""
        ids: list[int] = []
        text: list[str] = []  # plain text since the last control token
        for kind, piece in prompt_segments(messages, bos=self.bos, eos=self.eos):
            if kind == "control" and piece in self.control_ids:
                ids += self.encode_text("".join(text))
                text.clear()
                ids.append(self.control_ids[piece])
            else:
                text.append(piece)
        ids += self.encode_text("".join(text))
        return ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain text: ids with no control or other special token among them."""
        if not text:
            return []
        ids: list[int] = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
        if self.forbidden_ids.isdisjoint(ids):
            return ids
        return self._encode_around_forbidden(text)

    def _encode_around_forbidden(self, text: str) -> list[int]:
        """Encode ``text`` with each stretch that made a forbidden id encoded character-wise."""
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: all of it, characterwise
            return self._encode_characters(text)
        encoding = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
        ids: list[int] = encoding["input_ids"]
        offsets: list[tuple[int, int]] = encoding["offset_mapping"]
        # Mark the characters forbidden tokens came from, and those of any token sharing one of
        # them (a normaliser can make several tokens of one character), until nothing changes.
        bad = [token in self.forbidden_ids for token in ids]
        marked = bytearray(len(text))
        while True:
            for (start, end), is_bad in zip(offsets, bad, strict=True):
                if is_bad and end > start:
                    marked[start:end] = b"\x01" * (end - start)
            widened = [
                is_bad or any(marked[start:end])
                for (start, end), is_bad in zip(offsets, bad, strict=True)
            ]
            if widened == bad:
                break
            bad = widened
        result: list[int] = []
        done_until = 0  # the marked stretches before this index are encoded already
        for token, (start, end), is_bad in zip(ids, offsets, bad, strict=True):
            if not is_bad:
                result.append(token)
            elif end > start and start >= done_until:
                first, last = start, end
                while first > done_until and marked[first - 1]:
                    first -= 1
                while last < len(text) and marked[last]:
                    last += 1
                result += self._encode_characters(text[first:last])
                done_until = last
        return [token for token in result if token not in self.forbidden_ids]

    def _encode_characters(self, text: str) -> list[int]:
        """``text`` encoded one character at a time, forbidden ids left out."""
        if not text:
            return []
        batch: list[list[int]] = self.tokenizer(
            list(text), add_special_tokens=False, split_special_tokens=True
        )["input_ids"]
        return [token for ids in batch for token in ids if token not in self.forbidden_ids]


class LocalModel:
    """A loaded causal LM and its tokenizer, answering chat messages greedily."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        version: str,
        device: str,
        context_window: int | None = None,
        history_pairs: int | None = None,
    ) -> None:
        """Wrap an already loaded model and tokenizer (use :meth:`load` normally).

        ``history_pairs`` caps how many earlier user/assistant pairs go into a prompt (None: as
        many as fit). By default it comes from the model's ``config.chat_history_pairs``, which
        the bootstrap sets to 0 for the default model (trained on single exchanges only).
        """
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self.device = device
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
        #: Control strings without a token of their own stop generation as text.
        self.stop_strings = [c for c in CONTROL_STRINGS if c not in controls]
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
    def load(cls, path: str | Path, *, device: str | None = None) -> LocalModel:
        """Load a Hugging Face causal-LM folder (or hub id).

        Uses CUDA with bfloat16 when available, otherwise the CPU with float32.

        Raises:
            ModelLoadError: the folder is missing, is not a model folder, or its files are
                corrupt or incompatible.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = _is_local_reference(path)
        reference: str | Path = Path(path).expanduser() if local else str(path)
        if isinstance(reference, Path):
            _check_local_folder(reference)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        where = (
            str(reference)
            if local
            else f"{reference} (no such folder, so tried as a Hugging Face hub id)"
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(reference)
        except Exception as error:
            raise ModelLoadError(f"could not load the tokenizer from {where}: {error}") from error
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)
        except Exception as error:
            raise ModelLoadError(
                f"could not load the model weights from {where} (corrupt or incompatible "
                f"files?): {error}"
            ) from error
        model.to(device)
        model.eval()
        if isinstance(reference, Path):
            version = _folder_version(reference)
        else:
            config_hash = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
            version = f"{reference.rsplit('/', 1)[-1]}-{config_hash[:10]}"
        return cls(model, tokenizer, version=version, device=device)

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
        """Answer ``messages`` (ending with a user message) by greedy decoding; blocking.

        Stops at eos or any other control token; the reply is cut before a control string
        spelled out in text (:func:`model.prompt.clean_reply`). ``streamer`` (a transformers
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
                do_sample=False,
                eos_token_id=self.stop_ids or None,
                pad_token_id=pad_id if pad_id is not None else eos_id,
                streamer=streamer,
                **stopping,
            )
        new_tokens = output[0, input_ids.shape[1] :]
        text: str = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return clean_reply(text, self.reply_controls).strip()

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
        streamer = _LoopStreamer(self.tokenizer, loop=loop, pieces=pieces, cleaner=cleaner)
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
    ) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop = loop
        self.pieces = pieces
        self.cleaner = cleaner

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self.cleaner.feed(text)
        if stream_end:
            text += self.cleaner.finish()
        if text:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, text)


def ensure_default_model(path: Path, *, progress: Callable[[str], None] = print) -> Path:
    """Return ``path``, first building the default model there if the folder is missing/empty.

    Raises:
        ModelLoadError: ``path`` exists with other files in it but no model (not overwritten).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelLoadError(
            f"{path} exists but is not a model folder; refusing to overwrite it with the "
            "default model"
        )
    from model.bootstrap import build_default_model

    progress(f"no model at {path}; building the default model (about 2 minutes)")
    return build_default_model(path, progress=progress)
