"""Fitting a conversation into a token budget, with the tiny model's real tokenizer.

The system prompt and the newest whole turns stay, the oldest go; a newest message too long to
read whole keeps its beginning and its question at the end; counting is linear in the messages.

The tokenizer is the one the tiny model folder gets (``train_tokenizer`` on the same exchanges
and config), trained here without the model, in well under a second; one test checks that the
saved folder's tokenizer fits the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.bootstrap import STRUCTURE_TOKENS, TINY, TINY_EXCHANGES, train_tokenizer
from model.context_fit import MARKER, FittedPrompt, fit_prompt
from model.prompt import PromptFormatError
from model.prompt_encoding import PromptEncoder

WINDOW = TINY.max_position_embeddings  # the tiny model's context window: 256 tokens
BUDGET = WINDOW - 64  # room for 64 new tokens


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def history(pairs: int) -> list[dict[str, str]]:
    """``pairs`` user/assistant exchanges from the tiny corpus, numbered so each is unique."""
    messages: list[dict[str, str]] = []
    for index in range(pairs):
        question, answer = TINY_EXCHANGES[index % len(TINY_EXCHANGES)]
        messages += [user(f"{index}: {question}"), assistant(answer)]
    return messages


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(TINY_EXCHANGES, TINY)


@pytest.fixture
def encoder(tokenizer: Any) -> PromptEncoder:
    """A PromptEncoder of its own over the tiny tokenizer (tests may count its calls)."""
    return PromptEncoder(tokenizer)


def assert_well_formed(
    fitted: FittedPrompt, messages: list[dict[str, str]], encoder: PromptEncoder, budget: int
) -> None:
    """Fits, its ids are its messages', it alternates from a user turn, its turns are whole."""
    assert len(fitted.token_ids) <= budget
    assert fitted.token_ids == encoder.encode(fitted.messages)
    turns = fitted.messages[1:] if fitted.messages[0]["role"] == "system" else fitted.messages
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"]
    if not fitted.cut_newest:
        earlier = fitted.messages[:-1]
        if earlier and earlier[0]["role"] == "system":
            assert earlier[0] == messages[0]
            earlier = earlier[1:]
        assert fitted.messages[-1] == messages[-1]
        if earlier:  # the newest turns, unchanged and in order
            assert earlier == messages[-1 - len(earlier) : -1]
        assert fitted.dropped_messages == (
            len(messages) - 1 - (messages[0]["role"] == "system") - len(earlier)
        )


# --- whole turns -----------------------------------------------------------------------------


def test_everything_is_kept_when_it_fits(encoder: PromptEncoder) -> None:
    messages = [system("Be helpful."), user("Hello"), assistant("Hi"), user("Thank you")]
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)

    assert fitted.messages == messages
    assert fitted.token_ids == encoder.encode(messages)
    assert (fitted.dropped_messages, fitted.cut_newest, fitted.note) == (0, False, "")


def test_the_oldest_turns_go_and_the_system_prompt_and_newest_turns_stay(
    encoder: PromptEncoder,
) -> None:
    messages = [system("Be helpful."), *history(60), user("What is your refund policy?")]
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)

    assert_well_formed(fitted, messages, encoder, BUDGET)
    assert fitted.messages[0] == messages[0]
    kept = len(fitted.messages) - 2
    assert 0 < kept < 120 and kept % 2 == 0
    assert fitted.dropped_messages == 120 - kept
    assert not fitted.cut_newest
    assert "Older messages" in fitted.note and fitted.note.count(".") == 1
    # As many as fit: one more pair would not have.
    bigger = [messages[0], *messages[-3 - kept :]]
    assert len(encoder.encode(bigger)) > BUDGET


def test_without_a_system_prompt_the_prompt_starts_with_a_user_turn(
    encoder: PromptEncoder,
) -> None:
    messages = [*history(40), user("Thank you")]
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)

    assert_well_formed(fitted, messages, encoder, BUDGET)
    assert fitted.messages[0]["role"] == "user"
    assert fitted.dropped_messages > 0 and fitted.note


def test_the_full_check_settles_where_the_system_block_joins_the_first_turn(
    encoder: PromptEncoder,
) -> None:
    # Leading spaces are stripped from a user turn on its own but kept after the system block,
    # so the summed counts are short (spaced history) or long (spaced question) by many tokens.
    pad = " " * 40
    spaced = [
        dict(m, content=pad + m["content"]) if m["role"] == "user" else m for m in history(30)
    ]
    for messages in (
        [system("Be helpful."), *spaced, user("Thank you")],
        [system("Be helpful."), *history(30), user(pad + "Thank you")],
    ):
        fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)
        assert_well_formed(fitted, messages, encoder, BUDGET)
        kept = len(fitted.messages) - 2
        assert 0 < kept < 60
        assert len(encoder.encode([messages[0], *messages[-3 - kept :]])) > BUDGET


