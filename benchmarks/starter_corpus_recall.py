"""Starter-corpus recall of the default model: build time and exact-match answers.

Usage::

    python benchmarks/starter_corpus_recall.py              # builds the default model first
    python benchmarks/starter_corpus_recall.py MODEL_DIR    # measures an existing folder

Every corpus question is asked on its own through :class:`model.service.LocalModel` (the
serving path: ``format_prompt``, greedy decoding, stop at ``</s>``); an answer counts when it
equals the corpus answer exactly. Also asks each question after an unrelated earlier exchange
(a two-turn thread), as the bot does in a thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.bootstrap import build_default_model
from model.corpus import SEED_EXCHANGES, load_starter_corpus
from model.service import LocalModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("model_dir", nargs="?", type=Path, help="existing model folder")
    parser.add_argument("--threaded-sample", type=int, default=200, help="two-turn checks")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for answering (0: default); training uses BootstrapConfig.threads",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    build_seconds: float | None = None
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            started = time.monotonic()
            model_dir = build_default_model(Path(scratch) / "default-model")
            build_seconds = time.monotonic() - started
        model = LocalModel.load(model_dir, device="cpu")
        pairs = load_starter_corpus()
        longest = max(len(model.tokenizer(f" {a} ")["input_ids"]) for _, a in pairs) + 4

        started = time.monotonic()
        exact = 0
        misses: list[tuple[str, str, str]] = []
        for done, (question, answer) in enumerate(pairs, 1):
            if done % 200 == 0:
                print(f"asked {done}/{len(pairs)}: {exact} exact", file=sys.stderr, flush=True)
            reply = model.generate_sync(
                messages=[{"role": "user", "content": question}], max_new_tokens=longest
            )
            if reply == answer:
                exact += 1
            else:
                misses.append((question, answer, reply))
        single_seconds = time.monotonic() - started

        threaded = pairs[: args.threaded_sample]
        threaded_exact = 0
        for index, (question, answer) in enumerate(threaded):
            previous_q, previous_a = pairs[-1 - index]
            messages = [
                {"role": "user", "content": previous_q},
                {"role": "assistant", "content": previous_a},
                {"role": "user", "content": question},
            ]
            reply = model.generate_sync(messages=messages, max_new_tokens=longest)
            threaded_exact += reply == answer

        seeds = {
            q: model.generate_sync(messages=[{"role": "user", "content": q}])
            for q, _ in SEED_EXCHANGES
        }

    rows = [
        ("model", f"{model.version} ({sum(p.numel() for p in model.model.parameters()):,} params)"),
        ("build time (s)", f"{build_seconds:.1f}" if build_seconds is not None else "n/a (given)"),
        ("questions", f"{len(pairs)}"),
        ("exact-match answers", f"{exact}"),
        ("share", f"{exact / len(pairs):.1%}"),
        ("exact in a 2-turn thread", f"{threaded_exact}/{len(threaded)}"),
        ("answering time (s)", f"{single_seconds:.1f}"),
    ]
    rows += [(f"seed: {q}", repr(a)) for q, a in seeds.items()]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if misses:
        print(f"\nfirst misses ({len(misses)} in all):")
        for question, answer, reply in misses[:5]:
            print(f"  Q: {question!r}\n    expected: {answer!r}\n    got:      {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
