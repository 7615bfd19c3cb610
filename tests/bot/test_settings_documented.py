"""Every setting is documented in .env.example, with its default."""

from __future__ import annotations

import re
from pathlib import Path

from bot.config import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_every_setting_has_a_line_in_the_env_example() -> None:
    written = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", EXAMPLE.read_text(), flags=re.MULTILINE))
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - written == set()  # undocumented settings
    assert written - settings == set()  # documented settings that do not exist
