"""The serving benchmark's figures and report: rows, the table, the targets (benchmarks/serving.py
measures them).

The compute floor. A row's replies need at least a known amount of arithmetic: every prompt
position once (a prefix all the row's prompts share counted once, as a prefix cache would run
it) and every generated token but each reply's last, which is never fed back, each at 2 FLOPs
per parameter (attention only adds to that). At the machine's measured fp32 matmul rate (the
roof), that takes ``floor s``; no implementation of the same model in fp32 on this machine can
answer the row sooner, and a reply's latency at the row's end is at least that too. When a
missed target asks for less time than the floor, the report says it is out of reach here rather
than only missed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Row keys, in the table's order, and what each measures.
ROWS: dict[str, str] = {
    "1": "one request alone, service",
    "a": "(a) one after another, model.generate",
    "b": "(b) at once, service",
    "c": "(c) at once, transformers serve",
    "c-cb": "(c) at once, transformers serve --continuous-batching",
    "d": "(d) at once, service",
    "e": "(e) at once, transformers continuous batching in-process",
}

#: A target's outcome: met, missed, missed and out of reach (below the compute floor), or not
#: checked (a row is missing).
MET, MISSED, OUT_OF_REACH, NOT_CHECKED = "met", "MISSED", "MISSED, out of reach here", "not checked"


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One row of the table: ``requests`` replies in ``seconds`` (or why it was not measured)."""

    model: str
    row: str
    requests: int = 0
    seconds: float = 0.0
    tokens: int = 0
    latencies: tuple[float, ...] = ()
    texts: tuple[str, ...] = ()
    #: Replies equal to (a)'s reply for the same prompt, of those compared (None: not compared).
    same_as_a: tuple[int, int] | None = None
    #: The least time the row's arithmetic takes at the fp32 roof (see the module docstring).
    floor_seconds: float = math.nan
    #: Why the row was not measured (empty: it was).
    skipped: str = ""
    note: str = ""

    @property
    def measured(self) -> bool:
        return not self.skipped and self.requests > 0 and self.seconds > 0

    @property
    def replies_per_second(self) -> float:
        return self.requests / self.seconds if self.measured else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.measured else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    def summary(self) -> dict[str, Any]:
        """The row's figures (for ``--json``), replies left out."""
        figures = {k: v for k, v in asdict(self).items() if k not in ("texts", "latencies")}
        return figures | {
            "replies_per_second": self.replies_per_second,
            "tokens_per_second": self.tokens_per_second,
            "p50": self.p50,
            "p99": self.p99,
        }


