"""How replies are decoded (:class:`GenerationSettings`) and cut at stop strings (StopCutter).

Shared by the local model (:mod:`model.local_model`), its batch scheduler and the remote
backend, so every path decodes and cuts replies alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from model.prompt import ReplyCleaner


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How replies are decoded; the defaults are greedy decoding with no extra stops.

    Raises ValueError for a value transformers would reject or misuse.
    """

    #: 0: greedy (deterministic); above 0: sampling, hotter is more varied.
    temperature: float = 0.0
    #: Nucleus sampling: sample from the fewest tokens whose probability reaches this (1: all).
    top_p: float = 1.0
    #: Above 1 discourages repeating tokens already in the prompt or reply (1: off).
    repetition_penalty: float = 1.0
    #: Text that ends the reply, itself left out (on top of the template's control strings).
    stop_strings: tuple[str, ...] = ()
    #: Generate exactly the token limit, past any stop token (benchmarks: a fixed reply length).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0, not {self.repetition_penalty}")
        if any(not stop for stop in self.stop_strings):
            raise ValueError("stop_strings must not hold an empty string")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``model.generate`` arguments for these settings (none of the stops)."""
        kwargs: dict[str, Any] = {"do_sample": self.sampling}
        if self.sampling:  # transformers warns about sampling arguments given to greedy search
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


class StopCutter:
    """Cuts text, also arriving piece by piece, before the first of some stop strings.

    Unlike :class:`model.prompt.ReplyCleaner` (control strings, whose fragments are never
    text), a possible start of a stop string still held back when the reply ends is text
    (``pass`` is not ``password``) and is given back by :meth:`finish`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._longest = max((len(stop) for stop in self.stops), default=0)
        self._held = ""
        self._cut = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show now."""
        if self._cut or not self.stops:
            return "" if self._cut else text
        text = self._held + text
        self._held = ""
        found = [index for stop in self.stops if (index := text.find(stop)) >= 0]
        if found:
            self._cut = True
            return text[: min(found)]
        for length in range(min(len(text), self._longest - 1), 0, -1):
            if any(stop.startswith(text[-length:]) for stop in self.stops):
                self._held = text[-length:]
                return text[:-length]
        return text

    @property
    def stopped(self) -> bool:
        """A stop string was found: nothing more is text of the reply."""
        return self._cut

    def finish(self) -> str:
        """What was held back: the reply ended before it became a stop string."""
        held, self._held = self._held, ""
        return "" if self._cut else held

    def cut(self, text: str) -> str:
        """``text`` before its first stop string (a whole reply)."""
        return self.feed(text) + self.finish()


class ReplyFilter:
    """What of a generated reply a user may see, whole or piece by piece: cut before the first
    control string (:class:`model.prompt.ReplyCleaner`), then before the first stop string
    (:class:`StopCutter`). Feeding the pieces and then :meth:`finish` gives :meth:`cut` of their
    concatenation."""

    def __init__(self, *, controls: Iterable[str], stops: Sequence[str]) -> None:
        self._cleaner = ReplyCleaner(controls)
        self._stops = StopCutter(stops)

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to show now."""
        return self._stops.feed(self._cleaner.feed(text))

    def finish(self) -> str:
        """What was held back and turned out to be text."""
        return self._stops.feed(self._cleaner.finish()) + self._stops.finish()

    @property
    def stopped(self) -> bool:
        """A stop string was found: nothing more is text of the reply."""
        return self._stops.stopped

    def cut(self, text: str) -> str:
        """A whole reply, filtered."""
        return self.feed(text) + self.finish()
