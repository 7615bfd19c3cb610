"""The whole recipe, top to bottom: tokenizer, data, model, training, seed check, atomic save."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from model.bootstrap.config import DEFAULT, TINY, TINY_EXCHANGES, BootstrapConfig
from model.bootstrap.data import encode_examples, train_tokenizer
from model.bootstrap.seed_check import (
    SeedAnswerError,
    describe_wrong,
    train_until_seeds_hold,
    wrong_seed_answers,
)
from model.bootstrap.training import build_llama, make_optimizer, seed_everything, train
from model.corpus import load_starter_corpus
from model.local_model import LocalModel


def save_atomically(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    output_dir: Path,
    *,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write the model into a temp folder next to ``output_dir``, then rename it into place.

    A reader never sees a half-written folder: either the old model (if any) or the new one.
    ``check`` runs on the written temp folder first; if it raises, nothing is replaced.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.build-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if check is not None:
            check(staging)
        if output_dir.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent)
            )
            os.replace(output_dir, retired / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def build_default_model(
    output_dir: Path,
    *,
    exchanges: Sequence[tuple[str, str]] | None = None,
    config: BootstrapConfig = DEFAULT,
    progress: Callable[[str], None] = print,
) -> Path:
    """Train the default chat model on ``exchanges`` (default: the starter corpus) and save it.

    Returns ``output_dir``, which afterwards holds a complete Hugging Face model folder that
    answers every seed exchange among ``exchanges`` word for word (unless ``config.seed_check``
    is off).

    Raises:
        SeedAnswerError: a seed answer stayed wrong (``output_dir`` is left as it was).
    """
    started = time.monotonic()
    output_dir = Path(output_dir)

    # 1. Determinism and threads: same inputs and config give the same weights. The thread
    #    count stays fixed for the whole build (see model.bootstrap's docstring).
    seed_everything(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    try:
        # 2. Data: seed exchanges first, then the chatterbot corpus.
        pairs = list(load_starter_corpus() if exchanges is None else exchanges)
        if not pairs:
            raise ValueError("no exchanges to train on")

        # 3. Tokenizer: byte-level BPE with one id per control string.
        tokenizer = train_tokenizer(pairs, config)
        examples = encode_examples(tokenizer, pairs)
        longest = max(len(e.input_ids) for e in examples)
        if longest > config.max_position_embeddings:
            raise ValueError(
                f"an exchange is {longest} tokens, over the {config.max_position_embeddings} "
                "token context window"
            )

        # 4. Model: a small Llama, initialised from the seed.
        model = build_llama(tokenizer, config)
        parameters = sum(p.numel() for p in model.parameters())
        progress(
            f"training {parameters / 1e6:.2f}M parameters on {len(examples)} exchanges "
            f"({sum(len(e.input_ids) for e in examples)} tokens, vocab {len(tokenizer)}) "
            f"for {config.epochs} epochs with {torch.get_num_threads()} threads"
        )

        # 5. Train.
        pad_id = tokenizer.pad_token_id
        assert isinstance(pad_id, int)
        optimizer = make_optimizer(model, config)
        loss = train(
            model, optimizer, examples, config, pad_id=pad_id, progress=progress, started=started
        )

        # 6. Seed check: the seed questions, asked as the bot asks them, get the seed answers
        #    word for word; if not, train on (bounded) or fail without saving.
        seeds = [pair for pair, example in zip(pairs, examples, strict=True) if example.seed]
        check: Callable[[Path], None] | None = None
        if config.seed_check and seeds:
            train_until_seeds_hold(
                model,
                optimizer,
                tokenizer,
                pairs,
                examples,
                config,
                pad_id=pad_id,
                progress=progress,
            )

            def check(folder: Path) -> None:
                """The same check on the written folder, loaded as the bot loads it."""
                wrong = wrong_seed_answers(LocalModel.load(folder, device="cpu"), seeds)
                if wrong:
                    raise SeedAnswerError(
                        f"the saved model answers wrongly ({describe_wrong(wrong)}); nothing saved"
                    )

        # 7. Save (atomically) and report.
        save_atomically(model, tokenizer, output_dir, check=check)
        progress(
            f"saved {output_dir} (final epoch loss {loss:.4f}) in {time.monotonic() - started:.1f}s"
        )
        return output_dir
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m model.bootstrap OUTPUT_DIR [--tiny]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("output_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model instead")
    args = parser.parse_args(argv)
    if args.tiny:
        build_default_model(args.output_dir, exchanges=TINY_EXCHANGES, config=TINY)
    else:
        build_default_model(args.output_dir)
    return 0
