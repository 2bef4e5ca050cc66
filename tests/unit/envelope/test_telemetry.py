"""Tests for envelope.telemetry: /metrics parsing, histogram math, samplers, recorder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest

from envelope.telemetry import (
    GpuSampler,
    HostSampler,
    MetricsSampler,
    TelemetryRecorder,
    _next_tick_s,
    histogram_delta,
    histogram_quantile,
    parse_vllm_metrics,
    read_telemetry,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "metrics"
NEW_TEXT = (FIXTURES / "vllm_0.32_dp2.txt").read_text()
OLD_TEXT = (FIXTURES / "vllm_old_v0.txt").read_text()
REAL = FIXTURES / "vllm_cpu_0.32_real.txt"

TTFT_LES = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
            5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_LES = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0]
REQ_LES = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def cumulative(les: list[float], observations: list[float]) -> list[list[float]]:
    """Expected cumulative buckets, counted the slow obvious way (le is inclusive)."""
    return [[le, float(sum(1 for v in observations if v <= le))] for le in les]


# --------------------------------------------------------------------------- parsing


def test_parse_new_fixture_sums_engines():
    # Engine 0 and engine 1 of tiny-qwen3, values chosen in tests/fixtures/metrics/generate.py.
    m = parse_vllm_metrics(NEW_TEXT)
    assert m["requests_running"] == 5.0  # 3 + 2
    assert m["requests_waiting"] == 1.0  # 1 + 0; not the *_by_reason gauge
    assert m["kv_cache_usage_ratio"] == 0.375  # mean of 0.5 and 0.25, not their sum
    assert m["kv_cache_usage_max_ratio"] == 0.5
    assert m["preemptions_total"] == 7.0  # 4 + 3
    assert m["prompt_tokens_total"] == 4500.0  # 3000 + 1500; not prompt_tokens_cached
    assert m["generation_tokens_total"] == 1920.0
    h = m["histograms"]
    # Buckets spelled out once by hand for TTFT: observations 0.0625, 0.25, 0.375, 1.25 | 0.09375, 0.625
    assert h["ttft_s"]["buckets"][6:13] == [[0.08, 1.0], [0.1, 2.0], [0.25, 3.0], [0.5, 4.0],
                                            [0.75, 5.0], [1.0, 5.0], [2.5, 6.0]]
    assert h["ttft_s"] == {
        "sum": 2.65625, "count": 6.0,
        "buckets": cumulative(TTFT_LES, [0.0625, 0.25, 0.375, 1.25, 0.09375, 0.625]),
    }
    # ITL comes from the new name, not request_time_per_output_token_seconds (7 s each).
    assert h["itl_s"] == {
        "sum": 0.796875, "count": 6.0,
        "buckets": cumulative(ITL_LES, [0.03125, 0.03125, 0.0625, 0.125, 0.046875, 0.5]),
    }
    assert h["e2e_s"] == {
        "sum": 24.0, "count": 6.0,
        "buckets": cumulative(REQ_LES, [0.75, 2.25, 4.0, 12.0, 1.5, 3.5]),
    }
    assert h["queue_s"]["sum"] == 2.875
    assert h["queue_s"]["count"] == 6.0
    assert h["queue_s"]["buckets"][:6] == [[0.3, 4.0], [0.5, 5.0], [0.8, 5.0], [1.0, 5.0],
                                           [1.5, 5.0], [2.0, 6.0]]


def test_parse_old_fixture_uses_old_names():
    m = parse_vllm_metrics(OLD_TEXT)
    assert m["requests_running"] == 2.0
    assert m["requests_waiting"] == 4.0
    assert m["kv_cache_usage_ratio"] == 0.875  # vllm:gpu_cache_usage_perc, not cpu_cache
    assert m["preemptions_total"] == 9.0
    assert m["prompt_tokens_total"] == 2048.0
    assert m["generation_tokens_total"] == 512.0
    h = m["histograms"]
    assert h["ttft_s"] == {
        "sum": 3.5, "count": 3.0,
        "buckets": [[0.001, 0.0], [0.005, 0.0], [0.01, 0.0], [0.02, 0.0], [0.04, 0.0],
                    [0.06, 0.0], [0.08, 0.0], [0.1, 0.0], [0.25, 1.0], [0.5, 2.0],
                    [0.75, 2.0], [1.0, 2.0], [2.5, 2.0], [5.0, 3.0], [7.5, 3.0], [10.0, 3.0]],
    }
    # vllm:time_per_output_token_seconds: 0.0625, 0.0625, 0.1875, 0.25
    assert h["itl_s"]["sum"] == 0.5625
    assert h["itl_s"]["count"] == 4.0
    assert h["itl_s"]["buckets"][2:8] == [[0.05, 0.0], [0.075, 2.0], [0.1, 2.0], [0.15, 2.0],
                                          [0.2, 3.0], [0.3, 4.0]]
    assert h["e2e_s"] == {
        "sum": 10.0, "count": 2.0,
        "buckets": [[1.0, 0.0], [2.5, 1.0], [5.0, 1.0], [10.0, 2.0], [15.0, 2.0], [20.0, 2.0],
                    [30.0, 2.0], [40.0, 2.0], [50.0, 2.0], [60.0, 2.0]],
    }
    assert h["queue_s"] is None  # this server had no queue-time histogram
    assert h["prefill_s"] is None and h["decode_s"] is None  # nor the V1 engine's phase histograms


def test_prefill_and_decode_histograms_by_their_vllm_names():
    # vllm:request_prefill_time_seconds / vllm:request_decode_time_seconds, summed over engines;
    # the dp2 fixture has prefill (one 0.5 s observation on engine 0) and no decode histogram.
    h = parse_vllm_metrics(NEW_TEXT)["histograms"]
    assert h["prefill_s"] == {"sum": 0.5, "count": 1.0, "buckets": cumulative(REQ_LES, [0.5])}
    assert h["decode_s"] is None
    text = (
        "# TYPE vllm:request_decode_time_seconds histogram\n"
        'vllm:request_decode_time_seconds_bucket{le="0.5",model_name="m"} 1\n'
        'vllm:request_decode_time_seconds_bucket{le="1.0",model_name="m"} 3\n'
        'vllm:request_decode_time_seconds_bucket{le="+Inf",model_name="m"} 4\n'
        'vllm:request_decode_time_seconds_count{model_name="m"} 4\n'
        'vllm:request_decode_time_seconds_sum{model_name="m"} 4.25\n'
    )
    assert parse_vllm_metrics(text)["histograms"]["decode_s"] == {
        "sum": 4.25, "count": 4.0, "buckets": [[0.5, 1.0], [1.0, 3.0]]}


TWO_MODELS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 2
vllm:num_requests_running{model_name="b"} 5
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} 0.2
vllm:kv_cache_usage_perc{model_name="b"} 0.6
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="a"} 100
vllm:generation_tokens_created{model_name="a"} 1.7e9
vllm:generation_tokens_total{model_name="b"} 23
vllm:generation_tokens_created{model_name="b"} 1.7e9
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="a"} 1
vllm:e2e_request_latency_seconds_bucket{le="5.0",model_name="a"} 3
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a"} 4
vllm:e2e_request_latency_seconds_count{model_name="a"} 4
vllm:e2e_request_latency_seconds_sum{model_name="a"} 20.5
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="b"} 0
vllm:e2e_request_latency_seconds_bucket{le="5.0",model_name="b"} 2
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="b"} 2
vllm:e2e_request_latency_seconds_count{model_name="b"} 2
vllm:e2e_request_latency_seconds_sum{model_name="b"} 7.0
"""


