"""vLLM-named Prometheus metrics for the simulated server.

The hot path only bumps plain counters and bucket lists (:class:`Histogram`);
a collector turns them into metric families when ``/metrics`` is scraped,
rendered by ``prometheus_client`` from a registry private to each server.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable

__all__ = ["Histogram", "SimMetrics", "TTFT_BUCKETS_S", "ITL_BUCKETS_S", "REQUEST_BUCKETS_S"]

# vLLM's own bucket bounds (0.32)
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                     60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Bucket counts (``le`` semantics), sum and count; cheap to observe."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", self.count))
        return out


class SimMetrics:
    """Counters and histograms of one server; ``gauges`` reads the live ones at scrape time."""

    def __init__(self, *, model: str, gauges: Callable[[], tuple[int, int, float]]) -> None:
        self.model = model
        self._gauges = gauges  # -> (running, waiting, kv_cache_usage_ratio)
        self.preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.e2e = Histogram(REQUEST_BUCKETS_S)
        self.queue = Histogram(REQUEST_BUCKETS_S)
        self._registry = None

    def render(self) -> bytes:
        """The Prometheus text exposition of these metrics."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
        return generate_latest(self._registry)


class _Collector:
    def __init__(self, metrics: SimMetrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self.m
        labels = ["engine", "model_name"]
        values = ["0", m.model]
        running, waiting, kv_ratio = m._gauges()
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_ratio),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            yield g
        for name, doc, value in (
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", m.preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            yield c
        c = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=["engine", "finished_reason", "model_name"])
        for reason, n in m.success.items():
            c.add_metric(["0", reason, m.model], n)
        yield c
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             m.queue),
        ):
            h = HistogramMetricFamily(name, doc, labels=labels)
            h.add_metric(values, hist.cumulative(), sum_value=hist.sum)
            yield h