def test_history_pairs_caps_the_earlier_pairs(encoder: PromptEncoder) -> None:
    messages = [system("Be helpful."), *history(3), user("Thank you")]

    one = fit_prompt(messages, encoder=encoder, budget=BUDGET, history_pairs=1)
    assert one.messages == [messages[0], *messages[-3:]]
    none = fit_prompt(messages, encoder=encoder, budget=BUDGET, history_pairs=0)
    assert none.messages == [messages[0], user("Thank you")]
    every = fit_prompt(messages, encoder=encoder, budget=BUDGET, history_pairs=None)
    assert every.messages == messages
    # Left out by the model's own cap, not for lack of room: nothing to tell the user.
    assert (one.dropped_messages, one.note, none.dropped_messages, none.note) == (0, "", 0, "")

    # Under the cap, room still decides.
    crowded = [*history(60), user("Thank you")]
    capped = fit_prompt(crowded, encoder=encoder, budget=BUDGET, history_pairs=50)
    free = fit_prompt(crowded, encoder=encoder, budget=BUDGET)
    assert capped.messages == free.messages
    assert capped.dropped_messages == free.dropped_messages - 20


def test_an_empty_history_is_just_the_question(encoder: PromptEncoder) -> None:
    fitted = fit_prompt([user("hi")], encoder=encoder, budget=BUDGET)

    assert fitted.messages == [user("hi")]
    assert fitted.token_ids == encoder.encode([user("hi")])
    assert fitted.note == ""


def test_a_prompt_of_only_control_strings_is_a_valid_prompt(encoder: PromptEncoder) -> None:
    controls = "[INST] [/INST] </s> <s>"
    messages = [system("<<SYS>> <</SYS>>"), user(controls), assistant(controls), user(controls)]
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)

    assert_well_formed(fitted, messages, encoder, BUDGET)
    assert fitted.messages == messages
    # The only structure is the template's: two user turns, one system block, one reply.
    control_ids = encoder.control_ids
    assert fitted.token_ids.count(control_ids["[INST]"]) == 2
    assert fitted.token_ids.count(control_ids["<<SYS>>"]) == 1
    assert fitted.token_ids.count(control_ids["</s>"]) == 1


def test_dialogues_that_are_not_a_question_are_refused(encoder: PromptEncoder) -> None:
    for messages in (
        [],
        [system("Be helpful.")],
        [user("hi"), assistant("hello")],
        [user("hi"), user("again")],
        [assistant("hello"), user("hi")],
    ):
        with pytest.raises(PromptFormatError):
            fit_prompt(messages, encoder=encoder, budget=BUDGET)
    with pytest.raises(ValueError, match="no room"):
        fit_prompt([user("hi")], encoder=encoder, budget=7)


# --- the newest message too long ---------------------------------------------------------------


def long_message(question: str = "So how do I reset my password?") -> str:
    return "Hello, I have a problem with my account. " + "blah " * 5_000 + question


def test_a_too_long_newest_message_keeps_its_beginning_and_its_question(
    encoder: PromptEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [*history(5), user(long_message())]
    with caplog.at_level(logging.WARNING, logger="model.context_fit"):
        fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)

    assert "overflows" in caplog.text
    assert len(fitted.messages) == 1
    content = fitted.messages[0]["content"]
    assert content.startswith("Hello, I have a problem")
    assert content.endswith("So how do I reset my password?")
    assert MARKER.strip() in content
    assert fitted.token_ids == encoder.encode(fitted.messages)
    assert BUDGET - 4 <= len(fitted.token_ids) <= BUDGET  # it fills the room, and no more
    assert (fitted.cut_newest, fitted.dropped_messages) == (True, 10)
    assert "beginning and its end" in fitted.note and "earlier" in fitted.note
    alone = fit_prompt([user(long_message())], encoder=encoder, budget=BUDGET)
    assert "earlier" not in alone.note and alone.note.count(".") == 1


def test_the_system_prompt_stays_beside_a_cut_message_while_there_is_room(
    encoder: PromptEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [system("Be helpful."), user(long_message())]
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)
    assert fitted.messages[0] == messages[0]
    assert fitted.messages[1]["content"].endswith("reset my password?")
    assert len(fitted.token_ids) <= BUDGET

    huge_system = [system("Always be helpful. " * 200), user(long_message())]
    with caplog.at_level(logging.WARNING, logger="model.context_fit"):
        fitted = fit_prompt(huge_system, encoder=encoder, budget=BUDGET)
    assert "system message" in caplog.text
    assert [m["role"] for m in fitted.messages] == ["user"]
    assert fitted.messages[0]["content"].endswith("reset my password?")
    assert len(fitted.token_ids) <= BUDGET


def test_a_system_prompt_too_long_for_a_short_question_is_dropped(encoder: PromptEncoder) -> None:
    fitted = fit_prompt(
        [system("Always be helpful. " * 200), user("hi")], encoder=encoder, budget=BUDGET
    )
    assert fitted.messages == [user("hi")]
    assert not fitted.cut_newest


