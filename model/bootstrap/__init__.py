"""Build the default model: a small Llama trained from scratch on the starter corpus.

nanoGPT style: every knob lives in :class:`BootstrapConfig` (``config``), and
:func:`build_default_model` (``build``) runs the whole recipe top to bottom: tokenizer and data
(``data``), model and training loop (``training``), seed check (``seed_check``), atomic save.

Usage::

    python -m model.bootstrap OUTPUT_DIR          # the default model (about 2 minutes on 2 cores)
    python -m model.bootstrap OUTPUT_DIR --tiny   # the test-suite model (a few seconds)

or from Python::

    from model.bootstrap import build_default_model, TINY, TINY_EXCHANGES
    build_default_model(Path("data/model"))
    build_default_model(tmp / "tiny", exchanges=TINY_EXCHANGES, config=TINY)

The result is an ordinary Hugging Face folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``chat_template.jinja``, ...) that ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` load. Greedy generation on a prompt built by
:func:`model.prompt.format_prompt` returns the training answers word for word; for the seed
exchanges this is checked before anything is saved (see :func:`train_until_seeds_hold`).

Thread count and determinism
----------------------------
Training runs on a fixed number of torch threads (:attr:`BootstrapConfig.threads`, default 1),
set once for the whole build. The forward pass gives bit-identical results on 1 and 2 threads,
but the backward pass does not (measured: parameters differ by ~7e-9 after 5 steps), and over
~1,900 steps that drift decides whether an answer comes out word for word. The build used to
start on every core and drop to one thread whenever another process held a core, so the result
depended on the machine's load. Measured on this project's 2-core machine (ms per optimizer
step of the default model): idle, 1 thread 55-59, 2 threads 39-50; with one core held by
another process, 1 thread 54-58, 2 threads 138-170 (tiny ops: every one waits for the thread
that lost its core). One thread takes ~1.4x as long on an idle machine, is the fastest choice on
a busy one, and makes the same inputs give the same weights whatever the load, so there is no
longer a guard that drops threads mid-build. Full default builds on 2026-12-01, machine busy
with other work: pinned to one core 167.9 s, run normally 135.3 s, at a quieter moment 107.5 s,
all three bit-identical; the old two-threads-plus-guard build took 163.6 s there, dropped
threads 10 times and ended on another model (final loss 0.506 instead of 0.367).

A fixed thread count still leaves other CPUs (other kernels) and other recipes, so the build
also checks the seed answers through the serving path and trains on until they hold.
"""

from model.bootstrap.build import build_default_model, main, save_atomically
from model.bootstrap.config import (
    BOS_TOKEN,
    DEFAULT,
    EOS_TOKEN,
    IGNORE_INDEX,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    STRUCTURE_TOKENS,
    TINY,
    TINY_EXCHANGES,
    BootstrapConfig,
)
from model.bootstrap.data import Example, encode_examples, train_tokenizer
from model.bootstrap.seed_check import SeedAnswerError, train_until_seeds_hold, wrong_seed_answers
from model.bootstrap.training import build_llama, check_forward, llama_hidden_states, train

__all__ = [
    "BOS_TOKEN",
    "DEFAULT",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "STRUCTURE_TOKENS",
    "TINY",
    "TINY_EXCHANGES",
    "BootstrapConfig",
    "Example",
    "SeedAnswerError",
    "build_default_model",
    "build_llama",
    "check_forward",
    "encode_examples",
    "llama_hidden_states",
    "main",
    "save_atomically",
    "train",
    "train_tokenizer",
    "train_until_seeds_hold",
    "wrong_seed_answers",
]
