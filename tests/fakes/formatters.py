"""Prompt formatters for export tests that run in worker processes (so: importable, picklable)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Mapping, Sequence

from model.prompt import format_prompt


def fails_in_a_worker(messages: Sequence[Mapping[str, str]]) -> str:
    """Raises in any worker process; formats slowly in the exporting process, so that a worker
    gets a part to fail on before the exporting process has written them all."""
    if multiprocessing.parent_process() is not None:
        raise RuntimeError("the formatter broke in a worker")
    time.sleep(0.1)
    return format_prompt(messages)


def slow(messages: Sequence[Mapping[str, str]]) -> str:
    """Formats as usual, slowly in worker processes: keeps them busy long enough to be caught
    at work."""
    if multiprocessing.parent_process() is not None:
        time.sleep(0.2)
    return format_prompt(messages)
