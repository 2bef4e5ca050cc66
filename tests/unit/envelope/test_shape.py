"""envelope.shape: which stage runs at a given elapsed time; boundaries are [start, end)."""

from __future__ import annotations

import pytest

from envelope.scenario import load_scenario
from envelope.shape import StageAt, stage_at, total_duration_s

TEXT = """\
name: shape
passes:
  - name: a
    stages:
      - {users: 1, duration_s: 10}
      - {users: 5, spawn_rate: 2, duration_s: 20}
  - name: b
    stages:
      - {users: 3, duration_s: 5}
"""


@pytest.fixture
def stages():
    return load_scenario("shape.yaml", text=TEXT).resolve()


def _where(at: StageAt | None):
    return None if at is None else (at.index, at.stage.name, at.stage_elapsed_s, at.stage_remaining_s)


def test_total_duration(stages):
    assert total_duration_s(stages) == 35.0
    assert total_duration_s([]) == 0.0


@pytest.mark.parametrize(
    ("elapsed_s", "expected"),
    [
        (0.0, (0, "a-1u", 0.0, 10.0)),
        (-3.0, (0, "a-1u", 0.0, 10.0)),  # negative counts as the start
        (9.5, (0, "a-1u", 9.5, 0.5)),
        (10.0, (1, "a-5u", 0.0, 20.0)),  # exactly at a boundary: the next stage
        (29.0, (1, "a-5u", 19.0, 1.0)),
        (30.0, (2, "b-3u", 0.0, 5.0)),
        (34.75, (2, "b-3u", 4.75, 0.25)),  # the last instant before the end
        (35.0, None),  # the end is not part of the run
        (1000.0, None),
    ],
)
def test_stage_at(stages, elapsed_s, expected):
    assert _where(stage_at(stages, elapsed_s)) == expected


def test_stage_at_returns_the_resolved_stage(stages):
    at = stage_at(stages, 12.0)
    assert at is not None
    assert at.stage is stages[1]
    assert (at.stage.users, at.stage.spawn_rate) == (5, 2.0)


def test_no_stages_means_done():
    assert stage_at([], 0.0) is None


def test_quick_durations_drive_the_shape():
    stages = load_scenario("shape.yaml", text=TEXT).resolve(quick=True)
    # quick: max(10, d * 0.25) but never longer than written -> 10, 10, 5
    assert total_duration_s(stages) == 25.0
    assert _where(stage_at(stages, 20.0)) == (2, "b-3u", 0.0, 5.0)
