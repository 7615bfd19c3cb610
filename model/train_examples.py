"""The examples a fine-tuning trains on: encoded as the model is served, and batched.

An :class:`Example` is one conversation as :meth:`model.local_model.LocalModel.fit_prompt` gives
it to the served model, with the loss on the answer only (:func:`encode_exchange`); the batches
are packed when the model computes packed rows exactly (:func:`collator_for`), else padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.prompt import PromptFormatError

#: Label value the loss skips.
IGNORE_INDEX = -100

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized training conversation: ids, and labels that are -100 but on the answer."""

    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def features(self) -> dict[str, list[int]]:
        """The example as a collator takes it."""
        return {"input_ids": self.input_ids, "labels": self.labels}


def encode_exchange(local: Any, messages: Messages, *, system_prompt: str = "") -> Example | None:
    """``messages`` (ending with the assistant's answer) as the served model sees it, with the
    loss on the answer and its eos only; ``None`` when it does not fit the context window whole
    or is no dialogue."""
    *before, answer = [{"role": m["role"], "content": m["content"]} for m in messages]
    if answer["role"] != "assistant" or not answer["content"].strip():
        return None
    if system_prompt and (not before or before[0]["role"] != "system"):
        before.insert(0, {"role": "system", "content": system_prompt})
    encoder = local.prompt_encoder
    answer_length = len(encoder.encode_text(answer["content"])) + 2
    try:
        fitted = local.fit_prompt(before, max_new_tokens=min(answer_length, local.context_window))
    except (PromptFormatError, ValueError):
        return None
    if fitted.cut_newest:  # its question was cut in the middle: no whole example to learn from
        return None
    prompt = list(fitted.token_ids)
    full = encoder.encode([*fitted.messages, answer])
    if full[: len(prompt)] != prompt or len(full) > local.context_window:
        return None
    return Example(input_ids=full, labels=[IGNORE_INDEX] * len(prompt) + full[len(prompt) :])


class PaddingCollator:
    """Right-pads a batch: pad id in ``input_ids``, 0 in the attention mask, -100 in labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max((len(f["input_ids"]) for f in features), default=0)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            mask[row, :length] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator:
    """Padding-free batches: the batch's examples end to end in one row, positions restarting
    at each example (transformers' :class:`DataCollatorWithFlattening`). transformers builds a
    block-diagonal causal mask from those positions, so each example attends to itself alone,
    as in a padded row (:func:`packing_is_exact` checks the model at hand does).

    Why: exchanges differ in length by an order of magnitude, so padded batches were mostly
    padding. On the retrain benchmark's 6,000 examples (one thread, batches of 16, 2026-12-02),
    65% of a padded batch was padding; packed batches trained 8,517 real tokens/s against
    2,570. Grouping by length padded as little but made batches of one kind (the new exchanges
    are all alike in length): the tiny model taught 3 answers learned 0 of them, 3 of 3 packed.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening()

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.flatten(features))
        # transformers makes the packed mask only without a KV cache, and a model in training
        # builds one unless told not to: examples would attend to one another.
        batch["use_cache"] = False
        return batch


def packing_is_exact(model: Any, features: list[dict[str, list[int]]]) -> bool:
    """Whether ``model`` computes packed rows as it does padded ones (every example in its own
    attention): the logits of ``features`` packed against each one alone."""
    import torch

    features = [f for f in features if f["input_ids"]][:3]
    if len(features) < 2:
        return True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = PackedCollator()(features)
            packed.pop("labels")
            row = model(**packed).logits[0]
            start = 0
            for feature in features:
                ids = torch.tensor([feature["input_ids"]], device=row.device)
                alone = model(input_ids=ids, use_cache=False).logits[0]
                end = start + len(feature["input_ids"])
                if not torch.allclose(row[start:end], alone, atol=1e-3, rtol=1e-3):
                    return False
                start = end
    finally:
        model.train(was_training)
    return True


def collator_for(model: Any, examples: Sequence[Example], *, pad_id: int) -> Any:
    """The batches ``model`` trains on: packed when it computes them exactly (checked on the
    first few ``examples``), else padded."""
    if packing_is_exact(model, [example.features() for example in examples[:3]]):
        return PackedCollator()
    return PaddingCollator(pad_id)


class ExampleDataset:
    """The examples as a dataset of collator features (what the Trainer takes)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index].features()
