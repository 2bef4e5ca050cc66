from analysis.envelope import envelope_sentence, find_envelope
from analysis.rows import TableRow
from analysis.table import evaluate_slos

SLOS = {"ttft_p95_ms": 2000, "error_rate_max": 0.01}


def row(users, *, ttft_p50, ttft_p95, tpot_p50=50.0, e2e_p95=3200.0, error_rate=0.0, errors="", tps=520.0,
        samples=400, waiting=None, kv=None):
    r = TableRow.from_cells(
        pass_name="sweep", stage_name=f"sweep-{users}", stage_index=users, kind="users",
        target_users=users, mean_in_flight=float(users), ok_requests=samples, few_samples="",
        ttft_p50_ms=ttft_p50, ttft_p95_ms=ttft_p95, tpot_p50_ms=tpot_p50, e2e_p95_ms=e2e_p95,
        error_rate=error_rate, errors_by_category=errors, aggregate_output_tokens_per_s=tps,
        output_tokens_p50=128.0, prompt_tokens_p50=303.0, window_note="",
        server_requests_waiting_max=waiting, server_kv_cache_usage_max_ratio=kv,
    )
    results = tuple(evaluate_slos(r, SLOS))
    return r.replace(slo_results=results, slo_pass=all(s.passed for s in results))


def test_queueing_broke_first():
    rows = [row(1, ttft_p50=200, ttft_p95=300, tps=330), row(5, ttft_p50=300, ttft_p95=410),
            row(20, ttft_p50=2400, ttft_p95=2900, tpot_p50=55.0)]
    f = find_envelope(rows)
    assert f.status == "broke" and f.cause == "queueing"
    assert f.safe_row["target_users"] == 5 and f.broke_row["target_users"] == 20
    assert f.broke_slo.key == "ttft_p95_ms"
    s = envelope_sentence(f)
    assert s.startswith(
        "Safe up to 5 concurrent users at 128 output tokens and ~300-token prompts "
        "(p95 TTFT 0.41 s, p95 E2E 3.2 s, 520 output tokens/s). At 20 users p95 TTFT rose to 2.9 s, "
        "over the 2 s SLO, because requests queued in the server"
    )
    assert s.endswith(": TTFT broke first.")
    assert "TTFT p50 x8.0 while TPOT p50 x1.1" in s


def test_errors_broke_first():
    rows = [row(1, ttft_p50=200, ttft_p95=300), row(5, ttft_p50=300, ttft_p95=410),
            row(20, ttft_p50=2400, ttft_p95=2900, error_rate=0.04, errors="http_500:3, timeout_total:1")]
    f = find_envelope(rows)
    assert f.cause == "errors" and f.broke_slo.key == "error_rate_max"
    s = envelope_sentence(f)
    assert ("At 20 users the error rate rose to 4% (http_500:3, timeout_total:1), over the 1% SLO: "
            "errors broke first.") in s


def test_all_pass():
    rows = [row(1, ttft_p50=200, ttft_p95=300), row(20, ttft_p50=300, ttft_p95=500)]
    f = find_envelope(rows)
    assert f.status == "all_pass"
    assert envelope_sentence(f).startswith(
        "Met every SLO up to the highest tested concurrency, 20 users at 128 output tokens"
    )
    assert "the limit is above 20 users." in envelope_sentence(f)


def test_nothing_passes_and_kv_cache():
    rows = [row(1, ttft_p50=2500, ttft_p95=3000, kv=0.95)]
    f = find_envelope(rows)
    assert f.status == "none_pass" and f.cause == "kv_cache"
    s = envelope_sentence(f)
    assert s.startswith("No tested concurrency met every SLO")
    assert "because the server's KV cache ran full" in s and "TTFT broke first" in s


def test_limits_flag_few_samples_and_non_monotonic():
    rows = [row(1, ttft_p50=200, ttft_p95=300, samples=15), row(5, ttft_p50=2400, ttft_p95=2900),
            row(10, ttft_p50=300, ttft_p95=400)]
    rows[0] = rows[0].replace(few_samples="p95,p99")
    f = find_envelope(rows)
    assert f.status == "broke" and f.safe_row["target_users"] == 1
    text = " ".join(f.limits)
    assert "1 user: 15" in text
    assert "p95 rests on fewer than 20 samples at 1 user" in text
    assert "10 users met every SLO again after 5 users failed" in text