def test_parse_sums_over_label_sets():
    m = parse_vllm_metrics(TWO_MODELS)
    assert m["requests_running"] == 7.0
    assert m["kv_cache_usage_ratio"] == pytest.approx(0.4)
    assert m["kv_cache_usage_max_ratio"] == 0.6
    assert m["generation_tokens_total"] == 123.0  # _created samples are not added in
    assert m["histograms"]["e2e_s"] == {"sum": 27.5, "count": 6.0, "buckets": [[1.0, 1.0], [5.0, 5.0]]}


def test_missing_metrics_are_none_not_zero():
    m = parse_vllm_metrics(TWO_MODELS)
    assert m["requests_waiting"] is None
    assert m["preemptions_total"] is None
    assert m["prompt_tokens_total"] is None
    assert m["histograms"]["ttft_s"] is None
    empty = parse_vllm_metrics("")
    assert empty == {
        "requests_running": None, "requests_waiting": None, "kv_cache_usage_ratio": None,
        "kv_cache_usage_max_ratio": None, "preemptions_total": None, "prompt_tokens_total": None,
        "generation_tokens_total": None, "prefix_cache_queries_total": None, "prefix_cache_hits_total": None,
        "histograms": {"ttft_s": None, "itl_s": None, "e2e_s": None, "queue_s": None,
                       "prefill_s": None, "decode_s": None},
    }


