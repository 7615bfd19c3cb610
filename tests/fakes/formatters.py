"""Prompt formatters for export tests that run in worker processes (so: importable, picklable)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from model.prompt import format_prompt

#: The file a worker of :func:`fails_in_a_worker` touches before it fails (set by the test).
FAILED_MARKER = "CHATBOT_TEST_WORKER_FAILED_MARKER"


def fails_in_a_worker(messages: Sequence[Mapping[str, str]]) -> str:
    """Raises in any worker process; in the exporting process it waits until a worker has
    failed, so the exporting process cannot write every part itself first (a worker process
    starts slowly on a loaded machine)."""
    marker = Path(os.environ[FAILED_MARKER])
    if multiprocessing.parent_process() is not None:
        marker.touch()
        raise RuntimeError("the formatter broke in a worker")
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return format_prompt(messages)


def slow(messages: Sequence[Mapping[str, str]]) -> str:
    """Formats as usual, slowly in worker processes: keeps them busy long enough to be caught
    at work."""
    if multiprocessing.parent_process() is not None:
        time.sleep(0.2)
    return format_prompt(messages)
