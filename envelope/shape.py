"""The load shape as a pure function of elapsed time.

Locust's ``LoadTestShape.tick()`` (in ``locustfiles/``) only calls
:func:`stage_at`; everything about which stage runs when lives here, where it
can be tested without Locust.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from envelope.scenario import ResolvedStage

__all__ = ["StageAt", "stage_at", "total_duration_s"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageAt:
    """The stage running at some instant, and where in it we are."""

    stage: ResolvedStage
    index: int
    stage_elapsed_s: float
    stage_remaining_s: float


def total_duration_s(stages: Sequence[ResolvedStage]) -> float:
    """The sum of all stage durations, in seconds."""
    return float(sum(stage.duration_s for stage in stages))


def stage_at(stages: Sequence[ResolvedStage], elapsed_s: float) -> StageAt | None:
    """The stage running ``elapsed_s`` seconds after the test started, or ``None`` once all are done.

    Each stage covers ``[start, end)``: at exactly a boundary the next stage runs.
    A negative ``elapsed_s`` counts as 0 (the first stage).
    """
    elapsed_s = max(0.0, float(elapsed_s))
    start_s = 0.0
    for index, stage in enumerate(stages):
        end_s = start_s + stage.duration_s
        if elapsed_s < end_s:
            return StageAt(
                stage=stage,
                index=index,
                stage_elapsed_s=elapsed_s - start_s,
                stage_remaining_s=end_s - elapsed_s,
            )
        start_s = end_s
    return None
