"""The default model's training data: tokenizer, encoded exchanges, dialogues and
length-bucketed batches."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.bootstrap.config import (
    BOS_TOKEN,
    EOS_TOKEN,
    IGNORE_INDEX,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    STRUCTURE_TOKENS,
    BootstrapConfig,
)
from model.corpus import SEED_EXCHANGES
from model.prompt import CHAT_TEMPLATE, format_prompt


@dataclass(frozen=True)
class Example:
    """One tokenized training text and its next-token targets (IGNORE_INDEX where no loss)."""

    input_ids: list[int]
    targets: list[int]
    seed: bool = False  # one of SEED_EXCHANGES


def train_tokenizer(
    exchanges: Sequence[tuple[str, str]], config: BootstrapConfig
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the exchanges and wrap it for transformers.

    Byte-level means any text (emoji, zero-width spaces, other scripts) encodes losslessly. The
    control strings are special added tokens matched on the exact string (``normalized=False``),
    so each is one id and neutralised look-alikes in user text never become one.
    """
    special = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([f"{q}\n{a}" for q, a in exchanges], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(STRUCTURE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, exchanges: Sequence[tuple[str, str]]
) -> list[Example]:
    """Tokenize each exchange as a full chat text; loss only on the answer and the final eos.

    Special tokens split the text before BPE runs, so the prompt's ids are an exact prefix of the
    full text's ids and everything after the prompt is the answer (`` {answer} </s>``).
    """
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert isinstance(bos, str) and isinstance(eos, str)
    examples: list[Example] = []
    for question, answer in exchanges:
        user = {"role": "user", "content": question}
        prompt = format_prompt([user], bos=bos, eos=eos)
        full = format_prompt([user, {"role": "assistant", "content": answer}], bos=bos, eos=eos)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise RuntimeError(f"prompt tokens are not a prefix of the training text: {question!r}")
        # targets[t] is the token to predict after position t: answer tokens only.
        answer_ids = ids[len(prompt_ids) :]
        targets = [IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids + [IGNORE_INDEX]
        seed = (question, answer) in SEED_EXCHANGES
        examples.append(Example(input_ids=ids, targets=targets, seed=seed))
    return examples


def make_dialogues(
    examples: Sequence[Example],
    share: float,
    max_tokens: int,
    rng: random.Random,
    *,
    extra: Sequence[int] = (),
) -> list[list[int]]:
    """Group all examples (plus ``extra`` repeats), in random order, into dialogues.

    Each exchange continues the current dialogue with probability ``share`` (if the dialogue
    stays within ``max_tokens``), else starts a new one. A dialogue is
    ``format_prompt([u1, a1, u2, a2, ...])``, whose tokens are exactly its exchanges' tokens one
    after the other (each turn starts with ``<s>``, a special token), so this costs no extra
    tokens and teaches the model to answer the newest question whatever came before it, as it
    must in a chat thread.
    """
    order = [*range(len(examples)), *extra]
    rng.shuffle(order)
    dialogues: list[list[int]] = []
    length = 0
    for index in order:
        size = len(examples[index].input_ids)
        if dialogues and length + size <= max_tokens and rng.random() < share:
            dialogues[-1].append(index)
            length += size
        else:
            dialogues.append([index])
            length = size
    return dialogues


def make_batches(
    examples: Sequence[Example],
    dialogues: Sequence[list[int]],
    batch_tokens: int,
    rng: random.Random,
) -> list[list[list[int]]]:
    """Length-bucketed batches of dialogues, in a fresh random order each call.

    A stable sort by length of already shuffled dialogues groups equal lengths together in
    random order, so there is almost no padding; each batch holds at most ``batch_tokens``
    padded tokens.
    """

    def length(dialogue: list[int]) -> int:
        return sum(len(examples[i].input_ids) for i in dialogue)

    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    for dialogue in sorted(dialogues, key=length):
        if current and (len(current) + 1) * length(dialogue) > batch_tokens:
            batches.append(current)
            current = []
        current.append(dialogue)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(
    examples: Sequence[Example], batch: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch of dialogues; returns (input_ids, targets, owners).

    ``owners`` holds, per position, the index of the example it belongs to (-1 on padding).
    Right padding needs no attention mask: with causal attention a real token never sees the
    padding after it, and padded positions have IGNORE_INDEX targets.
    """
    rows = [[examples[i] for i in dialogue] for dialogue in batch]
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    owners = torch.full((len(batch), width), -1, dtype=torch.long)
    for row, dialogue in enumerate(batch):
        start = 0
        for index in dialogue:
            example = examples[index]
            end = start + len(example.input_ids)
            input_ids[row, start:end] = torch.tensor(example.input_ids)
            targets[row, start:end] = torch.tensor(example.targets)
            owners[row, start:end] = index
            start = end
    return input_ids, targets, owners
