"""Fixtures for the model tests: one tiny model, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.bootstrap import TINY, TINY_EXCHANGES, build_default_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the TINY model trained on TINY_EXCHANGES (a few seconds to build)."""
    output = tmp_path_factory.mktemp("tiny-model") / "model"
    return build_default_model(
        output, exchanges=TINY_EXCHANGES, config=TINY, progress=lambda _line: None
    )
