"""envelope.arrivals: the open-loop schedules have the rate and the spread they claim."""

from __future__ import annotations

import random
import statistics

import pytest

from envelope.arrivals import arrival_offsets_s, process_share


def _gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def test_constant_is_exact_and_stops_before_the_end():
    times = list(arrival_offsets_s(4.0, "constant", 2.0, random.Random(0)))
    assert times == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


@pytest.mark.parametrize("arrival, burstiness, cv", [("poisson", None, 1.0), ("gamma", 1.0, 1.0),
                                                     ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)])
def test_random_processes_have_the_mean_rate_and_the_spread(arrival, burstiness, cv):
    rate, duration = 50.0, 2000.0
    times = list(arrival_offsets_s(rate, arrival, duration, random.Random(1), burstiness=burstiness))
    gaps = _gaps(times)
    assert len(times) / duration == pytest.approx(rate, rel=0.03)
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.05)
    assert all(0 < t < duration for t in times) and times == sorted(times)


def test_seeded_schedules_repeat_and_differ_by_seed():
    one = list(arrival_offsets_s(10, "poisson", 5, random.Random("s:0")))
    assert one == list(arrival_offsets_s(10, "poisson", 5, random.Random("s:0")))
    assert one != list(arrival_offsets_s(10, "poisson", 5, random.Random("s:1")))


def test_constant_streams_of_several_processes_interleave_evenly():
    merged = sorted(t for k in range(3)
                    for t in arrival_offsets_s(process_share(6.0, "constant", 3, k).rate_per_s, "constant", 2.0,
                                               random.Random(0), phase_s=process_share(6.0, "constant", 3, k).phase_s))
    assert merged == pytest.approx([i / 6.0 for i in range(12)])


def test_random_shares_split_the_rate_without_phase():
    share = process_share(9.0, "poisson", 3, 2)
    assert (share.rate_per_s, share.phase_s) == (3.0, 0.0)


@pytest.mark.parametrize("call", [lambda: process_share(1.0, "poisson", 2, 2), lambda: process_share(0, "poisson", 1, 0),
                                  lambda: list(arrival_offsets_s(1.0, "uniform", 1, random.Random())),
                                  lambda: list(arrival_offsets_s(1.0, "gamma", 1, random.Random(), burstiness=0))])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
