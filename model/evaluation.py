"""The evaluation gate: a trained candidate against the serving model, on three sets.

- ``new``: the exchanges just taught. Did it learn them?
- ``held_out``: a fixed split of earlier exchanges never trained on (when there is enough
  data). Does it generalise? Loss is reported too.
- ``regression``: a fixed set of starter-corpus questions. Did it forget?

Each set reports the share answered with the expected answer, exactly and after
:func:`normalise` (case, punctuation, whitespace). Answers come from the batched model service
(every question of a set submitted at once), so evaluating the default model takes seconds.
The candidate is promoted only if it learned the new exchanges (:attr:`Gate.learned`) and is no
worse than the serving model beyond :attr:`Gate.margin` on the other two sets.
"""

from __future__ import annotations

import asyncio
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: (conversation before the answer, expected answer)
Case = tuple[Sequence[Mapping[str, str]], str]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}‘’“”…–—]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """``text`` compared loosely: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCTUATION.sub("", folded)).strip()


@dataclass(frozen=True, kw_only=True)
class SetScore:
    """How one model did on one set."""

    total: int
    exact: int
    normalised: int
    loss: float | None = None

    @property
    def exact_share(self) -> float:
        return self.exact / self.total if self.total else 0.0

    @property
    def normalised_share(self) -> float:
        return self.normalised / self.total if self.total else 0.0

    def describe(self) -> str:
        if not self.total:
            return "-"
        text = f"{self.exact}/{self.total} exact, {self.normalised}/{self.total} normalised"
        return text if self.loss is None else f"{text}, loss {self.loss:.3f}"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The serving model (``before``) and the candidate (``after``) on the same sets."""

    before: dict[str, SetScore]
    after: dict[str, SetScore]

    def table(self) -> str:
        """A small fixed-width table for chat and the CLI."""
        rows = [("set", "serving model", "candidate")]
        for name in self.after:
            rows.append((name, self.before[name].describe(), self.after[name].describe()))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            side: {
                name: {
                    "total": score.total,
                    "exact": score.exact,
                    "normalised": score.normalised,
                    "loss": score.loss,
                }
                for name, score in scores.items()
            }
            for side, scores in (("before", self.before), ("after", self.after))
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(
            before={name: SetScore(**score) for name, score in data["before"].items()},
            after={name: SetScore(**score) for name, score in data["after"].items()},
        )


@dataclass(frozen=True, kw_only=True)
class Gate:
    """When a candidate may serve (settings RETRAIN_LEARNED_SHARE, RETRAIN_MARGIN)."""

    #: Share of the new exchanges it must answer (normalised).
    learned: float = 0.9
    #: How much worse than the serving model it may be on held-out and regression (a share).
    margin: float = 0.02

    def decide(self, comparison: Comparison) -> tuple[bool, str]:
        """(promote?, why)."""
        new = comparison.after.get("new")
        if new is not None and new.total and new.normalised_share < self.learned:
            return False, (
                f"it learned {new.normalised}/{new.total} new exchanges, "
                f"below the {self.learned:.0%} required"
            )
        for name in ("held_out", "regression"):
            before, after = comparison.before.get(name), comparison.after.get(name)
            if before is None or after is None or not after.total:
                continue
            if after.normalised_share < before.normalised_share - self.margin - 1e-9:
                return False, (
                    f"it answers the {name.replace('_', '-')} set worse: "
                    f"{after.normalised}/{after.total} against {before.normalised}/{before.total}"
                )
        return True, "it learned the new exchanges and kept what the serving model knew"


async def score(generator: Any, cases: Sequence[Case], *, max_new_tokens: int = 96) -> SetScore:
    """Ask ``generator`` (anything with the model service's ``generate``) every case at once."""
    if not cases:
        return SetScore(total=0, exact=0, normalised=0)
    replies = await asyncio.gather(
        *(
            generator.generate(messages=list(messages), max_new_tokens=max_new_tokens)
            for messages, _ in cases
        )
    )
    exact = sum(
        reply.text.strip() == expected.strip()
        for reply, (_, expected) in zip(replies, cases, strict=True)
    )
    loose = sum(
        normalise(reply.text) == normalise(expected)
        for reply, (_, expected) in zip(replies, cases, strict=True)
    )
    return SetScore(total=len(cases), exact=exact, normalised=loose)


def answer_loss(local: Any, cases: Sequence[Case]) -> float | None:
    """Mean cross-entropy of the expected answers' tokens (what :mod:`model.train` trains on)."""
    import torch

    from model.train_examples import IGNORE_INDEX, encode_exchange

    total = 0.0
    tokens = 0
    model = local.model
    with torch.inference_mode():
        for messages, expected in cases:
            example = encode_exchange(
                local, [*messages, {"role": "assistant", "content": expected}]
            )
            if example is None:
                continue
            ids = torch.tensor([example.input_ids], device=local.device)
            labels = torch.tensor([example.labels], device=local.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = labels[0, 1:]
            keep = targets != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            total += float(loss)
            tokens += int(keep.sum())
    return total / tokens if tokens else None


async def evaluate(
    generator: Any, sets: Mapping[str, Sequence[Case]], *, local: Any | None = None
) -> dict[str, SetScore]:
    """Score ``generator`` on each set; the held-out set's loss too when ``local`` is given."""
    scores: dict[str, SetScore] = {}
    for name, cases in sets.items():
        result = await score(generator, cases)
        if name == "held_out" and local is not None and cases:
            loss = await asyncio.to_thread(answer_loss, local, cases)
            result = SetScore(
                total=result.total, exact=result.exact, normalised=result.normalised, loss=loss
            )
        scores[name] = result
    return scores
