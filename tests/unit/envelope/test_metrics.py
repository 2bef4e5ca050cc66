import math
import random

import numpy as np
import pytest

from envelope import metrics
from envelope.metrics import (
    FRAME_COLUMNS,
    e2e_s,
    itl_s,
    itl_values_ms,
    per_request_frame,
    percentiles,
    request_output_tokens_per_s,
    send_lag_s,
    achieved_send_rate_per_s,
    ttft_from_intended_s,
    e2e_from_intended_s,
    tpot_s,
    ttft_s,
)


def rec(name, *, offsets=(), tokens=None, out=None, error=None, t_intended=None, **extra):
    """A record dict with t_start_s = 10.0 and chunks at 10.0 + offsets."""
    base = {
        "run_id": "run",
        "request_id": name,
        "worker_id": "h:1",
        "client": "chat",
        "endpoint": "chat",
        "pass_name": "p",
        "stage_index": 0,
        "stage_name": "s",
        "wall_start_unix_s": 1_700_000_000.0,
        "t_start_s": 10.0,
        "t_intended_s": t_intended,
        "t_first_token_s": 10.0 + offsets[0] if offsets else None,
        "t_last_token_s": 10.0 + offsets[-1] if offsets else None,
        "chunk_offsets_s": list(offsets),
        "chunk_tokens": None if tokens is None else list(tokens),
        "prompt_tokens": 12,
        "output_tokens": out,
        "output_tokens_estimated": False,
        "requested_output_tokens": out,
        "http_status": 200,
        "error_category": error,
    }
    base.update(extra)
    return base


