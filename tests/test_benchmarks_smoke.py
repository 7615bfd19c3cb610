"""Smoke test of benchmarks/serving.py: a real run, on the tiny model, with few requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_serving_benchmark_runs_and_reports_each_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--quick on both models (the tiny model, and a random Llama the size of it with its
    tokenizer): every in-process row is measured, batching leaves greedy replies unchanged,
    the random model's replies are the fixed 32 tokens, and the table and targets print."""
    figures = tmp_path / "figures.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serving.py"),
            "--quick",
            "--models",
            "default,random200m",
            "--default-model",
            str(tiny_model_dir),
            "--random-hidden",
            "64",
            "--random-layers",
            "2",
            "--rows",
            "1,a,b,d",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| default | (b) at once, service | 8 |" in run.stdout
    assert "Targets:" in run.stdout
    assert "(d) at" in run.stdout and "% of the roof (≥ 20%)" in run.stdout
    report = json.loads(figures.read_text())
    assert report["roof_flops"] > 1e8
    for model in report["models"]:
        rows = {row["row"]: row for row in model["rows"]}
        assert sorted(rows) == ["1", "a", "b", "d"], model["name"]
        assert all(row["skipped"] == "" for row in rows.values()), rows
        assert (rows["a"]["requests"], rows["b"]["requests"], rows["d"]["requests"]) == (8, 8, 16)
        assert rows["b"]["same_as_a"] == [8, 8]  # batched greedy replies equal unbatched ones
        assert rows["d"]["same_as_a"] == [8, 8]
        assert rows["b"]["replies_per_second"] > 0 and rows["b"]["p99"] >= rows["b"]["p50"] > 0
    random = next(m for m in report["models"] if m["name"] == "random200m")
    plain = next(row for row in random["rows"] if row["row"] == "a")
    assert plain["tokens"] == 8 * 32 and plain["note"] == ""  # exactly 32 new tokens each


@pytest.mark.timeout(300)
def test_retrain_benchmark_runs_and_reports_each_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A small real run of benchmarks/retrain.py on the tiny model: the bot's training process
    with its evaluation, the plain loop on the same batches, DP, and the latency probes."""
    figures = tmp_path / "figures.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "retrain.py"),
            "--default-model",
            str(tiny_model_dir),
            "--exchanges",
            "8",
            "--quick",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| retrain (Trainer + evaluation) |" in run.stdout
    assert "| plain PyTorch loop, same batches |" in run.stdout
    assert "| retrain with DP (Opacus) |" in run.stdout
    assert "Reply latency p50: idle" in run.stdout
    report = json.loads(figures.read_text())
    assert report["retrain"]["tokens"] == report["plain"]["tokens"]  # the same examples
    assert report["retrain"]["steps"] == report["plain"]["steps"]  # in the same batches
    assert 0 < report["dp"]["epsilon"] <= 8.0 + 1e-6
    assert report["latency"]["busy_n"] >= 1 and report["latency"]["idle_p50"] > 0
