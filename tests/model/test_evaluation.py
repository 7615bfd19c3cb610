"""The evaluation gate (model/evaluation.py): loose matching, the promotion rule, and scoring
through the batched model service."""

from __future__ import annotations

import pytest

from model.evaluation import Comparison, Gate, SetScore, answer_loss, evaluate, normalise, score


def test_normalising_ignores_case_punctuation_and_spacing() -> None:
    assert normalise("  Hello,   WORLD!  ") == "hello world"
    assert normalise("It’s “fine”…") == normalise("its fine")
    assert normalise("ｆｕｌｌ ｗｉｄｔｈ") == "full width"
    assert normalise("yes") != normalise("no")


def scores(new: int, held: int, regression: int, total: int = 10) -> dict[str, SetScore]:
    return {
        "new": SetScore(total=total, exact=new, normalised=new),
        "held_out": SetScore(total=total, exact=held, normalised=held),
        "regression": SetScore(total=total, exact=regression, normalised=regression),
    }


@pytest.mark.parametrize(
    ("after", "promoted", "why"),
    [
        (scores(10, 5, 8), True, "learned"),
        (scores(8, 5, 8), False, "learned 8/10 new"),
        (scores(10, 4, 8), False, "held-out set worse"),
        (scores(10, 5, 7), False, "regression set worse"),
    ],
)
def test_the_gate(after: dict[str, SetScore], promoted: bool, why: str) -> None:
    comparison = Comparison(before=scores(0, 5, 8), after=after)
    decision, reason = Gate(learned=0.9, margin=0.05).decide(comparison)
    assert decision is promoted
    assert why in reason
    assert "candidate" in comparison.table()


def test_a_margin_allows_small_losses() -> None:
    comparison = Comparison(before=scores(0, 5, 8), after=scores(10, 5, 7))
    assert Gate(margin=0.1).decide(comparison)[0] is True


async def test_sets_are_scored_through_the_service(tiny_model) -> None:
    from model.corpus import SEED_EXCHANGES

    known = [([{"role": "user", "content": q}], a) for q, a in SEED_EXCHANGES]
    unknown = [([{"role": "user", "content": "Unheard of?"}], "Never said before.")]
    result = await evaluate(
        tiny_model, {"new": unknown, "held_out": known, "regression": known}, local=tiny_model.local
    )
    assert result["regression"].exact == len(known)  # the seed answers hold word for word
    assert result["new"].exact == 0
    assert result["held_out"].loss is not None
    assert result["held_out"].loss < answer_loss(tiny_model.local, unknown)  # type: ignore[operator]
    assert (await score(tiny_model, [])).total == 0
