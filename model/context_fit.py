"""Fit a conversation into a token budget: the system prompt, the newest whole turns, the question.

:func:`fit_prompt` picks what to prompt with when a conversation is longer than the model can read
at once (issue #10, "History fits the context window by token count"):

- The system prompt and the newest user message always stay; then whole earlier user/assistant
  pairs, newest first, as long as they fit. The oldest go, never half a turn, so the prompt still
  alternates and starts with a user turn.
- A newest user message that does not fit even alone (with the system prompt) is cut from the
  middle: its beginning and its end (where the question usually is) stay, joined by
  :data:`MARKER`. A system prompt that leaves no room at all for it is dropped, with a warning.
- Tokens are counted once per message, newest first, and summed; nothing re-tokenizes the whole
  conversation per candidate, so a history a hundred times the window costs no more than the
  part of it that fits. One full :meth:`PromptEncoder.encode` of the chosen messages then checks
  the sum and gives the prompt's ids.

Why the sum is (almost) exact: :class:`~model.prompt_encoding.PromptEncoder` encodes the text
between control tokens as separate runs, and every turn is bounded by control tokens (``<s>``,
``[INST]``, ``[/INST]``, ``</s>``), so a conversation's ids are its turns' ids laid end to end
whenever each control string has a token of its own (the default tokenizer has them all). The
one run two messages share is the system block's end joined to the first user turn
(``"\\n\\n" + content``), a few tokens' difference, which the full check settles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from model.prompt import PromptFormatError, neutralise, prompt_segments
from model.prompt_encoding import PromptEncoder

logger = logging.getLogger(__name__)

#: Stands for the left-out middle of a newest message too long to read whole.
MARKER: Final = " […] "
#: How many tokens a pair may add less than its own count (joined to the system block) and
#: still be tried: at most one full encode more per fit.
JOIN_SLACK: Final = 8
#: The smallest budget :func:`fit_prompt` accepts: a turn's frame alone takes a few tokens.
MIN_BUDGET: Final = 8

_DROPPED_NOTE: Final = (
    "(Older messages of this conversation were left out: it is longer than I can read at once.)"
)
_CUT_NOTE: Final = (
    "(Your message is longer than I can read at once, so I read only its beginning and its end.)"
)
_CUT_AND_DROPPED_NOTE: Final = (
    "(Your message is longer than I can read at once, so I read only its beginning and its end, "
    "and none of the earlier conversation.)"
)

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    """What to prompt with, and what had to be left out for it to fit."""

    #: The prompt's messages: the system prompt (unless it alone overflowed), the newest whole
    #: turns, the newest user message (cut in the middle when :attr:`cut_newest`).
    messages: list[Message]
    #: ``encoder.encode(messages)``: the prompt's token ids, at most the budget.
    token_ids: list[int]
    #: Earlier messages left out for lack of room (0: none). Those beyond ``history_pairs`` are
    #: not counted: leaving them out is the model's declared way of reading, not a shortage.
    dropped_messages: int
    #: The newest user message was too long and only its beginning and end were kept.
    cut_newest: bool

    @property
    def note(self) -> str:
        """One short sentence for the user when something was left out, else ``""``."""
        if self.cut_newest:
            return _CUT_AND_DROPPED_NOTE if self.dropped_messages else _CUT_NOTE
        return _DROPPED_NOTE if self.dropped_messages else ""


def fit_prompt(
    messages: Sequence[Mapping[str, str]],
    *,
    encoder: PromptEncoder,
    budget: int,
    history_pairs: int | None = None,
) -> FittedPrompt:
    """The newest part of ``messages`` whose prompt is at most ``budget`` tokens.

    ``messages`` is a dialogue as :func:`model.prompt.format_prompt` takes it (an optional system
    message, then user/assistant turns) ending with the user message to answer.
    ``history_pairs`` caps the earlier user/assistant pairs kept (None: as many as fit; 0:
    none), as :attr:`model.local_model.LocalModel.history_pairs` does. See the module docstring for
    the rules.

    Raises:
        PromptFormatError: not a dialogue ending with a user message (no messages at all, say).
        ValueError: ``budget`` is under :data:`MIN_BUDGET`, or too small for even an empty turn.
    """
    if budget < MIN_BUDGET:
        raise ValueError(f"a prompt budget of {budget} tokens leaves no room for a prompt")
    copies = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt_segments(copies)  # validates the roles; raises PromptFormatError
    if copies[-1]["role"] != "user":
        raise PromptFormatError("the last message must be a user message")
    system = copies[:1] if copies[0]["role"] == "system" else []
    history = copies[len(system) : -1]  # whole (user, assistant) pairs, oldest first
    if history_pairs is not None:
        history = history[len(history) - 2 * history_pairs :] if history_pairs > 0 else []
    last = copies[-1]

    # The newest message's text alone, encoded once: a huge one is never encoded again whole.
    content_ids = encoder.encode_text(neutralise(last["content"]).strip())
    alone = encoder.encode([*system, last]) if len(content_ids) <= budget else None
    if system and (alone is None or len(alone) > budget):
        room = budget - len(encoder.encode([*system, {"role": "user", "content": ""}]))
        if room < budget // 4:  # next to nothing of the question would be left
            _warn_system_dropped(budget)
            system = []
            alone = encoder.encode([last]) if len(content_ids) <= budget else None
    if alone is None or len(alone) > budget:
        return _cut_newest(encoder, system, content_ids, budget, dropped=len(history))
    return _fit_history(encoder, system, history, last, budget, alone=len(alone))


def _fit_history(
    encoder: PromptEncoder,
    system: list[Message],
    history: list[Message],
    last: Message,
    budget: int,
    *,
    alone: int,
) -> FittedPrompt:
    """System, as many of the newest whole pairs of ``history`` as fit, and ``last`` (it fits)."""
    pairs = len(history) // 2
    costs: list[int] = []  # costs[k]: tokens of the k-th newest pair on its own, counted once

    def cost(k: int) -> int:
        while len(costs) <= k:
            start = len(history) - 2 * (len(costs) + 1)
            costs.append(len(encoder.encode(history[start : start + 2])))
        return costs[k]

    def prompt(kept: int) -> list[Message]:
        return [*system, *history[len(history) - 2 * kept :], last] if kept else [*system, last]

    kept, total = 0, alone
    while kept < pairs and total + cost(kept) <= budget:
        total += cost(kept)
        kept += 1
    ids = encoder.encode(prompt(kept))
    too_many = pairs + 1  # the fewest pairs known not to fit
    while len(ids) > budget and kept > 0:  # the system block joined to a new first turn
        too_many, excess = kept, len(ids) - budget
        while excess > 0 and kept > 0:
            kept -= 1
            excess -= cost(kept)
        ids = encoder.encode(prompt(kept))
    # The sum can also overcount by those few tokens: try the next older pair when it may fit.
    while kept + 1 < too_many and kept < pairs and len(ids) + cost(kept) <= budget + JOIN_SLACK:
        bigger = encoder.encode(prompt(kept + 1))
        if len(bigger) > budget:
            break
        ids, kept = bigger, kept + 1
    dropped = 2 * (pairs - kept)
    if dropped:
        logger.info("left out the %d oldest messages to fit a %d-token budget", dropped, budget)
    return FittedPrompt(
        messages=prompt(kept), token_ids=ids, dropped_messages=dropped, cut_newest=False
    )


def _cut_newest(
    encoder: PromptEncoder, system: list[Message], ids: list[int], budget: int, *, dropped: int
) -> FittedPrompt:
    """The newest message, ``ids``, cut from the middle to fit ``budget`` with ``system``, or
    without it if need be."""
    fitted = _cut_middle(encoder, system, ids, budget) if system else None
    if fitted is None:
        if system:
            _warn_system_dropped(budget)
        fitted = _cut_middle(encoder, [], ids, budget)
    if fitted is None:  # not even the marker fits: an empty turn
        fitted = (
            [{"role": "user", "content": ""}],
            encoder.encode([{"role": "user", "content": ""}]),
        )
        if len(fitted[1]) > budget:
            raise ValueError(f"a prompt budget of {budget} tokens is too small for an empty turn")
    prompt, prompt_ids = fitted
    logger.warning(
        "the last user message (%d tokens) overflows the %d-token budget; "
        "kept its beginning and end (%d characters)",
        len(ids),
        budget,
        len(prompt[-1]["content"]),
    )
    return FittedPrompt(
        messages=prompt, token_ids=prompt_ids, dropped_messages=dropped, cut_newest=True
    )


def _warn_system_dropped(budget: int) -> None:
    logger.warning("the system message leaves no room in the %d-token budget; dropped it", budget)


def _cut_middle(
    encoder: PromptEncoder, system: list[Message], ids: list[int], budget: int
) -> tuple[list[Message], list[int]] | None:
    """``system`` and a user turn of ``ids``' first and last tokens around :data:`MARKER`.

    Keeps as many tokens as fit ``budget``, half from each end; None where not even the marker
    alone fits. Each try encodes only the candidate turn, at most ``budget`` tokens long.
    """
    decode = encoder.tokenizer.decode
    frame = len(encoder.encode([*system, {"role": "user", "content": MARKER}]))
    keep = min(len(ids) - 1, budget - frame)
    while keep >= 0:
        head_count = keep // 2
        tail_count = keep - head_count
        head = decode(ids[:head_count], skip_special_tokens=True) if head_count else ""
        tail = decode(ids[len(ids) - tail_count :], skip_special_tokens=True) if tail_count else ""
        prompt = [*system, {"role": "user", "content": f"{head.rstrip()}{MARKER}{tail.lstrip()}"}]
        prompt_ids = encoder.encode(prompt)
        if len(prompt_ids) <= budget:
            return prompt, prompt_ids
        if keep == 0:
            return None
        keep = max(0, keep - max(1, len(prompt_ids) - budget))
    return None
