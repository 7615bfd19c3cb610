"""A loaded causal LM folder: the model, its tokenizer, its prompts (greedy decoding by default).

Usage (serving goes through :class:`model.service.ModelService`, which batches requests)::

    from model.loading import ensure_default_model
    from model.local_model import LocalModel
    path = ensure_default_model(Path("data/model"))      # builds it on first run
    model = LocalModel.load(path)
    reply = model.generate_sync(messages=[{"role": "user", "content": "Hi"}])   # blocking

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

:meth:`LocalModel.generate_sync` is plain ``model.generate`` for one request: the reference the
batched service is held to (token for token, greedy, float32) and what the bootstrap's seed
check and the recall benchmark use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from model.context_fit import MIN_BUDGET, FittedPrompt, fit_prompt
from model.generation import GenerationSettings, ReplyFilter
from model.loading import (
    ModelLoadError,
    _check_local_folder,
    _is_local_reference,
    folder_version,
    hub_version,
    resolve_hub_commit,
)
from model.prompt import CONTROL_STRINGS
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
        source: str = "",
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
        #: The folder (or hub id) it was loaded from; "" when built in memory.
        self.source = source
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
            # SDPA picks fused (flash / memory-efficient) attention kernels on CUDA.
            attention = {"attn_implementation": "sdpa"} if device.startswith("cuda") else {}
            model: Any = AutoModelForCausalLM.from_pretrained(
                reference, dtype=torch_dtype, **pinned, **attention
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
        return cls(
            model,
            tokenizer,
            version=version,
            device=device,
            generation=generation,
            source=str(reference),
        )

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

    def fit_to_context(
        self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128
    ) -> list[dict[str, str]]:
        """The messages :meth:`fit_prompt` keeps (errors as there)."""
        return self.fit_prompt(messages, max_new_tokens=max_new_tokens).messages

    def fit_prompt(
        self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128
    ) -> FittedPrompt:
        """The prompt to generate from: the newest whole turns that fit the context window with
        room for ``max_new_tokens`` (see :func:`model.context_fit.fit_prompt`), as token ids.

        Raises:
            PromptFormatError: the messages are not a valid dialogue ending with a user turn.
            ValueError: ``max_new_tokens`` leaves no room for a prompt.
        """
        budget = self.context_window - max_new_tokens
        if budget < MIN_BUDGET:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                f"{self.context_window}-token context window"
            )
        return fit_prompt(
            messages, encoder=self.prompt_encoder, budget=budget, history_pairs=self.history_pairs
        )

    def reply_text(self, generated_ids: Sequence[int]) -> str:
        """The reply in ``generated_ids``: decoded, cut before any control string spelled out
        in text (:func:`model.prompt.clean_reply`) and before a stop string, stripped."""
        text: str = self.tokenizer.decode(list(generated_ids), skip_special_tokens=True)
        return self.reply_filter().cut(text).strip()

    def reply_filter(self) -> ReplyFilter:
        """A filter for one reply of this model, whole or streamed (:class:`ReplyFilter`)."""
        return ReplyFilter(controls=self.reply_controls, stops=self.generation.stop_strings)

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
        fitted = self.fit_prompt(messages, max_new_tokens=max_new_tokens)
        ids = self.generate_ids_sync(
            fitted.token_ids, max_new_tokens=max_new_tokens, streamer=streamer
        )
        return self.reply_text(ids)

    def generate_ids_sync(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        streamer: BaseStreamer | None = None,
    ) -> list[int]:
        """Plain ``model.generate`` on ``prompt_ids``: the new ids, less a final stop token."""
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id
        stopping: dict[str, Any] = {}
        if self.generation.ignore_eos:
            stopping = {"min_new_tokens": max_new_tokens}
        elif self.stop_strings:
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
        new_ids: list[int] = output[0, input_ids.shape[1] :].tolist()
        if new_ids and new_ids[-1] in self.stop_ids and not self.generation.ignore_eos:
            new_ids.pop()
        return new_ids
