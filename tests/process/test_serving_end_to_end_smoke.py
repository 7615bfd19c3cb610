"""Smoke test of benchmarks/serving_end_to_end.py: a real ``chatbot run`` on each platform, on
the tiny model, with few mentions (the benchmark itself runs 8 against 32)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


@pytest.mark.timeout(180)
def test_end_to_end_benchmark_measures_both_platforms(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Both phases on Slack and Discord: every mention answered, one pipeline split line per
    answered message parsed from the bot's log, and the table printed."""
    rows_file = tmp_path / "rows.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serving_end_to_end.py"),
            "--quick",
            "--sequential",
            "2",
            "--concurrent",
            "4",
            "--repeats",
            "2",
            "--models",
            str(tiny_model_dir),
            "--json",
            str(rows_file),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    header = "| platform | model | mode | messages | total s (median) | each run s | replies/s |"
    assert header in run.stdout
    rows = json.loads(rows_file.read_text())
    assert [(r["platform"], r["mode"], r["messages"]) for r in rows] == [
        ("slack", "one by one", 2),
        ("slack", "at once", 4),
        ("discord", "one by one", 2),
        ("discord", "at once", 4),
    ]
    for row in rows:
        runs = row["rounds"]
        assert len(runs) == 2 and min(runs) > 0, row
        assert row["seconds"] == pytest.approx(statistics.median(runs)), row
        answered = 2 * row["messages"]  # every run's split lines
        assert len(row["pipeline_ms"]) == len(row["model_ms"]) == answered, row
        assert len(row["work_ms"]) == answered, row
        # Work is the pipeline's time without the waiting (the placeholder's record, made
        # while the model generates, is work the pipeline's time does not hold: 1 ms slack).
        pairs = zip(row["work_ms"], row["pipeline_ms"], strict=True)
        assert all(0 < work <= wall + 1.0 for work, wall in pairs), row
        assert all(ms > 0 for ms in row["model_ms"]), row
    assert rows[0]["ratio"] is None and rows[1]["ratio"] > 0 and rows[3]["ratio"] > 0
