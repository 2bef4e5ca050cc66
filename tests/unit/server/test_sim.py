"""The simulated server: endpoints, vLLM-shaped streams, timing, truth, load model, metrics."""

from __future__ import annotations

import json
import socket
import statistics
import time
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.sim import Distribution, SimConfig, SimServer
from server.sim.tokenizer import count_chat_tokens, split_tokens

CHAT = [{"role": "user", "content": "hi there"}]  # 2 words + 11 template tokens = 13


@contextmanager
def sim(**kwargs):
    server = SimServer(SimConfig(**kwargs))
    url = server.start_in_thread()
    try:
        yield url
    finally:
        server.stop()


def stream_events(client: httpx.Client, url: str, body: dict, headers: dict | None = None):
    """[(arrival perf_counter, payload str)] of a streamed request, plus t_start."""
    events = []
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers or {}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append((time.perf_counter(), line[6:]))
    return t0, events


def chat_body(n: int, **extra) -> dict:
    body = {"model": "sim-model", "messages": CHAT, "max_tokens": n, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update(extra)
    return body


def test_schedule_is_honoured_at_low_load():
    with sim(ttft_s=0.05, itl_s=0.01) as url, httpx.Client() as c:
        c.get(f"{url}/health")  # connect first, so the measured request does not pay for it
        t0, events = stream_events(c, f"{url}/v1/chat/completions", chat_body(30))
        truth = c.get(f"{url}/sim/truth").json()
    content = [(t, json.loads(p)) for t, p in events if p != "[DONE]"]
    tokens = [(t, o) for t, o in content if o["choices"] and o["choices"][0]["delta"].get("content")]
    assert len(tokens) == 30
    ttft_s = tokens[0][0] - t0
    assert abs(ttft_s - 0.05) <= 0.015
    gaps = [b[0] - a[0] for a, b in zip(tokens, tokens[1:])]
    assert abs(statistics.median(gaps) - 0.01) <= 0.003
    rec = truth[-1]
    assert abs(rec["ttft_s"] - 0.05) <= 0.005
    assert abs(rec["e2e_s"] - (0.05 + 29 * 0.01)) <= 0.01
    assert rec["chunk_tokens"] == [1] * 30 and len(rec["chunk_offsets_s"]) == 30


def test_continuous_usage_stream_has_vllm_shape():
    with sim(ttft_s=0.0, itl_s=0.0) as url, httpx.Client() as c:
        _, events = stream_events(c, f"{url}/v1/chat/completions", chat_body(4),
                                  headers={"X-Request-Id": "abc-1"})
    payloads = [p for _, p in events]
    assert payloads[-1] == "[DONE]"
    objs = [json.loads(p) for p in payloads[:-1]]
    assert len(objs) == 1 + 4 + 1
    first = objs[0]
    assert first["id"] == "chatcmpl-abc-1" and first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"]["completion_tokens"] == 0 and first["usage"]["prompt_tokens"] == 13
    for i, o in enumerate(objs[1:5], 1):
        assert o["choices"][0]["delta"] == {"content": " tok"}
        assert o["usage"] == {"prompt_tokens": 13, "total_tokens": 13 + i, "completion_tokens": i,
                              "completion_tokens_details": None}
        assert o["choices"][0]["finish_reason"] == (None if i < 4 else "length")
    assert objs[-1]["choices"] == []
    assert objs[-1]["usage"] == {"prompt_tokens": 13, "total_tokens": 17, "completion_tokens": 4}


def test_include_usage_only_and_no_options():
    with sim(ttft_s=0.0, itl_s=0.0) as url, httpx.Client() as c:
        body = chat_body(3, stream_options={"include_usage": True})
        _, ev = stream_events(c, f"{url}/v1/chat/completions", body)
        objs = [json.loads(p) for _, p in ev[:-1]]
        assert [("usage" in o) for o in objs] == [False, False, False, False, True]
        body = chat_body(3)
        del body["stream_options"]
        _, ev = stream_events(c, f"{url}/v1/chat/completions", body)
        assert [("usage" in json.loads(p)) for _, p in ev[:-1]] == [False] * 4
        assert ev[-1][1] == "[DONE]"


def test_completions_stream_and_multi_token_chunks():
    with sim(ttft_s=0.0, itl_s=0.0, tokens_per_chunk=3) as url, httpx.Client() as c:
        body = {"prompt": "a b c d", "max_tokens": 10, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        _, ev = stream_events(c, f"{url}/v1/completions", body)
        truth = c.get(f"{url}/sim/truth").json()
    objs = [json.loads(p) for _, p in ev[:-1]]
    # no role chunk on /v1/completions; 3+3+3+1 tokens
    assert [o["choices"][0]["text"] for o in objs[:-1]] == [" tok tok tok"] * 3 + [" tok"]
    assert [o["usage"]["completion_tokens"] for o in objs[:-1]] == [3, 6, 9, 10]
    assert objs[0]["id"] == "cmpl-sim-1" and objs[0]["object"] == "text_completion"
    assert objs[-1]["usage"] == {"prompt_tokens": 4, "total_tokens": 14, "completion_tokens": 10}
    assert truth[0]["chunk_tokens"] == [3, 3, 3, 1] and truth[0]["tokens_sent"] == 10


def test_non_streamed_exact_tokens_and_eos():
    with sim(ttft_s=0.0, itl_s=0.0, eos_after_tokens=5) as url, httpx.Client() as c:
        base = {"model": "sim-model", "messages": CHAT}
        r = c.post(f"{url}/v1/chat/completions", json={**base, "max_tokens": 12, "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["message"]["content"] == " tok" * 12
        r = c.post(f"{url}/v1/chat/completions", json={**base, "max_tokens": 12}).json()
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "stop"
        r = c.post(f"{url}/v1/chat/completions", json={**base, "max_completion_tokens": 12, "min_tokens": 8}).json()
        assert r["usage"]["completion_tokens"] == 8
        r = c.post(f"{url}/v1/completions", json={"prompt": "x y", "max_tokens": 3}).json()
        assert r["usage"] == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3,
                              "prompt_tokens_details": None}


def test_tokenize_counts():
    assert split_tokens(" the of  and") == ["Ġthe", "Ġof", "Ġ", "Ġand"]
    assert split_tokens("hello world") == ["hello", "Ġworld"]
    assert count_chat_tokens(CHAT, message_overhead_tokens=5, generation_prompt_tokens=6) == 13
    with sim(max_model_len=321) as url, httpx.Client() as c:
        r = c.post(f"{url}/tokenize", json={"model": "sim-model", "prompt": " the of and",
                                            "add_special_tokens": False, "return_token_strs": True}).json()
        assert r["count"] == 3 and r["token_strs"] == ["Ġthe", "Ġof", "Ġand"] and r["max_model_len"] == 321
        assert len(r["tokens"]) == 3
        msgs = [{"role": "system", "content": "a b"}, {"role": "user", "content": " x y z"}]
        assert c.post(f"{url}/tokenize", json={"messages": msgs}).json()["count"] == 2 + 3 + 5 + 5 + 6
        r = c.post(f"{url}/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
        assert r["count"] == 15 and r["token_strs"] is None


def test_error_bodies_like_vllm():
    with sim(api_key="sk-secret", max_model_len=20) as url, httpx.Client() as c:
        good = {"Authorization": "Bearer sk-secret"}
        assert c.get(f"{url}/health").status_code == 200
        assert c.get(f"{url}/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sk-secret"}):
            r = c.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        models = c.get(f"{url}/v1/models", headers=good).json()
        assert models["data"][0]["id"] == "sim-model" and models["data"][0]["max_model_len"] == 20
        r = c.post(f"{url}/v1/chat/completions", headers=good, json={"model": "other", "messages": CHAT})
        assert r.status_code == 404
        assert r.json() == {"error": {"message": "The model `other` does not exist. Valid aliases: sim-model.",
                                      "type": "NotFoundError", "param": "model", "code": 404}}
        long = [{"role": "user", "content": " w" * 10}]  # 10 + 11 = 21 > 20
        r = c.post(f"{url}/v1/chat/completions", headers=good, json={"model": "sim-model", "messages": long})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "BadRequestError" and err["code"] == 400
        assert err["message"] == "Input length (21) exceeds model's maximum context length (20)."
        # a prompt that fits gets its max_tokens cut to the room left (vLLM >= 0.10 behaviour)
        r = c.post(f"{url}/v1/completions", headers=good, json={"prompt": "a b c", "max_tokens": 100})
        assert r.json()["usage"]["completion_tokens"] == 17
        assert c.get(f"{url}/version").json()["version"].startswith("0.32")


def _metrics(c: httpx.Client, url: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(c.get(f"{url}/metrics").text):
        for s in fam.samples:
            key = s.name if s.name != "vllm:request_success_total" else f"{s.name}:{s.labels['finished_reason']}"
            if "le" in s.labels:
                key = f"{s.name}:{s.labels['le']}"
            out[key] = s.value
    return out


def test_metrics_counters_equal_requests_served():
    with sim(ttft_s=0.0, itl_s=0.001) as url, httpx.Client() as c:
        for _ in range(3):
            stream_events(c, f"{url}/v1/chat/completions", chat_body(5))
        c.post(f"{url}/v1/completions", json={"prompt": "a b c d", "max_tokens": 2})
        m = _metrics(c, url)
    assert m["vllm:generation_tokens_total"] == 3 * 5 + 2
    assert m["vllm:prompt_tokens_total"] == 3 * 13 + 4
    assert m["vllm:request_success_total:length"] == 4
    assert m["vllm:time_to_first_token_seconds_count"] == 4
    assert m["vllm:inter_token_latency_seconds_count"] == 3 * 4 + 1
    assert m["vllm:e2e_request_latency_seconds_count"] == 4
    assert m["vllm:request_queue_time_seconds_count"] == 4
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:num_preemptions_total"] == 0
    assert m["vllm:time_to_first_token_seconds_bucket:+Inf"] == 4


def _open_stream(port: int, body: dict) -> socket.socket:
    """Send a streamed request on a raw socket and leave the response unread."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%b" % (len(data), data))
    return s


def _wait_for(pred, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_batch_limit_queues_requests_and_kv_usage():
    server = SimServer(SimConfig(ttft_s=30.0, batch_limit=2, kv_cache_capacity_tokens=100))
    url = server.start_in_thread()
    socks = []
    try:
        with httpx.Client() as c:
            socks = [_open_stream(server.port, chat_body(5)) for _ in range(5)]
            m = _wait_for(lambda: (m := _metrics(c, url))["vllm:num_requests_waiting"] == 3 and m)
            assert m["vllm:num_requests_running"] == 2
            assert m["vllm:kv_cache_usage_perc"] == pytest.approx(2 * 13 / 100)
            for s in socks:
                s.close()
            _wait_for(lambda: _metrics(c, url)["vllm:num_requests_running"] == 0)
            truth = c.get(f"{url}/sim/truth").json()
            assert m["vllm:num_requests_waiting"] == 3
        assert sorted(r["outcome"] for r in truth) == ["client_disconnected"] * 5
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_queued_requests_wait_and_itl_grows_with_batch():
    # B=1: the second request waits for the first; alpha stretches ITL only while both run (never here)
    with sim(ttft_s=0.02, itl_s=0.005, batch_limit=1) as url, httpx.Client() as c:
        socks = [_open_stream(int(url.rsplit(":", 1)[1]), chat_body(4)) for _ in range(2)]
        truth = _wait_for(lambda: len(t := c.get(f"{url}/sim/truth").json()) == 2 and t)
        for s in socks:
            s.close()
    first, second = sorted(truth, key=lambda r: r["queue_s"])
    assert first["queue_s"] < 0.005
    # the second is admitted when the first finishes (ttft + 3 gaps), then gets its own ttft
    assert second["t_admitted_s"] >= first["t_last_token_s"]
    assert 0.035 - 0.003 <= second["queue_s"] <= 0.035 + 0.03
    assert second["ttft_s"] - second["queue_s"] == pytest.approx(0.02, abs=0.01)
    with sim(ttft_s=0.0, itl_s=0.01, itl_batch_alpha=1.0, itl_per_request=True) as url, httpx.Client() as c:
        port = int(url.rsplit(":", 1)[1])
        socks = [_open_stream(port, chat_body(6)) for _ in range(2)]
        truth = _wait_for(lambda: len(t := c.get(f"{url}/sim/truth").json()) == 2 and t)
        for s in socks:
            s.close()
    for rec in truth:  # two running: every gap is 0.01 * (1 + 1 * (2 - 1))
        gaps = [b - a for a, b in zip(rec["chunk_offsets_s"], rec["chunk_offsets_s"][1:])]
        assert statistics.median(gaps) == pytest.approx(0.02, abs=0.004)


def test_kv_overflow_preempts_and_still_completes():
    # prompts of 13 tokens, capacity 30: two fit, and growing past 30 preempts the newest
    with sim(ttft_s=0.0, itl_s=0.002, kv_cache_capacity_tokens=30) as url, httpx.Client() as c:
        port = int(url.rsplit(":", 1)[1])
        socks = [_open_stream(port, chat_body(10)) for _ in range(2)]
        truth = _wait_for(lambda: len(t := c.get(f"{url}/sim/truth").json()) == 2 and t)
        m = _metrics(c, url)
        for s in socks:
            s.close()
    assert [r["tokens_sent"] for r in truth] == [10, 10]
    assert sum(r["preemptions"] for r in truth) == m["vllm:num_preemptions_total"] >= 1


def test_client_disconnect_is_recorded_and_frees_the_slot():
    with sim(ttft_s=0.0, itl_s=0.01) as url, httpx.Client() as c:
        with c.stream("POST", f"{url}/v1/chat/completions", json=chat_body(500),
                      headers={"X-Request-Id": "gone"}) as r:
            for line in r.iter_lines():
                if '"completion_tokens":3' in line:
                    break
        rec = _wait_for(lambda: (t := c.get(f"{url}/sim/truth").json()) and t[0])
        assert rec["request_id"] == "gone" and rec["outcome"] == "client_disconnected"
        assert 3 <= rec["tokens_sent"] < 500
        assert _metrics(c, url)["vllm:num_requests_running"] == 0


def test_truth_since_and_file(tmp_path):
    path = tmp_path / "truth.jsonl"
    with sim(ttft_s=0.0, itl_s=0.0, truth_file=str(path)) as url, httpx.Client() as c:
        for i in range(3):
            c.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers={"x-request-id": f"r{i}"})
        later = c.get(f"{url}/sim/truth", params={"since": 1}).json()
    assert [r["request_id"] for r in later] == ["r1", "r2"] and [r["index"] for r in later] == [1, 2]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == ["r0", "r1", "r2"]


def test_distributions_are_seeded_and_clipped():
    import random

    d = Distribution(kind="normal", value_s=0.05, stddev_s=0.5, low_s=0.01, high_s=0.08)
    draws = [d.sample_s(random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    assert all(0.01 <= d.sample_s(random.Random(i)) <= 0.08 for i in range(200))
    u = Distribution(kind="uniform", low_s=0.1, high_s=0.2)
    assert all(0.1 <= u.sample_s(random.Random(i)) <= 0.2 for i in range(50))
    ln = Distribution(kind="lognormal", value_s=0.1, sigma=0.0)
    assert ln.sample_s(random.Random(0)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Distribution(kind="uniform", low_s=0.2)