def test_zero_is_kept_as_zero():
    m = parse_vllm_metrics("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n")
    assert m["requests_waiting"] == 0.0


def test_new_name_wins_over_deprecated_name():
    text = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc 0.25
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc 0.25
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{le="0.1"} 3
vllm:inter_token_latency_seconds_bucket{le="+Inf"} 3
vllm:inter_token_latency_seconds_count 3
vllm:inter_token_latency_seconds_sum 0.15
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.1"} 3
vllm:time_per_output_token_seconds_bucket{le="+Inf"} 3
vllm:time_per_output_token_seconds_count 3
vllm:time_per_output_token_seconds_sum 0.15
"""
    m = parse_vllm_metrics(text)
    assert m["kv_cache_usage_ratio"] == 0.25  # not 0.5
    assert m["histograms"]["itl_s"] == {"sum": 0.15, "count": 3.0, "buckets": [[0.1, 3.0]]}


@pytest.mark.parametrize(
    "text",
    [
        # TYPE with the base name (OpenMetrics style): the family is "vllm:num_preemptions"
        "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions_total 3\n",
        # no TYPE at all: an untyped family that keeps "_total" in its name
        "vllm:num_preemptions_total 3\n",
        # the counter as some very old clients sent it, without "_total"
        "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions 3\n",
    ],
)
def test_counter_found_however_the_family_is_named(text):
    assert parse_vllm_metrics(text)["preemptions_total"] == 3.0


def test_malformed_text_raises_value_error():
    with pytest.raises(ValueError):
        parse_vllm_metrics("vllm:num_requests_running{model_name=} not-a-number\n")


@pytest.mark.skipif(not REAL.exists(), reason="no /metrics text recorded from a real vLLM server")
def test_parse_real_recorded_text():
    m = parse_vllm_metrics(REAL.read_text())
    assert m["requests_running"] is not None and m["requests_running"] >= 0
    assert m["kv_cache_usage_ratio"] is not None and 0 <= m["kv_cache_usage_ratio"] <= 1
    for name in ("ttft_s", "itl_s", "e2e_s", "queue_s", "prefill_s", "decode_s"):
        hist = m["histograms"][name]
        assert hist is not None, name
        counts = [c for _, c in hist["buckets"]]
        assert counts == sorted(counts) and counts[-1] <= hist["count"]


# --------------------------------------------------------------------------- histogram math

H = {"sum": 14.0, "count": 10.0, "buckets": [[1.0, 2.0], [2.0, 6.0], [4.0, 8.0]]}  # 2 above 4.0


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 1.75),  # rank 5: bucket (1, 2] holds ranks 2..6 -> 1 + 1 * (5 - 2) / 4
        (0.1, 0.5),  # rank 1: first bucket starts at 0 -> 0 + 1 * 1 / 2
        (0.7, 3.0),  # rank 7: bucket (2, 4] holds 6..8 -> 2 + 2 * (7 - 6) / 2
        (0.8, 4.0),  # rank 8: exactly the top of (2, 4]
        (0.95, 4.0),  # rank 9.5 is in +Inf: the largest finite bound
        (0.0, 0.0),
    ],
)
def test_histogram_quantile_hand_computed(q, expected):
    assert histogram_quantile(H, q) == pytest.approx(expected)


def test_histogram_quantile_edges():
    assert histogram_quantile({"sum": 0.0, "count": 0.0, "buckets": [[1.0, 0.0]]}, 0.5) is None
    assert histogram_quantile(None, 0.5) is None
    assert histogram_quantile({"sum": 3.0, "count": 4.0, "buckets": [[1.0, 0.0], [2.0, 4.0]]}, 0.0) == 0.0
    with pytest.raises(ValueError):
        histogram_quantile(H, 1.5)


def test_histogram_quantile_on_fixture_ttft():
    ttft = parse_vllm_metrics(NEW_TEXT)["histograms"]["ttft_s"]
    # rank 3 of 6 is the top of (0.1, 0.25]; rank 5.4 is in (1.0, 2.5], which holds rank 5..6
    assert histogram_quantile(ttft, 0.5) == pytest.approx(0.25)
    assert histogram_quantile(ttft, 0.9) == pytest.approx(1.0 + 1.5 * 0.4)


def test_histogram_delta_hand_computed():
    later = {"sum": 20.5, "count": 13.0, "buckets": [[1.0, 3.0], [2.0, 9.0], [4.0, 12.0]]}
    assert histogram_delta(H, later) == {
        "sum": 6.5, "count": 3.0, "buckets": [[1.0, 1.0], [2.0, 3.0], [4.0, 4.0]],
    }
    assert histogram_delta(None, later) is None
    assert histogram_delta(H, None) is None


def test_histogram_delta_rejects_mismatch_and_reset():
    other_bounds = {"sum": 20.0, "count": 13.0, "buckets": [[1.0, 3.0], [3.0, 9.0], [4.0, 12.0]]}
    with pytest.raises(ValueError, match="bucket bounds"):
        histogram_delta(H, other_bounds)
    restarted = {"sum": 1.0, "count": 1.0, "buckets": [[1.0, 1.0], [2.0, 1.0], [4.0, 1.0]]}
    with pytest.raises(ValueError, match="went down"):
        histogram_delta(H, restarted)


# --------------------------------------------------------------------------- MetricsSampler


def metrics_sampler(handler) -> MetricsSampler:
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return MetricsSampler("http://vllm.test/metrics", client=client)


def test_metrics_sampler_200():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, text=NEW_TEXT)

    before = time.time()
    s = metrics_sampler(handler).sample()
    assert seen == ["/metrics"]
    assert s["ok"] is True
    assert before <= s["t_unix_s"] <= time.time()
    assert s["requests_running"] == 5.0
    assert s["histograms"]["e2e_s"]["sum"] == 24.0
    orjson.dumps(s)  # JSON-able


def test_metrics_sampler_404_is_recorded():
    s = metrics_sampler(lambda request: httpx.Response(404, text="Not Found")).sample()
    assert set(s) == {"t_unix_s", "ok", "error"}
    assert s["ok"] is False
    assert s["error"] == "no /metrics endpoint (HTTP 404)"


def test_metrics_sampler_other_status():
    s = metrics_sampler(lambda request: httpx.Response(503)).sample()
    assert (s["ok"], s["error"]) == (False, "HTTP 503")


def test_metrics_sampler_connection_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection\nrefused", request=request)

    s = metrics_sampler(handler).sample()
    assert s["ok"] is False
    assert s["error"] == "ConnectError: [Errno 111] Connection refused"  # one line


def test_metrics_sampler_unparseable_body():
    s = metrics_sampler(lambda request: httpx.Response(200, text="vllm:x{a=} oops\n")).sample()
    assert s["ok"] is False
    assert s["error"].startswith("unparseable /metrics: ")
    assert "\n" not in s["error"]


# --------------------------------------------------------------------------- GpuSampler


class FakeNVMLError(Exception):
    pass


def fake_nvml(*, count: int = 2, init_error: Exception | None = None) -> SimpleNamespace:
    calls: list[str] = []

    def init():
        calls.append("init")
        if init_error is not None:
            raise init_error

    def power(handle):
        if handle == "h1":
            raise FakeNVMLError("Not Supported")
        return 250500  # milliwatts

    names = {"h0": "NVIDIA H100 80GB HBM3", "h1": b"NVIDIA L4"}
    return SimpleNamespace(
        calls=calls,
        NVMLError=FakeNVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetName=lambda h: names[h],
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=37 if h == "h0" else 100, memory=5),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=80 * 2**30, free=79 * 2**30),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetTemperature=lambda h, sensor: 61 if h == "h0" else 48,
    )


def test_gpu_sampler_two_gpus_one_unsupported_field():
    nvml = fake_nvml()
    sampler = GpuSampler(nvml=nvml)
    s = sampler.sample()
    assert set(s) == {"t_unix_s", "gpus"}
    assert s["gpus"] == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "util_ratio": 0.37,
         "memory_used_bytes": 2**30, "memory_total_bytes": 80 * 2**30,
         "power_w": 250.5, "temperature_c": 61},
        {"index": 1, "name": "NVIDIA L4", "util_ratio": 1.0,
         "memory_used_bytes": 2**30, "memory_total_bytes": 80 * 2**30,
         "power_w": None, "temperature_c": 48},
    ]
    assert len(sampler.sample()["gpus"]) == 2
    sampler.close()
    assert nvml.calls == ["init", "shutdown"]  # initialised once, shut down once


def test_gpu_sampler_nvml_init_failure_is_absent():
    sampler = GpuSampler(nvml=fake_nvml(init_error=FakeNVMLError("Driver Not Loaded")))
    s = sampler.sample()
    assert s["absent"] is True
    assert s["reason"] == "NVML unavailable: FakeNVMLError: Driver Not Loaded"


def test_gpu_sampler_zero_gpus_is_absent():
    nvml = fake_nvml(count=0)
    s = GpuSampler(nvml=nvml).sample()
    assert (s["absent"], s["reason"]) == (True, "no NVIDIA GPU found")
    assert nvml.calls == ["init", "shutdown"]


def test_gpu_sampler_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    s = GpuSampler().sample()
    assert s["absent"] is True
    assert "nvidia-ml-py" in s["reason"]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA driver")
def test_gpu_sampler_on_this_machine_is_absent():
    s = GpuSampler().sample()
    assert s["absent"] is True
    assert isinstance(s["reason"], str) and s["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU")
def test_gpu_sampler_real_gpu():
    sampler = GpuSampler()
    s = sampler.sample()
    sampler.close()
    assert s["gpus"], s
    gpu = s["gpus"][0]
    assert gpu["memory_total_bytes"] > 0 and 0 <= gpu["util_ratio"] <= 1


# --------------------------------------------------------------------------- HostSampler


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_host_sampler_measures_own_cpu():
    sampler = HostSampler([os.getpid()])
    wall_a0, cpu_a0 = time.monotonic(), time.process_time()
    first = sampler.sample()
    wall_a1, cpu_a1 = time.monotonic(), time.process_time()
    assert first["cpu_core_ratio"] is None
    assert first["host_cpu_ratio"] is None
    assert first["processes"][0]["pid"] == os.getpid()
    assert first["processes"][0]["cpu_core_ratio"] is None
    assert first["rss_bytes"] == first["processes"][0]["rss_bytes"] > 0
    burn_cpu(0.3)
    wall_b0, cpu_b0 = time.monotonic(), time.process_time()
    second = sampler.sample()
    wall_b1, cpu_b1 = time.monotonic(), time.process_time()
    # The ratio is this process's CPU seconds over the wall seconds between the two samples. Bracketed by
    # what this test measures around each sample (the samples fall inside those brackets), widened by
    # psutil's CPU-time resolution (clock ticks, 10 ms): a busy other core cannot break it, and a
    # factor-2 error (or counting the host instead of the process) falls outside.
    tick_s = 0.01
    low = (cpu_b0 - cpu_a1 - tick_s) / (wall_b1 - wall_a0)
    high = (cpu_b1 - cpu_a0 + tick_s) / (wall_b0 - wall_a1)
    assert cpu_b0 - cpu_a1 > 0.25  # the loop really ran
    assert low <= second["cpu_core_ratio"] <= high, (low, second["cpu_core_ratio"], high)
    assert high < 2 * low  # the bracket is tight enough to catch a factor of 2
    assert second["processes"][0]["cpu_core_ratio"] == second["cpu_core_ratio"]
    assert 0.0 <= second["host_cpu_ratio"] <= 1.0
    orjson.dumps(second)


def test_host_sampler_skips_vanished_and_waits_for_new_processes():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    pids = [os.getpid(), dead.pid]
    sampler = HostSampler(lambda: pids)
    first = sampler.sample()
    assert [p["pid"] for p in first["processes"]] == [os.getpid()]

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids.append(child.pid)
        second = sampler.sample()
        by_pid = {p["pid"]: p for p in second["processes"]}
        assert by_pid[os.getpid()]["cpu_core_ratio"] is not None
        assert by_pid[child.pid]["cpu_core_ratio"] is None  # first sample of the child
        assert second["cpu_core_ratio"] is None  # a total that misses a process would be wrong
        third = sampler.sample()
        assert third["cpu_core_ratio"] is not None
    finally:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------- recorder


class CountingSampler:
    def __init__(self) -> None:
        self.n = 0
        self.closed = False

    def sample(self) -> dict:
        self.n += 1
        return {"t_unix_s": time.time(), "n": self.n}

    def close(self) -> None:
        self.closed = True


class AbsentSampler:
    def __init__(self) -> None:
        self.n = 0

    def sample(self) -> dict:
        self.n += 1
        return {"t_unix_s": time.time(), "absent": True, "reason": "no GPU"}


class BrokenSampler:
    def sample(self) -> dict:
        raise RuntimeError("boom\nsecond line")


class UnserializableSampler:
    def sample(self) -> dict:
        return {"t_unix_s": time.time(), "value": object()}


def lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


def test_recorder_writes_lines_and_stops(tmp_path):
    counting, absent = CountingSampler(), AbsentSampler()
    recorder = TelemetryRecorder(
        tmp_path / "telemetry",
        {"metrics": counting, "gpu": absent, "host": BrokenSampler(), "odd": UnserializableSampler()},
        interval_s=0.05,
    )
    assert not any(t.name == "envelope-telemetry" for t in threading.enumerate())  # not at construction
    recorder.start()
    time.sleep(0.5)
    assert recorder.stop(timeout_s=5.0) is True
    assert counting.closed

    metrics = lines(tmp_path / "telemetry" / "metrics.jsonl")
    # ~10 ticks in 0.5 s plus the final round; generous bounds for a busy machine
    assert 3 <= len(metrics) <= 30
    assert [m["n"] for m in metrics] == list(range(1, len(metrics) + 1))
    times = [m["t_unix_s"] for m in metrics]
    assert times == sorted(times)

    gpu = lines(tmp_path / "telemetry" / "gpu.jsonl")
    assert len(gpu) == 1 and absent.n == 1
    assert gpu[0]["reason"] == "no GPU"

    host = lines(tmp_path / "telemetry" / "host.jsonl")
    assert len(host) >= 3  # the thread survived every failure
    assert all(h["ok"] is False and h["error"] == "RuntimeError: boom second line" for h in host)

    odd = lines(tmp_path / "telemetry" / "odd.jsonl")
    assert odd and odd[0]["ok"] is False and odd[0]["error"].startswith("unwritable sample: ")


def test_recorder_context_manager_and_single_start(tmp_path):
    counting = CountingSampler()
    with TelemetryRecorder(tmp_path, {"metrics": counting}, interval_s=0.05) as recorder:
        with pytest.raises(RuntimeError):
            recorder.start()
        time.sleep(0.12)
    assert counting.closed
    assert len(lines(tmp_path / "metrics.jsonl")) >= 2


def test_recorder_rejects_bad_interval(tmp_path):
    with pytest.raises(ValueError):
        TelemetryRecorder(tmp_path, {}, interval_s=0)


@pytest.mark.parametrize(
    ("tick", "now", "expected"),
    [
        (10.0, 10.01, 11.0),  # a quick round: the next tick
        (10.0, 10.99, 11.0),
        (10.0, 11.0, 12.0),  # exactly on the next tick: the one after
        (10.0, 12.5, 13.0),  # a slow round skips ticks 11 and 12, keeps the grid
        (10.0, 9.0, 11.0),  # never schedules in the past of the grid
    ],
)
def test_next_tick_keeps_the_grid(tick, now, expected):
    assert _next_tick_s(tick, now, 1.0) == pytest.approx(expected)


# --------------------------------------------------------------------------- reader


def test_read_telemetry_missing_dir(tmp_path):
    assert read_telemetry(tmp_path / "nope") == {"metrics": [], "gpu": [], "host": []}


def test_read_telemetry_tolerates_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"t_unix_s": 1.0, "ok": true}\n{"t_unix_s": 2.0, "ok"')
    (tmp_path / "gpu.jsonl").write_bytes(b'{"t_unix_s": 1.0, "absent": true, "reason": "x"}\n')
    skipped: list[str] = []
    data = read_telemetry(tmp_path, skipped=skipped)
    assert data == {
        "metrics": [{"t_unix_s": 1.0, "ok": True}],
        "gpu": [{"t_unix_s": 1.0, "absent": True, "reason": "x"}],
        "host": [],
    }
    assert len(skipped) == 1 and "metrics.jsonl:2" in skipped[0]


def test_read_telemetry_round_trip(tmp_path):
    counting = CountingSampler()
    with TelemetryRecorder(tmp_path, {"metrics": counting}, interval_s=0.05):
        time.sleep(0.12)
    data = read_telemetry(tmp_path)
    assert [m["n"] for m in data["metrics"]] == list(range(1, counting.n + 1))


def test_prefix_cache_counters_are_read_under_new_and_old_names():
    new = "vllm:prefix_cache_queries_total 1000\nvllm:prefix_cache_hits_total 640\n"
    old = "vllm:gpu_prefix_cache_queries_total 300\nvllm:gpu_prefix_cache_hits_total 30\n"
    m, o = parse_vllm_metrics(new), parse_vllm_metrics(old)
    assert (m["prefix_cache_queries_total"], m["prefix_cache_hits_total"]) == (1000.0, 640.0)
    assert (o["prefix_cache_queries_total"], o["prefix_cache_hits_total"]) == (300.0, 30.0)

