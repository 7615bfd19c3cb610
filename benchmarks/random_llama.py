"""A ~200M-parameter Llama with random weights: a stand-in for a real model's cost.

The serving benchmarks (benchmarks/serving.py, benchmarks/serving_end_to_end.py) need a model
whose forward pass costs what a small production model's does, which the tiny default model
(about a million parameters) does not. Its answers are noise; only the arithmetic counts.

Built from a ``LlamaConfig`` (by default hidden 1024, 16 layers, 16 heads, SwiGLU width 2816,
input and output embeddings tied) with the default model's tokenizer, saved as a Hugging Face
folder that :meth:`model.service.LocalModel.load` and ``transformers serve`` both load.

Every reply is exactly ``max_new_tokens`` long on every serving path, with no ignore-eos switch
needed (``transformers serve`` has none): the embedding rows of the tokenizer's special tokens
(``<s>``, ``</s>``, ``[INST]``, ...) are zero, so their logits are exactly 0 while thousands of
other random logits are not, and greedy decoding never picks one. (The probability that every
other logit is negative is about 2^-4000.)

Usage::

    from benchmarks.random_llama import build_random_llama
    folder = build_random_llama(Path("/tmp/random-200m"))   # about 10 s and 0.85 GB on disk

    python benchmarks/random_llama.py /tmp/random-200m [--tokenizer-from data/model]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: The new tokens a reply of the random model has (every path generates exactly this many).
RANDOM_MODEL_NEW_TOKENS = 32


def default_tokenizer(tokenizer_from: Path | None = None) -> Any:
    """The default model's tokenizer: loaded from a model folder, or trained afresh.

    Without a folder it is trained as :func:`model.bootstrap.build_default_model` trains it
    (byte-level BPE on the starter corpus, the default config), which gives the same tokenizer
    in about a second instead of a two-minute model build.
    """
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_from)
    from model.bootstrap import DEFAULT, train_tokenizer
    from model.corpus import load_starter_corpus

    return train_tokenizer(load_starter_corpus(), DEFAULT)


def build_random_llama(
    output: Path,
    *,
    tokenizer_from: Path | None = None,
    hidden_size: int = 1024,
    num_layers: int = 16,
    num_heads: int = 16,
    intermediate_size: int = 2816,
    context_window: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a random-weight Llama of this shape and the default tokenizer into ``output``.

    ``tokenizer_from`` is a model folder whose tokenizer to use (default: the default model's
    tokenizer, trained afresh). The same arguments give the same weights. Returns ``output``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = default_tokenizer(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=context_window,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # As the default model: prompts carry no history (model.service.LocalModel reads this).
    config.chat_history_pairs = 0
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight  # tied: also the output head
        embedding[sorted(set(tokenizer.all_special_ids))] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, a tied embedding counted once (as the matmuls use it)."""
    return sum(p.numel() for p in model.parameters())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("output", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, help="a model folder (default: trained)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    args = parser.parse_args(argv)
    folder = build_random_llama(
        args.output,
        tokenizer_from=args.tokenizer_from,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
    )
    print(folder)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
