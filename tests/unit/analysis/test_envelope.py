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


def _unexplained(**broke_cells):
    """A stage that failed its TTFT SLO while the client-side rules see no cause (TTFT p50 x1.3, TPOT flat)."""
    safe = row(5, ttft_p50=300, ttft_p95=410).replace(server_queue_mean_ms=1.0, server_prefill_mean_ms=20.0,
                                                       server_decode_mean_ms=500.0, ttft_mean_ms=320.0)
    broke = row(20, ttft_p50=390, ttft_p95=2100).replace(**{
        "server_queue_mean_ms": 1.5, "server_prefill_mean_ms": 25.0, "server_decode_mean_ms": 520.0,
        "ttft_mean_ms": 400.0, **broke_cells})
    return [row(1, ttft_p50=200, ttft_p95=300), safe, broke]


def test_unknown_stays_unknown_without_server_growth():
    f = find_envelope(_unexplained())
    assert f.cause == "unknown"
    assert f.evidence == ("from 5 users, TTFT p50 x1.3 while TPOT p50 x1.0",)


def test_server_queue_time_growing_reads_as_queueing():
    f = find_envelope(_unexplained(server_queue_mean_ms=250.0))
    assert f.cause == "queueing"
    s = envelope_sentence(f)
    assert "over the 2 s SLO, because requests queued in the server (" in s
    assert "server queue time mean 1 -> 250 ms from 5 users" in s


def test_server_prefill_growing_reads_as_long_prompts_and_decode_as_batch_size():
    f = find_envelope(_unexplained(server_prefill_mean_ms=400.0, server_decode_mean_ms=800.0))
    assert f.cause == "long_prompts"  # prefill grew by 380 ms, decode by 300 ms: the larger growth names it
    assert "because the server took longer to process the prompts (prefill)" in envelope_sentence(f)
    assert f.evidence[1:] == ("server prefill time mean 20 -> 400 ms from 5 users",
                              "server decode time mean 500 -> 800 ms from 5 users")
    f = find_envelope(_unexplained(server_decode_mean_ms=900.0))
    assert f.cause == "decode_slowdown"
    assert "because every output token got slower as the batch grew" in envelope_sentence(f)


def test_time_outside_the_engine_reads_as_the_measurement_setup():
    f = find_envelope(_unexplained(outside_engine_ttft_mean_ms=300.0, server_queue_mean_ms=250.0))
    assert f.cause == "measurement"  # first: the numbers do not describe the server
    s = envelope_sentence(f)
    assert "the measurement setup (front end, network, load generator), not the server, is the limit" in s
    assert "75% of the client's mean TTFT (400 ms) was spent outside the engine" in s
    # under 50 ms, or under half of the client's mean, is not the setup's doing
    assert find_envelope(_unexplained(outside_engine_ttft_mean_ms=45.0, ttft_mean_ms=60.0)).cause == "unknown"
    assert find_envelope(_unexplained(outside_engine_ttft_mean_ms=190.0)).cause == "unknown"


def test_server_evidence_is_added_to_a_cause_the_client_rules_found():
    rows = [row(1, ttft_p50=200, ttft_p95=300, tps=330), row(5, ttft_p50=300, ttft_p95=410).replace(
                server_queue_mean_ms=2.0),
            row(20, ttft_p50=2400, ttft_p95=2900, tpot_p50=55.0).replace(server_queue_mean_ms=2000.0)]
    f = find_envelope(rows)
    assert f.cause == "queueing"
    assert f.evidence == ("from 5 users, TTFT p50 x8.0 while TPOT p50 x1.1",
                          "server queue time mean 2 -> 2,000 ms from 5 users")
