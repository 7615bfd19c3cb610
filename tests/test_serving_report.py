"""The serving benchmark's compute floor and how it grades a missed target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.serving_report import (
    MET,
    MISSED,
    NOT_CHECKED,
    OUT_OF_REACH,
    Measurement,
    ModelFigures,
    floor_seconds,
    forward_positions,
    report,
    shared_prefix_length,
    targets,
)

ROOF = 1e9  # FLOP/s: a 1M-parameter model runs 500 positions a second at it


@pytest.mark.parametrize(
    ("prompts", "shared"),
    [
        ([[1, 2, 3], [1, 2, 4]], 2),
        ([[1, 2, 3], [1, 2, 3]], 3),
        ([[1, 2, 3], [1, 2]], 2),
        ([[5, 2], [1, 2]], 0),
        ([[7, 8, 9]], 3),
        ([], 0),
    ],
)
def test_shared_prefix_length(prompts: list[list[int]], shared: int) -> None:
    assert shared_prefix_length(prompts) == shared


def test_forward_positions_count_the_shared_prefix_once_and_no_last_token() -> None:
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]]
    # 10 prompt tokens, 3 of them shared: 7; 10 generated, each reply's last never fed: 8.
    assert forward_positions(prompts, generated=10) == 15
    assert forward_positions(prompts, generated=0) == 7  # replies that ended at once
    assert forward_positions([], generated=0) == 0


def test_floor_seconds_is_two_flops_per_parameter_per_position() -> None:
    assert floor_seconds(500, parameters=1_000_000, roof_flops=ROOF) == pytest.approx(1.0)


def figures(*, b_seconds: float, b_floor: float, lone: float = 1.0) -> ModelFigures:
    """Rows (a), (1) and (b) of 32 requests: (a) 80 s in all, so 8x asks (b) for 10 s."""
    latencies = tuple(b_seconds * (i + 1) / 32 for i in range(32))
    return ModelFigures(
        name="m",
        path=Path("m"),
        parameters=1_000_000,
        fixed_length=True,
        rows=[
            Measurement(model="m", row="a", requests=32, seconds=80.0, tokens=1024),
            Measurement(model="m", row="1", requests=3, seconds=3 * lone, latencies=(lone,) * 3),
            Measurement(
                model="m",
                row="b",
                requests=32,
                seconds=b_seconds,
                tokens=1024,
                latencies=latencies,
                floor_seconds=b_floor,
            ),
        ],
    )


def outcomes(model: ModelFigures) -> list[str]:
    """The outcomes of the 8x target and the p99 target."""
    return [outcome for outcome, _ in targets([model], roof_flops=ROOF)][:2]


def test_targets_within_reach_are_met_or_missed() -> None:
    assert outcomes(figures(b_seconds=2.5, b_floor=1.0)) == [MET, MET]
    # 12 s: neither 10 s (8x) nor 3 s (3x a lone 1 s) is met, but the floor allows both.
    assert outcomes(figures(b_seconds=12.0, b_floor=2.0)) == [MISSED, MISSED]


def test_a_target_below_the_compute_floor_is_out_of_reach() -> None:
    # The arithmetic alone takes 4 s: 3 s for the slowest reply cannot be done; 10 s could.
    assert outcomes(figures(b_seconds=12.0, b_floor=4.0)) == [MISSED, OUT_OF_REACH]
    assert outcomes(figures(b_seconds=12.0, b_floor=11.0)) == [OUT_OF_REACH, OUT_OF_REACH]


def test_missing_rows_are_not_checked_and_the_report_shows_the_floor() -> None:
    model = figures(b_seconds=12.0, b_floor=4.0)
    lone_row_missing = ModelFigures(
        name="m", path=Path("m"), parameters=1, fixed_length=True, rows=model.rows[:1]
    )
    assert outcomes(lone_row_missing) == [NOT_CHECKED, NOT_CHECKED]
    printed = report([model], roof_flops=ROOF)
    assert "| floor s |" in printed
    assert "| 4.00 |" in printed  # (b)'s floor
    assert f"[{OUT_OF_REACH}]" in printed and "compute floor 4.00 s" in printed
    assert math.isnan(model.rows[0].floor_seconds)  # not given: shown as —
