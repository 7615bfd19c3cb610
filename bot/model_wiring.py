"""The composition root's model side: the reply generator ``chatbot run`` serves with.

A local model (:class:`model.service.ModelService`, the default model built on first use; in a
process of its own, :class:`model.worker_process.ModelProcess`, unless MODEL_PROCESS=same) or,
with ``MODEL_BACKEND=remote``, the client of an OpenAI-compatible server
(:class:`model.remote.RemoteModel`). Only :mod:`bot.cli` calls it.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:
    from bot.service import ReplyGenerator
    from model.generation import GenerationSettings


class CommandError(Exception):
    """A failure to report as one line, without a traceback."""


def progress(line: str) -> None:
    """A progress line of a long step (building the default model), on stderr."""
    print(line, file=sys.stderr, flush=True)


def load_generator(settings: Settings) -> ReplyGenerator:
    """Load the configured model, building the default one on first use; or, with
    ``MODEL_BACKEND=remote``, the client of the model server (see :func:`start_generator`)."""
    if settings.model_backend == "remote":
        return remote_generator(settings)
    path = settings.resolved_model_path
    if not settings.uses_default_model and _names_a_folder(path) and not Path(path).is_dir():
        # Said before torch is imported: that alone takes seconds.
        raise CommandError(f"MODEL_PATH {path} is not a folder (a model folder or hub id)")
    from model.loading import ModelLoadError, ensure_default_model
    from model.service import BatchSettings, LocalModel, ModelService, on_passing_thread

    # Settings validated the values already, so this raises nothing.
    generation = generation_settings(settings)
    try:
        # A missing GPU is said before the default model is built (minutes) or loaded.
        LocalModel.resolve_device(settings.model_device)
        if settings.uses_default_model:
            # Trained on a thread that then ends: a live thread that ran torch work slows the
            # batch worker about 2x for good (see model.service.in_passing_thread).
            on_passing_thread(
                partial(ensure_default_model, settings.default_model_dir, progress=progress)
            )
        from bot.retraining import serving_path

        batch = BatchSettings(
            max_batch=settings.batch_max_size,
            max_wait=settings.batch_max_wait_ms / 1000,
            queue_size=settings.model_queue_size,
            timeout=settings.generation_timeout_seconds,
            threads=settings.model_threads,
        )
        if settings.model_process == "separate":
            from model.worker_process import ModelProcess

            return ModelProcess(
                serving_path(settings),
                device=settings.model_device,
                dtype=settings.model_dtype,
                generation=generation,
                batch=batch,
                log_level=settings.log_level,
            )
        return ModelService.load(
            serving_path(settings),
            device=settings.model_device,
            dtype=settings.model_dtype,
            generation=generation,
            batch=batch,
        )
    except ModelLoadError as error:
        raise CommandError(str(error)) from None


def generation_settings(settings: Settings) -> GenerationSettings:
    from model.generation import GenerationSettings

    return GenerationSettings(
        temperature=settings.generation_temperature,
        top_p=settings.generation_top_p,
        repetition_penalty=settings.generation_repetition_penalty,
        stop_strings=tuple(settings.generation_stop_strings),
    )


def remote_generator(settings: Settings) -> ReplyGenerator:
    """The remote backend; with MODEL_PATH a local model folder, its tokenizer counts tokens
    exactly and its config caps the window and the history (nothing is built or loaded
    otherwise: the model lives on the server)."""
    from model.remote import RemoteModel

    tokenizer = None
    history_pairs = None
    window = settings.model_context_window
    path = settings.model_path
    if path and _names_a_folder(path) and Path(path).expanduser().is_dir():
        from transformers import AutoConfig, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(Path(path).expanduser())
            config = AutoConfig.from_pretrained(Path(path).expanduser())
        except Exception as error:
            raise CommandError(
                f"could not read the tokenizer in MODEL_PATH {path}: {error}"
            ) from None
        declared = getattr(config, "chat_history_pairs", None)
        history_pairs = declared if isinstance(declared, int) and declared >= 0 else None
        window = min(window, getattr(config, "max_position_embeddings", None) or window)
    return RemoteModel(
        url=settings.model_url,
        model_name=settings.model_name,
        api_key=settings.model_api_key,
        context_window=window,
        tokenizer=tokenizer,
        history_pairs=history_pairs,
        generation=generation_settings(settings),
        timeout=settings.generation_timeout_seconds,
        retries=settings.model_retries,
    )


async def start_generator(generator: ReplyGenerator) -> None:
    """Connect a remote backend before serving (one-line error, exit 2, when it cannot)."""
    from model.remote import RemoteModel, RemoteModelError

    if isinstance(generator, RemoteModel):
        try:
            await generator.start()
        except RemoteModelError as error:
            raise CommandError(str(error)) from None


async def close_generator(generator: ReplyGenerator) -> None:
    """Let the model finish what it has and stop (the remote backend: close its session)."""
    from model.remote import RemoteModel
    from model.service import ModelService
    from model.worker_process import ModelProcess

    if isinstance(generator, RemoteModel):
        await generator.close()
    elif isinstance(generator, ModelService | ModelProcess):
        await generator.aclose()


def _names_a_folder(path: str) -> bool:
    """A filesystem path rather than a hub id such as ``org/name``."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2
