"""The Locust users against the real CPU vLLM: exact token counts, records vs Locust vs the server's counters."""

from __future__ import annotations

import random

import pytest
from geventhttpclient.client import HTTPClientPool

from envelope import metrics
from envelope.prompts import TokenizerProbe, calibrate
from envelope.stream import StreamObserver
from helpers.locust_runs import (
    REPO,
    files_containing,
    generation_tokens_total,
    locust_request_count,
    probe_tokens,
    records,
    run_locust,
    stages,
)
from locustfiles.transports import RequestSpec, stream_fasthttp, stream_openai

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SMOKE = REPO / "scenarios" / "smoke.yaml"


def _assert_run_consistent(run_dir, server_tokens_delta):
    recs = records(run_dir)
    assert recs, "no records were written"
    # Every request must succeed with exactly the requested lengths. A request that Locust itself
    # stopped at the very end (a race in Locust's stop of zero-wait users) is kept as "cancelled".
    done = [r for r in recs if r["error_category"] != "cancelled"]
    assert len(done) >= len(recs) - 2
    assert [r["error_category"] for r in done if r["error_category"]] == []
    assert all(r["output_tokens"] == r["requested_output_tokens"] for r in done)
    assert all(not r["output_tokens_estimated"] for r in done)
    assert all(r["prompt_tokens"] == r["requested_prompt_tokens"] for r in done)
    # one record per request Locust counted, and the server generated exactly what we recorded (and what
    # the capability probe asked for before the load, once per run)
    assert len(recs) == locust_request_count(run_dir)
    probe_output, _ = probe_tokens(run_dir)
    assert 0 < probe_output <= 16
    assert sum(r["output_tokens"] for r in recs) + probe_output == server_tokens_delta
    return recs


def test_smoke_run_matches_locust_and_the_server(vllm_server, tmp_path):
    run_dir = tmp_path / "run"
    before = generation_tokens_total(vllm_server.metrics_url)
    proc = run_locust(vllm_server.base_url, vllm_server.api_key.get(), SMOKE, run_dir, "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = generation_tokens_total(vllm_server.metrics_url)

    recs = _assert_run_consistent(run_dir, after - before)
    assert {r["requested_output_tokens"] for r in recs} == {32}
    assert proc.returncode == 0
    st = stages(run_dir)
    assert [s["stage_name"] for s in st] == ["smoke-1u", "smoke-2u"]
    assert all(s["end_unix_s"] is not None and s["end_unix_s"] > s["start_unix_s"] for s in st)
    assert {r["stage_name"] for r in recs} == {"smoke-1u", "smoke-2u"}
    # TTFT and TPOT are separate Locust entries, one per request that has them. (A random-weight
    # model can emit tokens that decode to no visible text: those requests have no TTFT.)
    with_ttft = [r for r in recs if r["t_first_token_s"] is not None]
    assert len(with_ttft) >= 0.9 * len(recs)
    assert locust_request_count(run_dir, "TTFT") == len(with_ttft)
    assert locust_request_count(run_dir, "E2E") == sum(1 for r in recs if r["error_category"] != "cancelled")
    assert locust_request_count(run_dir, "TPOT") == sum(1 for r in recs if metrics.tpot_s(r) is not None)
    # the key never lands in the run directory; prompts are not recorded by default
    assert files_containing(run_dir, vllm_server.api_key.get()) == []
    assert all(r["prompt_text"] is None and r["completion_text"] is None for r in recs)


def test_processes_two_workers_write_into_one_run_directory(vllm_server, tmp_path):
    import yaml

    # the smoke scenario with 3 s stages (--quick keeps 5 s): a short request takes ~0.3 s here, so each
    # worker still makes several in the 2-user stage
    scenario = yaml.safe_load(SMOKE.read_text())
    for stage in scenario["passes"][0]["stages"]:
        stage["duration_s"] = 3
    short = tmp_path / "smoke-3s.yaml"
    short.write_text(yaml.safe_dump(scenario, sort_keys=False))
    run_dir = tmp_path / "run"
    before = generation_tokens_total(vllm_server.metrics_url)
    proc = run_locust(vllm_server.base_url, vllm_server.api_key.get(), short, run_dir, "--processes", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = generation_tokens_total(vllm_server.metrics_url)
    recs = _assert_run_consistent(run_dir, after - before)
    assert len({r["worker_id"] for r in recs}) == 2
    assert len(list((run_dir / "records").glob("*.jsonl"))) == 2


def test_fasthttp_and_openai_clients_record_the_same_stream(vllm_server):
    """Greedy decoding of one prompt gives one stream; both clients must describe it identically."""
    import httpx

    headers = {"Authorization": f"Bearer {vllm_server.api_key.get()}"}
    with httpx.Client(base_url=vllm_server.base_url, headers=headers, timeout=30) as http:
        def post(path, body):
            r = http.post(path, json=body)
            r.raise_for_status()
            return r.json()

        factory = calibrate(TokenizerProbe(post, vllm_server.served_model_name))
    built = factory.chat(120, random.Random(42))
    body = {"model": vllm_server.served_model_name, "messages": built.messages, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 24, "min_tokens": 24, "ignore_eos": True, "temperature": 0.0}
    spec = RequestSpec(path="/v1/chat/completions", body=body, headers=headers, connect_timeout_s=10,
                       first_token_timeout_s=60, total_timeout_s=120)

    import time

    obs_fast = StreamObserver(time.perf_counter(), keep_text=True)
    pool = HTTPClientPool(connection_timeout=10, network_timeout=120)
    try:
        out_fast = stream_fasthttp(pool, vllm_server.base_url, spec, obs_fast)
    finally:
        pool.close()
    fast = obs_fast.finish(time.perf_counter(), error_category=out_fast.error_category,
                           http_status=out_fast.http_status)

    import openai

    client = openai.OpenAI(base_url=vllm_server.base_url + "/v1", api_key=vllm_server.api_key.get(), max_retries=0)
    obs_sdk = StreamObserver(time.perf_counter(), keep_text=True)
    try:
        out_sdk = stream_openai(client, spec, obs_sdk)
    finally:
        client.close()
    sdk = obs_sdk.finish(time.perf_counter(), error_category=out_sdk.error_category, http_status=out_sdk.http_status)

    same = ("prompt_tokens", "output_tokens", "output_tokens_estimated", "output_tokens_client_estimate",
            "chunk_tokens", "error_category", "http_status", "completion_text")
    assert {k: fast[k] for k in same} == {k: sdk[k] for k in same}
    assert fast["output_tokens"] == 24 and fast["prompt_tokens"] == 120
    assert len(fast["chunk_offsets_s"]) == len(sdk["chunk_offsets_s"])


def test_capstone_quick_runs_every_pass(capstone_run):
    run_dir, server_delta = capstone_run
    recs = _assert_run_consistent(run_dir, server_delta)
    st = stages(run_dir)
    assert [s["pass_name"] for s in st] == ["alive", "batching", "queueing", "long-context"]
    assert {r["pass_name"] for r in recs} == {"alive", "batching", "queueing", "long-context"}
    long_ctx = [r for r in recs if r["pass_name"] == "long-context"]
    # long-context prompts are sized from the server's max_model_len
    assert min(r["prompt_tokens"] for r in long_ctx) > 3000