# name: (record, ttft_s, e2e_s, tpot_s, itl_s)
CASES = {
    # one token: TTFT = E2E = 0.25; TPOT needs two tokens; no gaps, no ITL
    "single": (rec("single", offsets=(0.25,), tokens=(1,), out=1), 0.25, 0.25, None, []),
    # chunks at 0.5, 1.25, 1.75 carrying 1, 3, 1 tokens (5 tokens):
    # gap 0.75 spread over 3 tokens -> 0.25, 0.25, 0.25; gap 0.5 over 1 token -> 0.5
    # TPOT = (1.75 - 0.5) / (5 - 1) = 0.3125 (= mean ITL, every token accounted for)
    "multi": (rec("multi", offsets=(0.5, 1.25, 1.75), tokens=(1, 3, 1), out=5), 0.5, 1.75, 0.3125, [0.25, 0.25, 0.25, 0.5]),
    # first chunk carries 2 tokens: its extra token gives no ITL value
    # gaps 0.25, 0.25 -> ITL [0.25, 0.25]; TPOT = (1.0 - 0.5) / (4 - 1) = 1/6
    "first_two": (rec("first_two", offsets=(0.5, 0.75, 1.0), tokens=(2, 1, 1), out=4), 0.5, 1.0, 0.5 / 3, [0.25, 0.25]),
    # no chunk_tokens: one token per chunk, ITL = the gaps 0.25 and 0.75
    # TPOT = (1.5 - 0.5) / (3 - 1) = 0.5
    "no_tokens": (rec("no_tokens", offsets=(0.5, 0.75, 1.5), out=3), 0.5, 1.5, 0.5, [0.25, 0.75]),
    # chunk_tokens that do not match the chunks are ignored (one token per chunk)
    "mismatch": (rec("mismatch", offsets=(0.5, 0.75, 1.5), tokens=(1, 2), out=3), 0.5, 1.5, 0.5, [0.25, 0.75]),
    # a zero count cannot be spread over: same fallback
    "zero_count": (rec("zero_count", offsets=(0.5, 0.75, 1.5), tokens=(1, 0, 2), out=3), 0.5, 1.5, 0.5, [0.25, 0.75]),
    # a chunk carrying 4 tokens after a gap of 1.0 -> four values of 0.25
    # TPOT = (1.5 - 0.5) / (5 - 1) = 0.25
    "four": (rec("four", offsets=(0.5, 1.5), tokens=(1, 4), out=5), 0.5, 1.5, 0.25, [0.25, 0.25, 0.25, 0.25]),
    # failed request with chunks: no metric at all
    "failed": (rec("failed", offsets=(0.5, 0.75), tokens=(1, 1), out=2, error="incomplete_stream"), None, None, None, []),
    # failed before any token
    "refused": (rec("refused", out=0, error="connect_error", http_status=None), None, None, None, []),
    # succeeded without content: no first token
    "empty": (rec("empty", out=0), None, None, None, []),
    # usage missing: output_tokens None -> no TPOT, but TTFT/E2E/ITL exist
    "no_out": (rec("no_out", offsets=(0.5, 1.0), out=None), 0.5, 1.0, None, [0.5]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scalar_metrics(name):
    r, ttft, e2e, tpot, itl = CASES[name]
    for got, want in ((ttft_s(r), ttft), (e2e_s(r), e2e), (tpot_s(r), tpot)):
        if want is None:
            assert got is None
        else:
            assert got == pytest.approx(want, rel=1e-12)
    assert itl_s(r) == pytest.approx(itl, rel=1e-12)


def test_output_tokens_per_s_and_send_lag():
    r = CASES["multi"][0]
    assert request_output_tokens_per_s(r) == pytest.approx(5 / 1.75)
    assert request_output_tokens_per_s(CASES["failed"][0]) is None
    assert request_output_tokens_per_s(CASES["no_out"][0]) is None
    assert send_lag_s(r) is None
    assert send_lag_s(rec("late", t_intended=9.75)) == 0.25  # 10.0 - 9.75
    assert send_lag_s(rec("late_failed", t_intended=9.5, error="http_503")) == 0.5


def test_achieved_send_rate_counts_sends_inside_the_window_only():
    starts = [100.0 + i * 0.1 for i in range(50)]  # 10/s for 5 s, from 100.0
    assert achieved_send_rate_per_s(starts, 100.0, 105.0) == pytest.approx(10.0)
    assert achieved_send_rate_per_s(starts[:45] + [105.2] * 5, 100.0, 105.0) == pytest.approx(9.0)  # 5 slipped out
    with pytest.raises(ValueError):
        achieved_send_rate_per_s(starts, 105.0, 105.0)


def test_latency_from_the_intended_send_time_adds_the_send_lag():
    late = rec("late", offsets=(0.5, 1.25), tokens=(1, 1), out=2, t_intended=9.75)
    assert ttft_from_intended_s(late) == pytest.approx(0.75)  # first token at 10.5, meant to go at 9.75
    assert e2e_from_intended_s(late) == pytest.approx(1.5)
    assert ttft_from_intended_s(CASES["multi"][0]) is None  # closed loop: no intended time
    assert e2e_from_intended_s(rec("f", offsets=(0.5,), out=1, t_intended=9.0, error="http_503")) is None


def test_itl_per_chunk_when_chunks_carry_one_token_equals_vllm():
    # vLLM's ITL: successive chunk gaps
    r = rec("x", offsets=(0.125, 0.25, 0.5, 1.0), tokens=(1, 1, 1, 1), out=4)
    assert itl_s(r) == [0.125, 0.25, 0.5]


def test_percentiles_linear_interpolation():
    # sorted 1,2,3,4: p50 = 2.5; p90 = 1 + 0.90 * 3 = 3.7; p95 = 3.85; p99 = 3.97
    got = percentiles([4.0, 1.0, None, 3.0, 2.0, float("nan")])
    assert got == pytest.approx({"p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97, "mean": 2.5})
    assert list(percentiles([1.0], qs=(99.9,))) == ["p99.9", "mean"]


def test_percentiles_empty_is_nan():
    got = percentiles([])
    assert set(got) == {"p50", "p90", "p95", "p99", "mean"}
    assert all(math.isnan(v) for v in got.values())


def test_frame_values_for_hand_computed_cases():
    frame = per_request_frame(c[0] for c in CASES.values())
    assert list(frame.columns) == list(FRAME_COLUMNS)
    row = frame.set_index("request_id").loc["multi"]
    assert row["ttft_ms"] == pytest.approx(500.0)
    assert row["e2e_ms"] == pytest.approx(1750.0)
    assert row["tpot_ms"] == pytest.approx(312.5)
    assert row["itl_mean_ms"] == pytest.approx(312.5)  # (250 * 3 + 500) / 4
    assert row["n_chunks"] == 3
    assert row["multi_token_chunks"] == 1
    assert bool(row["ok"]) is True
    first_two = frame.set_index("request_id").loc["first_two"]
    assert first_two["multi_token_chunks"] == 1
    assert first_two["itl_mean_ms"] == pytest.approx(250.0)
    failed = frame.set_index("request_id").loc["failed"]
    assert bool(failed["ok"]) is False and failed["error_category"] == "incomplete_stream"
    assert math.isnan(failed["ttft_ms"]) and math.isnan(failed["itl_mean_ms"])
    assert failed["n_chunks"] == 2


def test_itl_values_ms_hand_computed():
    got = itl_values_ms(c[0] for c in CASES.values())
    # concatenation of every successful case's ITL, in table order, in ms
    want = [v * 1000 for c in CASES.values() for v in c[4]]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # multi 4, first_two 2, no_tokens 2, mismatch 2, zero_count 2, four 4, no_out 1
    assert len(want) == 17


def _agree(records):
    frame = per_request_frame(records)
    assert len(frame) == len(records)
    for i, r in enumerate(records):
        row = frame.iloc[i]
        assert row["request_id"] == r["request_id"]
        assert bool(row["ok"]) == (r["error_category"] is None)
        for col, fn, scale in (
            ("ttft_ms", ttft_s, 1000.0),
            ("e2e_ms", e2e_s, 1000.0),
            ("tpot_ms", tpot_s, 1000.0),
            ("send_lag_ms", send_lag_s, 1000.0),
            ("ttft_from_intended_ms", ttft_from_intended_s, 1000.0),
            ("e2e_from_intended_ms", e2e_from_intended_s, 1000.0),
            ("request_output_tokens_per_s", request_output_tokens_per_s, 1.0),
        ):
            want = fn(r)
            if want is None:
                assert math.isnan(row[col]), (r["request_id"], col)
            else:
                assert row[col] == pytest.approx(want * scale, rel=1e-12), (r["request_id"], col)
        itl = itl_s(r)
        if itl:
            assert row["itl_mean_ms"] == pytest.approx(np.mean(itl) * 1000.0, rel=1e-9)
        else:
            assert math.isnan(row["itl_mean_ms"])
        assert row["n_chunks"] == len(r["chunk_offsets_s"])
    want_itl = [v * 1000.0 for r in records for v in itl_s(r)]
    assert itl_values_ms(records).tolist() == pytest.approx(want_itl, rel=1e-12)


def test_scalar_and_vectorized_agree_on_table():
    _agree([c[0] for c in CASES.values()] + [rec("late", t_intended=9.75, offsets=(0.5,), out=1)])


def test_scalar_and_vectorized_agree_on_random_records():
    rng = random.Random(7)
    records = []
    for i in range(300):
        n = rng.choice([0, 1, 2, 5, 40])
        offsets, t = [], rng.uniform(0.05, 2.0)
        for _ in range(n):
            offsets.append(t)
            t += rng.uniform(0.001, 0.2)
        tokens = None
        if n and rng.random() < 0.7:
            tokens = [rng.choice([1, 1, 1, 2, 3]) for _ in range(n)]
        out = sum(tokens) if tokens else (n if rng.random() < 0.8 else None)
        error = rng.choice([None] * 8 + ["incomplete_stream", "http_503"])
        intended = 10.0 - rng.uniform(0, 0.1) if rng.random() < 0.5 else None
        records.append(rec(f"r{i}", offsets=offsets, tokens=tokens, out=out, error=error, t_intended=intended))
    _agree(records)


def test_empty_inputs():
    frame = per_request_frame([])
    assert list(frame.columns) == list(FRAME_COLUMNS) and len(frame) == 0
    assert itl_values_ms([]).shape == (0,)


def test_public_api():
    for name in metrics.__all__:
        assert getattr(metrics, name).__doc__ or name == "FRAME_COLUMNS"


def test_percentiles_of_an_array_equal_those_of_a_list():
    """Large runs pass numpy arrays (no Python walk); the numbers must not change."""
    values = np.random.default_rng(3).gamma(2.0, 10.0, 50_007)
    values[::1000] = np.nan
    fast = metrics.percentiles(values)
    slow = metrics.percentiles([None if np.isnan(v) else float(v) for v in values])
    assert fast == slow