@dataclass(frozen=True, kw_only=True)
class ModelFigures:
    """One model and its measured rows."""

    name: str
    path: Path
    parameters: int
    #: Every reply is exactly ``max_new_tokens`` tokens (the random model).
    fixed_length: bool
    rows: list[Measurement] = field(default_factory=list)

    def row(self, key: str) -> Measurement | None:
        found = [m for m in self.rows if m.row == key and m.measured]
        return found[0] if found else None


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in (0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# --------------------------------------------------------------------------- the compute floor


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading token ids every prompt has in common."""
    if not prompts:
        return 0
    shortest = min(len(prompt) for prompt in prompts)
    for index in range(shortest):
        if len({prompt[index] for prompt in prompts}) > 1:
            return index
    return shortest


def forward_positions(prompts: Sequence[Sequence[int]], *, generated: int) -> int:
    """The fewest token positions a model must run to give ``len(prompts)`` replies of
    ``generated`` tokens in all: the prompts (their shared prefix once) and every generated
    token but each reply's last."""
    if not prompts:
        return 0
    shared = shared_prefix_length(prompts)
    prompt_positions = sum(len(prompt) for prompt in prompts) - shared * (len(prompts) - 1)
    return prompt_positions + max(0, generated - len(prompts))


def floor_seconds(positions: int, *, parameters: int, roof_flops: float) -> float:
    """Seconds ``positions`` take at 2 FLOPs per parameter at ``roof_flops``."""
    return positions * 2 * parameters / roof_flops


def roof_tokens_per_second(roof_flops: float, parameters: int) -> float:
    return roof_flops / (2 * parameters)


# --------------------------------------------------------------------------- the report


def table(models: Sequence[ModelFigures], *, roof_flops: float) -> str:
    lines = [
        "| model | row | requests | total s | replies/s | generated tokens/s | p50 s | p99 s "
        "| × (a) | % roof | floor s | = (a) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for figures in models:
        base = figures.row("a")
        roof = roof_tokens_per_second(roof_flops, figures.parameters)
        for m in sorted(figures.rows, key=lambda m: list(ROWS).index(m.row)):
            if not m.measured:
                lines.append(f"| {m.model} | {ROWS[m.row]} | not measured: {m.skipped} |")
                continue
            ratio = (
                f"{m.replies_per_second / base.replies_per_second:.1f}×"
                if base and m.row != "1"
                else "—"
            )
            same = f"{m.same_as_a[0]}/{m.same_as_a[1]}" if m.same_as_a else "—"
            floor = "—" if math.isnan(m.floor_seconds) else f"{m.floor_seconds:.2f}"
            note = f" ({m.note})" if m.note else ""
            lines.append(
                f"| {m.model} | {ROWS[m.row]}{note} | {m.requests} | {m.seconds:.2f} | "
                f"{m.replies_per_second:.2f} | {m.tokens_per_second:.1f} | {m.p50:.2f} | "
                f"{m.p99:.2f} | {ratio} | {100 * m.tokens_per_second / roof:.2f}% | {floor} | "
                f"{same} |"
            )
    return "\n".join(lines)


def _within(seconds: float, *, allowed: float, floor: float) -> str:
    """Met when ``seconds`` is within ``allowed``; out of reach when even the floor is not."""
    if seconds <= allowed:
        return MET
    return OUT_OF_REACH if floor > allowed else MISSED


def targets(models: Sequence[ModelFigures], *, roof_flops: float) -> list[tuple[str, str]]:
    """Each target's outcome (:data:`MET`, :data:`MISSED`, :data:`OUT_OF_REACH` or
    :data:`NOT_CHECKED`) and what was compared."""
    checks: list[tuple[str, str]] = []
    for f in models:
        a, b, alone, d = f.row("a"), f.row("b"), f.row("1"), f.row("d")
        if a and b:
            ratio = b.replies_per_second / a.replies_per_second
            # The same requests in both rows: 8x the throughput is (a)'s time over 8.
            allowed = a.seconds * b.requests / a.requests / 8
            checks.append(
                (
                    _within(b.seconds, allowed=allowed, floor=b.floor_seconds),
                    f"{f.name}: (b) at {ratio:.1f}× (a)'s throughput (≥ 8×: ≤ {allowed:.2f} s; "
                    f"compute floor {b.floor_seconds:.2f} s)",
                )
            )
        else:
            checks.append((NOT_CHECKED, f"{f.name}: (b) ≥ 8× (a): not checked, a row is missing"))
        if b and alone:
            times = b.p99 / alone.p50
            allowed = 3 * alone.p50
            checks.append(
                (
                    # Under 100 requests the p99 is the slowest reply, which comes no
                    # sooner than the row's arithmetic is done.
                    _within(
                        b.p99,
                        allowed=allowed,
                        floor=b.floor_seconds if b.requests < 100 else math.nan,
                    ),
                    f"{f.name}: (b) p99 {b.p99:.2f} s, {times:.1f}× a lone request's "
                    f"{alone.p50:.2f} s (≤ 3×: ≤ {allowed:.2f} s; compute floor "
                    f"{b.floor_seconds:.2f} s)",
                )
            )
        else:
            checks.append((NOT_CHECKED, f"{f.name}: (b) p99 ≤ 3× a lone request: not checked"))
        for key in ("c", "c-cb"):
            c = f.row(key)
            if b and c:
                ahead = b.replies_per_second / c.replies_per_second
                checks.append(
                    (
                        MET if ahead > 1 else MISSED,
                        f"{f.name}: (b) at {ahead:.1f}× the replies/s of {ROWS[key]} (> 1×)",
                    )
                )
            else:
                checks.append((NOT_CHECKED, f"{f.name}: (b) ahead of {ROWS[key]}: not checked"))
        if f.name == "random200m":
            if d:
                share = d.tokens_per_second / roof_tokens_per_second(roof_flops, f.parameters)
                checks.append(
                    (
                        MET if share >= 0.2 else MISSED,
                        f"{f.name}: (d) at {100 * share:.1f}% of the roof (≥ 20%)",
                    )
                )
            else:
                checks.append((NOT_CHECKED, f"{f.name}: (d) ≥ 20% of the roof: not checked"))
    return checks


def report(models: Sequence[ModelFigures], *, roof_flops: float) -> str:
    """The header line, the table and the targets, as printed."""
    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads, " + "; ".join(
        [f"fp32 matmul roof {roof_flops / 1e9:.1f} GFLOP/s"]
        + [
            f"{f.name}: {f.parameters / 1e6:.1f}M parameters, roof "
            f"{roof_tokens_per_second(roof_flops, f.parameters):,.0f} tokens/s"
            for f in models
        ]
    )
    lines = [header, "", table(models, roof_flops=roof_flops), "", "Targets:"]
    for outcome, text in targets(models, roof_flops=roof_flops):
        lines.append(f"- [{outcome}] {text}")
    return "\n".join(lines)


def figures_json(models: Sequence[ModelFigures], *, roof_flops: float) -> str:
    """Everything the table and the targets show, as JSON (``--json``)."""
    return json.dumps(
        {
            "roof_flops": roof_flops,
            "models": [
                {
                    "name": f.name,
                    "path": str(f.path),
                    "parameters": f.parameters,
                    "rows": [m.summary() for m in f.rows],
                }
                for f in models
            ],
            "targets": [
                {"outcome": outcome, "target": text}
                for outcome, text in targets(models, roof_flops=roof_flops)
            ],
        },
        indent=1,
    )
