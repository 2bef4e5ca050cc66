"""Open-loop arrival schedules: when each request of a request-rate stage is meant to be sent.

A closed-loop user sends its next request when the previous one ends, so a slow
server slows the load down and hides its own queueing (coordinated omission).
An open-loop stage fixes the send times in advance from an arrival process;
the client records each request's intended time next to its actual send time,
so a late send is visible instead of silently shifting the schedule.

The processes, for a mean rate ``r`` per second (gaps between arrivals):

- ``constant``: every ``1/r`` seconds exactly.
- ``poisson``: exponential gaps with mean ``1/r`` (coefficient of variation 1).
- ``gamma``: gamma gaps with shape ``burstiness`` and mean ``1/r``, as in
  ``vllm bench serve --burstiness``: 1 is Poisson, below 1 is burstier
  (coefficient of variation ``1/sqrt(burstiness)``), above 1 is more regular.

With several load-generator processes each runs its own share (see
:func:`process_share`): a constant stream is interleaved exactly, Poisson
streams add up to a Poisson stream of the whole rate, and gamma streams add up
to a stream with the whole rate whose burstiness holds per process only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["ARRIVALS", "ProcessShare", "process_share", "arrival_offsets_s"]

ARRIVALS = ("constant", "poisson", "gamma")


@dataclass(frozen=True, slots=True)
class ProcessShare:
    """One process's part of a stage's arrivals: its rate and the offset of its first arrival."""

    rate_per_s: float
    phase_s: float


def process_share(rate_per_s: float, arrival: str, processes: int, index: int) -> ProcessShare:
    """Split ``rate_per_s`` over ``processes`` equal streams; ``index`` is this process (0-based).

    Constant streams are phased so that together they are evenly spaced at the
    whole rate (process k sends at ``(k + i * n) / rate``); random streams start
    at 0, since independent streams already interleave.
    """
    if processes < 1 or not 0 <= index < processes:
        raise ValueError(f"process index {index} out of range for {processes} process(es)")
    if rate_per_s <= 0:
        raise ValueError(f"rate must be positive (got {rate_per_s!r})")
    share = rate_per_s / processes
    phase = index / rate_per_s if arrival == "constant" else 0.0
    return ProcessShare(rate_per_s=share, phase_s=phase)


def arrival_offsets_s(rate_per_s: float, arrival: str, duration_s: float, rng: random.Random, *,
                      burstiness: float | None = None, phase_s: float = 0.0) -> Iterator[float]:
    """Intended send times, in seconds from the stage's start, strictly before ``duration_s``.

    The first arrival is at ``phase_s`` for ``constant`` and after one random
    gap for the random processes (a stream observed from an arbitrary instant).
    Deterministic for a seeded ``rng``.
    """
    if rate_per_s <= 0:
        raise ValueError(f"rate must be positive (got {rate_per_s!r})")
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r} (one of {', '.join(ARRIVALS)})")
    if arrival == "constant":
        i = 0
        while (t := phase_s + i / rate_per_s) < duration_s:
            yield t
            i += 1
        return
    if arrival == "poisson":
        shape = 1.0
    else:
        shape = 1.0 if burstiness is None else float(burstiness)
        if shape <= 0:
            raise ValueError(f"burstiness must be positive (got {burstiness!r})")
    scale = 1.0 / (rate_per_s * shape)  # mean gap = shape * scale = 1 / rate
    t = phase_s
    while True:
        t += rng.expovariate(rate_per_s) if shape == 1.0 else rng.gammavariate(shape, scale)
        if t >= duration_s:
            return
        yield t
