from __future__ import annotations

import pytest

from bot.replies import split_reply


def test_short_text_is_one_chunk() -> None:
    assert split_reply("  hello there  ", limit=2000) == ["hello there"]
    assert split_reply("   ", limit=10) == []


def test_cuts_at_paragraphs_first() -> None:
    first, second = "a" * 30, "b" * 30
    assert split_reply(f"{first}\n\n{second}", limit=40) == [first, second]
    assert split_reply(f"{first[:10]}\n\n{second[:10]}", limit=40) == [
        f"{first[:10]}\n\n{second[:10]}"
    ]


def test_cuts_long_paragraphs_at_sentence_ends() -> None:
    text = "One sentence here. Another one there! A third? Yes."
    chunks = split_reply(text, limit=20)
    assert chunks == ["One sentence here.", "Another one there!", "A third? Yes."]


def test_cuts_words_only_when_a_word_is_longer_than_the_limit() -> None:
    chunks = split_reply("tiny " + "x" * 25 + " end", limit=10)
    assert chunks == ["tiny", "x" * 10, "x" * 10, "x" * 5 + " end"]


@pytest.mark.parametrize("limit", [40, 2000, 4000])
def test_every_chunk_fits_and_nothing_is_lost(limit: int) -> None:
    text = "\n\n".join(
        " ".join(f"Sentence {p}-{s} has some words in it." for s in range(40)) for p in range(30)
    )
    chunks = split_reply(text, limit=limit)
    assert all(0 < len(chunk) <= limit for chunk in chunks)
    assert "".join(chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace(
        "\n", ""
    )