def test_a_too_long_message_of_control_strings_is_cut_safely(encoder: PromptEncoder) -> None:
    fitted = fit_prompt([user("[INST] </s> <s> [/INST] " * 500)], encoder=encoder, budget=64)

    assert fitted.cut_newest and len(fitted.token_ids) <= 64
    assert fitted.token_ids.count(encoder.control_ids["[INST]"]) == 1
    assert fitted.token_ids.count(encoder.control_ids["</s>"]) == 0


# --- cost ---------------------------------------------------------------------------------------


def counting(encoder: PromptEncoder) -> Callable[[], int]:
    """Count the real encoder's ``encode_text`` calls from now on; returns the count reader."""
    calls = 0
    original = encoder.encode_text

    def encode_text(text: str) -> list[int]:
        nonlocal calls
        calls += 1
        return original(text)

    encoder.encode_text = encode_text  # type: ignore[method-assign]
    return lambda: calls


def test_a_history_a_hundred_times_the_window_is_fast_and_linear(encoder: PromptEncoder) -> None:
    messages = [system("Be helpful."), *history(1_000), user("Thank you")]
    assert len(encoder.encode(messages)) > 100 * WINDOW

    calls = counting(encoder)
    started = time.perf_counter()
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)
    elapsed = time.perf_counter() - started
    many = calls()

    # Only what may fit is counted: a tenth of the history costs the same number of calls.
    fit_prompt([messages[0], *messages[-201:]], encoder=encoder, budget=BUDGET)
    assert calls() - many == many <= 8 * len(messages)
    assert elapsed < 0.5  # ~5 ms here
    assert_well_formed(fitted, messages, encoder, BUDGET)


def test_a_too_long_message_after_a_long_history_is_fast(encoder: PromptEncoder) -> None:
    messages = [*history(1_000), user(long_message() * 2)]  # ~40,000 tokens, encoded once
    started = time.perf_counter()
    fitted = fit_prompt(messages, encoder=encoder, budget=BUDGET)
    assert time.perf_counter() - started < 1.0  # ~0.1 s here
    assert fitted.cut_newest and fitted.dropped_messages == 2_000
    assert len(fitted.token_ids) <= BUDGET


# --- always within the budget ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def textual_encoder(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> PromptEncoder:
    """The tiny tokenizer without tokens for ``[INST]`` and co., as Llama-2's own tokenizer is:
    the template writes them as text, joined to the text around them, so the per-message counts
    are off by more than the system block's join and the full check has to settle it."""
    folder = tmp_path_factory.mktemp("textual-tokenizer")
    tokenizer.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in STRUCTURE_TOKENS]
    textual = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    encoder = PromptEncoder(textual)
    assert sorted(encoder.control_ids) == ["</s>", "<s>"]
    return encoder


@pytest.mark.parametrize("which", ["tiny", "textual"])
def test_every_budget_gives_a_fitting_well_formed_prompt(
    which: str, encoder: PromptEncoder, textual_encoder: PromptEncoder
) -> None:
    encoder = textual_encoder if which == "textual" else encoder
    smallest = len(encoder.encode([user("")]))  # the tiny tokenizer's: 5; textual: 14
    dialogues = [
        [user("hi")],
        [*history(12), user("Thank you")],
        [system("Be helpful."), *history(12), user("How do I reset my password?")],
        [system("  Short.  "), *history(3), user("   ")],
        [system("S " * 30), *history(8), user("ünïcödé 🙂 " * 10)],
        [*history(4), user(long_message())],
        [system("Be helpful."), *history(2), user("🙂 " * 400)],
        [system("[INST]"), user("</s> [/INST]"), assistant("<s>[INST]"), user("[/INST]</s>")],
    ]
    for messages in dialogues:
        for budget in range(max(8, smallest), 260, 9):
            fitted = fit_prompt(messages, encoder=encoder, budget=budget)
            assert_well_formed(fitted, messages, encoder, budget)
            assert bool(fitted.note) == (fitted.dropped_messages > 0 or fitted.cut_newest)
            if len(encoder.encode(messages)) <= budget:
                assert fitted.messages == messages
            if fitted.dropped_messages and not fitted.cut_newest:  # as many turns as fit
                kept_system = [m for m in fitted.messages[:1] if m["role"] == "system"]
                kept = len(fitted.messages) - 1 - len(kept_system)
                bigger = [*kept_system, *messages[len(messages) - 3 - kept :]]
                assert len(encoder.encode(bigger)) > budget
    if smallest > 8:  # a budget that holds not even an empty turn
        with pytest.raises(ValueError, match="too small"):
            fit_prompt([user("hi")], encoder=encoder, budget=smallest - 1)


def test_the_saved_model_folders_tokenizer_fits_the_same_way(
    tiny_model_dir: Path, encoder: PromptEncoder
) -> None:
    saved = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    for messages in (
        [system("Be helpful."), *history(60), user("What is your refund policy?")],
        [*history(3), user(long_message())],
    ):
        assert fit_prompt(messages, encoder=saved, budget=BUDGET) == fit_prompt(
            messages, encoder=encoder, budget=BUDGET
        )
