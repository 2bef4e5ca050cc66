"""Open-loop (rate) stages in the table: achieved rate, send lag, latency from the intended time, trust."""

from __future__ import annotations

import io

import pytest

from analysis.load import load_run
from analysis.rows import TableRow
from analysis.table import WindowRule, envelope_table, trust_reasons, write_table_markdown

def _rate_stage(make_stage, index, rate, start, end, **extra):
    st = make_stage(index, 0, start, end)
    st.update(kind="rate", target_users=None, spawn_rate=None, target_rate_per_s=rate, arrival="constant",
              burstiness=None, max_concurrency=None, stage_name=f"rate-{rate:g}", **extra)
    return st


def _sent(make_record, stage, intended_unix_s, lag_s, ttft_s=0.1):
    """A record meant to go at ``intended_unix_s`` and sent ``lag_s`` later (t_* share the record's clock)."""
    rec = make_record(stage, intended_unix_s + lag_s, ttft_s)
    rec["t_intended_s"] = rec["t_start_s"] - lag_s
    return rec


def test_a_rate_stage_delivered_on_time_is_trustworthy(builders, tmp_path):
    make_stage, make_record, write_run = builders
    st = _rate_stage(make_stage, 0, 2.0, 1000.0, 1020.0, client_loop_lag_max_ms=3.0, client_cpu_max_percent=20.0)
    recs = [_sent(make_record, st, 1000.0 + i * 0.5, 0.001) for i in range(40)]  # 2/s for 20 s, 1 ms late each
    (row,) = envelope_table(load_run(write_run(tmp_path / "r", stages=[st], records=recs)), rule=WindowRule(settle_s=5))
    assert row["achieved_rate_per_s"] == pytest.approx(2.0)
    assert row["send_lag_p50_ms"] == pytest.approx(1.0) and row["send_lag_p99_ms"] == pytest.approx(1.0)
    # latency from the intended time = TTFT + lag
    assert row["ttft_p50_ms"] == pytest.approx(100.0)
    assert row["ttft_from_intended_p50_ms"] == pytest.approx(101.0)
    assert row["trustworthy"] is True and row["untrustworthy_reasons"] == ""


def test_a_rate_stage_that_fell_behind_is_flagged_with_why(builders, tmp_path):
    make_stage, make_record, write_run = builders
    st = _rate_stage(make_stage, 0, 2.0, 1000.0, 1020.0, client_loop_lag_max_ms=800.0, client_cpu_max_percent=97.0)
    # the last 4 of 40 arrivals were sent after the stage ended: 36 in 20 s = 1.8/s, 10% short
    recs = [_sent(make_record, st, 1000.0 + i * 0.5, 3.0 if i >= 36 else 0.0) for i in range(40)]
    (row,) = envelope_table(load_run(write_run(tmp_path / "r", stages=[st], records=recs)), rule=WindowRule(settle_s=5))
    assert row["achieved_rate_per_s"] == pytest.approx(1.8)
    assert row["send_lag_p99_ms"] == pytest.approx(3000.0)
    assert row["trustworthy"] is False
    reasons = row["untrustworthy_reasons"]
    assert "sent 1.8 requests/s of the 2/s asked (10% short)" in reasons
    assert "sent late: send lag p99 3000 ms, over the 50 ms a schedule allows" in reasons
    assert "CPU-saturated (97% of a core)" in reasons and "stalled up to 800 ms" in reasons
    sink = io.StringIO()
    write_table_markdown([row], sink)
    assert "NOT TRUSTWORTHY: sent 1.8 requests/s" in sink.getvalue()


@pytest.mark.parametrize("row, flagged", [
    ({"kind": "rate", "target_rate_per_s": 10.0, "achieved_rate_per_s": 9.81}, False),  # within 2%
    ({"kind": "rate", "target_rate_per_s": 10.0, "achieved_rate_per_s": 9.79}, True),
    ({"kind": "users", "client_loop_lag_max_ms": 50.0}, False),  # the limit itself passes
    ({"kind": "users", "client_loop_lag_max_ms": 51.0}, True),
    ({"kind": "users", "client_cpu_max_percent": 89.0}, False),
    ({"kind": "users", "client_saturated": True}, True),
    # a replay (or any schedule) sent late beyond what a stall may explain: the client could not keep up
    ({"kind": "rate", "send_lag_p99_ms": 50.0}, False),
    ({"kind": "rate", "send_lag_p99_ms": 51.0}, True),
    ({"kind": "rate", "send_lag_p99_ms": 900.0, "max_concurrency": 4}, False),  # waiting for a slot: by design
])
def test_trust_rules(row, flagged):
    assert bool(trust_reasons(TableRow.from_cells(**row))) is flagged
