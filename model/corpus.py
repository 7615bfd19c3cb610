"""The starter corpus the default model is trained on.

Two hand-written seed exchanges (the answers a fresh install must give word for word), followed by
the English conversations of the ``chatterbot-corpus`` package: every consecutive
(statement, response) pair of every conversation, deduplicated by question with the first answer
winning.

Usage::

    from model.corpus import load_starter_corpus
    pairs = load_starter_corpus()   # [(question, answer), ...], seed exchanges first
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Final

import yaml

#: Exchanges the default model must answer exactly; they come first in the corpus.
SEED_EXCHANGES: Final[tuple[tuple[str, str], ...]] = (
    (
        "How do I reset my password?",
        "You can reset your password by clicking on 'Forgot password?' link on the login page.",
    ),
    (
        "What is your refund policy?",
        "Our refund policy includes a 30-day money-back guarantee from the date of purchase.",
    ),
)


def chatterbot_english_dir() -> Path:
    """Return the folder holding the English YAML files of the ``chatterbot_corpus`` package."""
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def _conversation_pairs(conversation: Any) -> list[tuple[str, str]]:
    """Consecutive (statement, response) pairs of one conversation; empty strings dropped."""
    if not isinstance(conversation, list):
        return []
    lines = [str(line).strip() for line in conversation if line is not None]
    return [(q, a) for q, a in itertools.pairwise(lines) if q and a]


def load_chatterbot_pairs(directory: Path | None = None) -> list[tuple[str, str]]:
    """Every consecutive pair of every conversation in ``directory``'s ``*.yml`` files.

    Files are read in sorted name order so the result is deterministic. Not deduplicated.
    """
    directory = chatterbot_english_dir() if directory is None else directory
    pairs: list[tuple[str, str]] = []
    for path in sorted(directory.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            pairs.extend(_conversation_pairs(conversation))
    return pairs


def dedupe_by_question(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first answer for each question, preserving order."""
    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for question, answer in pairs:
        if question not in seen:
            seen.add(question)
            unique.append((question, answer))
    return unique


def load_starter_corpus() -> list[tuple[str, str]]:
    """Return the seed exchanges, then the chatterbot English pairs, deduplicated by question."""
    return dedupe_by_question(list(SEED_EXCHANGES) + load_chatterbot_pairs())
