"""The bootstrap recipe (on the tiny model) and the starter corpus loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.bootstrap import (
    TINY,
    TINY_EXCHANGES,
    BootstrapConfig,
    SeedAnswerError,
    build_default_model,
)
from model.corpus import SEED_EXCHANGES, load_starter_corpus
from model.prompt import format_prompt
from model.service import LocalModel

SEED_ANSWERS = [answer for _, answer in SEED_EXCHANGES]


def greedy_answer(model: object, tokenizer: object, question: str) -> str:
    prompt = format_prompt(
        [{"role": "user", "content": question}],
        bos=tokenizer.bos_token,  # type: ignore[attr-defined]
        eos=tokenizer.eos_token,  # type: ignore[attr-defined]
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # type: ignore[operator]
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()  # type: ignore[attr-defined]


def test_tiny_model_folder_loads_and_answers_exactly(tiny_model_dir: Path) -> None:
    assert (tiny_model_dir / "chat_template.jinja").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    for question, answer in TINY_EXCHANGES:
        assert greedy_answer(model, tokenizer, question) == answer


def seed_replies(folder: Path) -> list[str]:
    """The bot's replies to the seed questions (LocalModel: single-turn prompt, greedy)."""
    model = LocalModel.load(folder, device="cpu")
    return [
        model.generate_sync(messages=[{"role": "user", "content": question}])
        for question, _ in SEED_EXCHANGES
    ]


def test_same_weights_and_exact_seed_answers_with_one_or_two_threads(tmp_path: Path) -> None:
    # A busy machine used to mean fewer threads mid-build, and so different weights.
    previous = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            folder = build_default_model(
                tmp_path / f"threads-{threads}",
                exchanges=TINY_EXCHANGES,
                config=TINY.with_overrides(threads=BootstrapConfig().threads),
                progress=lambda _: None,
            )
            assert torch.get_num_threads() == threads  # the build restores the caller's count
            assert seed_replies(folder) == SEED_ANSWERS  # served on `threads` threads
            weights.append((folder / "model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(previous)
    assert weights[0] == weights[1]


def test_cut_short_build_trains_on_until_the_seed_answers_hold(tmp_path: Path) -> None:
    # 15 of TINY's 60 epochs: both seed answers are still wrong after the normal training.
    config = TINY.with_overrides(epochs=15)
    unchecked = build_default_model(
        tmp_path / "unchecked",
        exchanges=TINY_EXCHANGES,
        config=config.with_overrides(seed_check=False),
        progress=lambda _: None,
    )
    replies = seed_replies(unchecked)
    assert all(reply != answer for reply, answer in zip(replies, SEED_ANSWERS, strict=True))
    lines: list[str] = []
    checked = build_default_model(
        tmp_path / "checked", exchanges=TINY_EXCHANGES, config=config, progress=lines.append
    )
    assert seed_replies(checked) == SEED_ANSWERS
    assert any("training on" in line for line in lines)
    assert any("both seed answers exact" in line for line in lines)


def test_seed_answers_that_never_hold_fail_the_build_and_keep_the_old_model(
    tmp_path: Path,
) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    config = TINY.with_overrides(epochs=5, seed_rounds=0)  # wrong, and no extra rounds allowed
    with pytest.raises(SeedAnswerError, match=r"What is your refund policy\?.*nothing saved"):
        build_default_model(
            target, exchanges=TINY_EXCHANGES, config=config, progress=lambda _: None
        )
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_no_staging_folders_left_behind(tiny_model_dir: Path) -> None:
    leftovers = [p.name for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_rebuild_replaces_folder_atomically(tmp_path: Path) -> None:
    config = TINY.with_overrides(epochs=1, seed_check=False)  # only the folder swap matters
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build_default_model(
        target, exchanges=TINY_EXCHANGES[:2], config=config, progress=lambda _: None
    )
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_default_config_is_frozen_and_tiny_is_smaller() -> None:
    default = BootstrapConfig()
    assert TINY.hidden_size < default.hidden_size
    try:
        default.epochs = 1  # type: ignore[misc]
    except AttributeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("BootstrapConfig must be frozen")


def test_starter_corpus_facts() -> None:
    pairs = load_starter_corpus()
    assert tuple(pairs[:2]) == SEED_EXCHANGES
    questions = [q for q, _ in pairs]
    assert len(set(questions)) == len(questions)
    assert len(pairs) > 1000
    assert all(q == q.strip() and a == a.strip() and q and a for q, a in pairs)
    assert all(isinstance(q, str) and isinstance(a, str) for q, a in pairs)
    # First answer wins: "What is AI?" appears several times in ai.yml.
    answers = dict(pairs)
    assert answers["What is AI?"].startswith("Artificial Intelligence is the branch")
