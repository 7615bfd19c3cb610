"""Replies end where a new turn would start, and no control fragment ever reaches the user.

Generation stops at any control token (``[INST]``: the model starting a user turn of its own),
and the text is cut at the first control string spelled out in plain text; a trailing partial
one (``[/INS`` when the token budget runs out) is dropped. The streamed pieces get the same
cleaning, also when a fragment is split across two of them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from model.prompt import CONTROL_STRINGS, ReplyCleaner, clean_reply
from model.service import LocalModel, ModelService
from tests.model.test_prompt_encoding import normalising_tokenizer

# --- the cleaning function ------------------------------------------------------------------

CLEANED = [
    ("Plain answer.", "Plain answer."),
    ("Sure. [INST] And now I ask", "Sure. "),
    ("Done </s><s>[INST] next", "Done "),
    ("a [/INST] b", "a "),
    ("<<SYS>>\nsecret", ""),
    ("x <</SYS>> y", "x "),
    ("<s>", ""),
    ("Answer [/INS", "Answer "),  # a partial control string at the end
    ("Answer <</SY", "Answer "),
    ("Answer </", "Answer "),
    ("Answer [I", "Answer "),
    ("See [1] and [2], a<b, x > y, <b>bold</b>, [INSTALL] [/usr]", None),  # all kept
    ("Lists: [", None),  # a lone bracket at the end is punctuation, not a fragment
    ("a < b <", None),
    ("[\u200bINST] is how the prompt writes it", None),  # the neutralised form is text
    ("<ss> </ss> [INS T]", None),
]


@pytest.mark.parametrize(("text", "expected"), CLEANED)
def test_clean_reply(text: str, expected: str | None) -> None:
    assert clean_reply(text) == (text if expected is None else expected)


@pytest.mark.parametrize(("text", "expected"), CLEANED)
def test_streamed_pieces_are_cleaned_like_the_whole(text: str, expected: str | None) -> None:
    whole = text if expected is None else expected
    for cut in range(len(text) + 1):  # every split into two pieces
        cleaner = ReplyCleaner()
        pieces = [cleaner.feed(text[:cut]), cleaner.feed(text[cut:]), cleaner.finish()]
        assert "".join(pieces) == whole, cut
        for piece in pieces:
            assert not any(control in piece for control in CONTROL_STRINGS)


def test_random_chunking_never_leaks_a_fragment() -> None:
    rng = random.Random(3)
    words = ["ok", " ", "[1]", "<b>", "[", "<", "/", "INST", "]", "s>", "SYS>>", "\n", "<<"]
    words += list(CONTROL_STRINGS)
    for _ in range(2000):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))
        cleaner = ReplyCleaner()
        pieces: list[str] = []
        rest = text
        while rest:
            size = rng.randrange(1, 6)
            pieces.append(cleaner.feed(rest[:size]))
            rest = rest[size:]
        pieces.append(cleaner.finish())
        joined = "".join(pieces)
        assert joined == clean_reply(text), text
        assert text.startswith(joined)
        assert not any(control in joined for control in CONTROL_STRINGS), text
        if not any(control in text for control in CONTROL_STRINGS):
            # All of it, less at most a started control string at its very end.
            dropped = text[len(joined) :]
            assert not dropped or (
                len(dropped) >= 2 and any(dropped in prefixes(c) for c in CONTROL_STRINGS)
            ), text
            ends = [p for c in CONTROL_STRINGS for p in prefixes(c) if text.endswith(p)]
            if any(len(p) >= 2 for p in ends):
                assert dropped == max(ends, key=len), text


def prefixes(control: str) -> list[str]:
    return [control[:n] for n in range(1, len(control))]


def test_a_piece_after_the_cut_is_dropped() -> None:
    cleaner = ReplyCleaner()
    assert cleaner.feed("Hi [INST]") == "Hi "
    assert cleaner.feed(" more text") == ""
    assert cleaner.finish() == ""


def test_a_held_back_start_is_released_when_it_turns_out_to_be_text() -> None:
    cleaner = ReplyCleaner()
    assert cleaner.feed("see <") == "see "
    assert cleaner.feed("<") == ""
    assert cleaner.feed("b") == "<<b"
    assert cleaner.feed(" [/") == " "
    assert cleaner.feed("usr]") == "[/usr]"
    assert cleaner.finish() == ""


# --- generation stops at [INST], with the real tiny model ------------------------------------


@pytest.fixture(scope="module")
def local_model(tiny_model_dir: Path) -> LocalModel:
    return LocalModel.load(tiny_model_dir, device="cpu")


class Script:
    """Forces the model to produce ``ids`` (then ``</s>``), one per forward pass."""

    def __init__(self, model: LocalModel, ids: list[int]) -> None:
        self.ids = [*ids, model.tokenizer.eos_token_id]
        self.steps = 0
        self.handle = model.model.lm_head.register_forward_hook(self.hook)

    def hook(self, _module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(output, -1e4)
        forced[:, -1, self.ids[min(self.steps, len(self.ids) - 1)]] = 0.0
        self.steps += 1
        return forced

    def __enter__(self) -> Script:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.handle.remove()


def text_ids(model: LocalModel, text: str) -> list[int]:
    ids: list[int] = model.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ]
    return ids


def token_id(model: LocalModel, token: str) -> int:
    value: int = model.tokenizer.convert_tokens_to_ids(token)
    return value


MESSAGES = [{"role": "user", "content": "Hello"}]


async def streamed(model: LocalModel, *, max_new_tokens: int) -> list[str]:
    """The pieces a :class:`ModelService` serving ``model`` streams in answer to MESSAGES."""
    service = ModelService(model)
    try:
        stream = service.stream(messages=MESSAGES, max_new_tokens=max_new_tokens)
        return [piece async for piece in stream]
    finally:
        await service.aclose()


@pytest.mark.parametrize("control", ["[INST]", "<s>", "[/INST]", "<<SYS>>"])
def test_generation_stops_at_a_control_token(local_model: LocalModel, control: str) -> None:
    answer = text_ids(local_model, "Sure thing.")
    after = text_ids(local_model, " How do I reset my password? [/INST] Go to Settings")
    script = [*answer, token_id(local_model, control), *after]
    with Script(local_model, script) as forced:
        reply = local_model.generate_sync(messages=MESSAGES, max_new_tokens=64)
    assert reply == "Sure thing."
    assert forced.steps == len(answer) + 1  # it stopped at the control token itself


async def test_streaming_stops_at_inst(local_model: LocalModel) -> None:
    answer = text_ids(local_model, "Sure thing, here it is.")
    script = [*answer, token_id(local_model, "[INST]"), *text_ids(local_model, " Next question")]
    with Script(local_model, script) as forced:
        pieces = await streamed(local_model, max_new_tokens=64)
    assert "".join(pieces).strip() == "Sure thing, here it is."
    assert forced.steps == len(answer) + 1


@pytest.mark.parametrize(
    ("generated", "reply"),
    [
        ("Sure thing. [INST] What else? [/INST] More", "Sure thing."),  # spelled out as text
        ("Sure thing. </s><s>[INST] Next", "Sure thing."),
        ("Sure thing, see [1] and <b>this</b>.", "Sure thing, see [1] and <b>this</b>."),
    ],
)
async def test_control_strings_spelled_as_text_never_reach_the_user(
    local_model: LocalModel, generated: str, reply: str
) -> None:
    script = text_ids(local_model, generated)
    with Script(local_model, script):
        assert local_model.generate_sync(messages=MESSAGES, max_new_tokens=64) == reply
    with Script(local_model, script):
        pieces = await streamed(local_model, max_new_tokens=64)
    assert "".join(pieces).strip() == reply
    for piece in pieces:
        assert not any(control in piece for control in CONTROL_STRINGS)


async def test_a_partial_control_string_at_the_token_limit_is_dropped(
    local_model: LocalModel,
) -> None:
    script = text_ids(local_model, "The answer is here [/INS")
    with Script(local_model, script):
        reply = local_model.generate_sync(messages=MESSAGES, max_new_tokens=len(script))
    assert reply == "The answer is here"
    with Script(local_model, script):
        pieces = await streamed(local_model, max_new_tokens=len(script))
    assert "".join(pieces).strip() == "The answer is here"
    assert not any("[/" in piece for piece in pieces)


def test_without_control_tokens_generation_stops_at_the_text(
    local_model: LocalModel, tiny_model_dir: Path
) -> None:
    # A tokenizer with no [INST] token (like Llama-2's own): the model writes a new turn as
    # text, and generation stops there (stop strings), not at the token limit.
    tokenizer = normalising_tokenizer(tiny_model_dir, structure="none")
    model = LocalModel(local_model.model, tokenizer, version="no-structure", device="cpu")
    assert model.stop_strings == ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    answer = text_ids(model, "Sure thing.")
    new_turn = text_ids(model, " [INST] What now? [/INST] More and more and more")
    with Script(model, [*answer, *new_turn]) as forced:
        reply = model.generate_sync(messages=MESSAGES, max_new_tokens=64)
    assert reply == "Sure thing."
    inst = len(text_ids(model, " [INST]"))
    assert forced.steps == len(answer) + inst  # stopped at the last token of "[INST]"
