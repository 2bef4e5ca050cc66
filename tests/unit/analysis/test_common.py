import math

import pytest

from analysis import broke, envelope
from analysis.common import (
    KV_PRESSURE_RATIO,
    METRIC_NAMES,
    adaptive_percent,
    finite,
    grouped_number,
    percent,
    plain_number,
    split_key,
)


@pytest.mark.parametrize(
    ("value", "plain", "grouped"),
    [
        (12.0, "12", "12"),
        (3, "3", "3"),
        (2.25, "2.2", "2.2"),
        (0.5, "0.5", "0.5"),
        (9.96, "10", "10"),
        (12.5, "12", "12"),
        (-12.5, "-12", "-12"),
        # where the two differ: separators, negative zero, bools
        (1234, "1234", "1,234"),
        (1234567.0, "1234567", "1,234,567"),
        (-0.0, "0", "-0"),
        (True, "1", "?"),
    ],
)
def test_number_formatters(value, plain, grouped):
    assert plain_number(value) == plain
    assert grouped_number(value) == grouped


@pytest.mark.parametrize("value", [None, "12", math.nan, math.inf, -math.inf])
def test_grouped_number_says_unknown_for_non_numbers(value):
    assert grouped_number(value) == "?"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_plain_number_wants_a_finite_number(value):
    with pytest.raises((ValueError, OverflowError)):
        plain_number(value)


@pytest.mark.parametrize(
    ("ratio", "adaptive", "whole", "two_digits"),
    [
        (0.853, "85%", "85%", "85.30%"),
        (0.9, "90%", "90%", "90.00%"),
        (0.1, "10%", "10%", "10.00%"),
        (0.02, "2%", "2%", "2.00%"),
        (1, "100%", "100%", "100.00%"),
        # where the two differ: adaptive keeps one decimal under 10%
        (0.025, "2.5%", "2%", "2.50%"),
        (0.00123, "0.1%", "0%", "0.12%"),
        (0.0999, "10.0%", "10%", "9.99%"),
        (None, "?", "?", "?"),
        (math.nan, "?", "?", "?"),
        (False, "?", "?", "?"),
    ],
)
def test_percent_formatters(ratio, adaptive, whole, two_digits):
    assert adaptive_percent(ratio) == adaptive
    assert percent(ratio) == whole
    assert percent(ratio, digits=2) == two_digits


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("ttft_p95_ms", ("ttft", "p95")),
        ("e2e_p50_ms", ("e2e", "p50")),
        ("error_rate_max", ("error", "rate")),
        ("throughput", ("throughput", "")),
        ("ttft_p95", ("ttft_p95", "")),
    ],
)
def test_split_key(key, expected):
    assert split_key(key) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, True), (0.5, True), (-2.0, True), (True, False), (None, False), ("1", False),
     (math.nan, False), (math.inf, False)],
)
def test_finite(value, expected):
    assert finite(value) is expected


def test_shared_names_are_the_same_objects():
    assert envelope.KV_PRESSURE_RATIO is KV_PRESSURE_RATIO == 0.9
    assert broke.KV_PRESSURE_RATIO is KV_PRESSURE_RATIO
    assert METRIC_NAMES == {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}
