"""Cutting long replies to a platform's message size."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def split_reply(text: str, *, limit: int) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters.

    Cuts at paragraph breaks first, then sentence ends, then spaces; only a single word longer
    than ``limit`` is cut mid-word. Joining the chunks with the whitespace they were cut at gives
    the text back, up to the whitespace at the cuts.
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    chunks: list[str] = []
    for separator, piece in _pieces(text, limit):
        if chunks and len(chunks[-1]) + len(separator) + len(piece) <= limit:
            chunks[-1] += separator + piece
        else:
            chunks.append(piece)
    return chunks


def _pieces(text: str, limit: int) -> list[tuple[str, str]]:
    """(separator, piece): paragraphs, or their sentences, or their words, each within limit."""
    pieces: list[tuple[str, str]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        units = [paragraph] if len(paragraph) <= limit else _split_sentences(paragraph, limit)
        for index, unit in enumerate(units):
            pieces.append(("\n\n" if index == 0 else " ", unit.strip()))
    return pieces


def _split_sentences(paragraph: str, limit: int) -> list[str]:
    units: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if len(sentence) <= limit:
            units.append(sentence)
            continue
        current = ""
        for word in sentence.split():
            while len(word) > limit:
                if current:
                    units.append(current)
                    current = ""
                units.append(word[:limit])
                word = word[limit:]
            if current and len(current) + 1 + len(word) > limit:
                units.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if current:
            units.append(current)
    return units
