"""Server, GPU and host telemetry: samplers, a background recorder, and a reader.

Each sampler has ``sample() -> dict``: one JSON-able dict with ``t_unix_s``.
:class:`TelemetryRecorder` calls them on a steady cadence from one background
thread and appends one JSON line per sample to ``<telemetry_dir>/<name>.jsonl``
(the formats are in ``docs/run-directory.md``). Nothing here starts or reads
anything at import; ``pynvml`` is imported only when a :class:`GpuSampler`
first samples.

The pure helpers :func:`parse_vllm_metrics`, :func:`histogram_delta` and
:func:`histogram_quantile` turn vLLM's Prometheus text into the numbers that
analysis compares against the client-side records.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol

import httpx
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from envelope.records import RecordWriter, read_records

__all__ = [
    "HISTOGRAM_METRICS",
    "Sampler",
    "parse_vllm_metrics",
    "histogram_delta",
    "histogram_quantile",
    "MetricsSampler",
    "GpuSampler",
    "HostSampler",
    "TelemetryRecorder",
    "read_telemetry",
]

# Our field name -> vLLM metric names, newest first. The first name present in a
# scrape wins; names are never added together (a server in transition exposes
# both the deprecated and the new name for the same quantity).
_GAUGES: dict[str, tuple[str, ...]] = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
}
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_COUNTERS: dict[str, tuple[str, ...]] = {
    "preemptions_total": ("vllm:num_preemptions",),
    "prompt_tokens_total": ("vllm:prompt_tokens",),
    "generation_tokens_total": ("vllm:generation_tokens",),
    # prompt tokens the prefix cache was asked about, and those it held (vLLM 0.32; older: gpu_ prefix)
    "prefix_cache_queries_total": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_cache_hits_total": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}
HISTOGRAM_METRICS: dict[str, tuple[str, ...]] = {
    "ttft_s": ("vllm:time_to_first_token_seconds",),
    "itl_s": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "e2e_s": ("vllm:e2e_request_latency_seconds",),
    "queue_s": ("vllm:request_queue_time_seconds",),
    "prefill_s": ("vllm:request_prefill_time_seconds",),
    "decode_s": ("vllm:request_decode_time_seconds",),
}
"""The vLLM histograms we keep, by our field name (newest metric name first).

``prefill_s`` and ``decode_s`` are newer (V1 engine); a server without them gives ``None``."""


class Sampler(Protocol):
    """Anything with ``sample() -> dict``; ``close()`` is optional."""

    def sample(self) -> dict: ...


# --------------------------------------------------------------------------- parsing


def parse_vllm_metrics(text: str) -> dict:
    """The telemetry fields of one vLLM ``/metrics`` text.

    Values are summed over label sets (engines, model names), except the KV-cache
    usage, which is a ratio: ``kv_cache_usage_ratio`` is the mean over label sets
    and ``kv_cache_usage_max_ratio`` the largest. A metric the text lacks is
    ``None``. Histograms are ``{"sum", "count", "buckets": [[le, cumulative], ...]}``
    with finite ``le`` only (the ``+Inf`` bucket equals ``count``).
    Raises ``ValueError`` for text that is not Prometheus exposition format.
    """
    # Index by *sample* name: the parser strips "_total" from counter family
    # names (and untyped families keep it), but sample names are what was sent.
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))

    def first_present(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in samples), None)

    out: dict[str, Any] = {}
    for field, names in _GAUGES.items():
        name = first_present(names)
        out[field] = None if name is None else sum((v for _, v in samples[name]), 0.0)

    name = first_present(_KV_CACHE)
    values = [] if name is None else [v for _, v in samples[name]]
    out["kv_cache_usage_ratio"] = sum(values) / len(values) if values else None
    out["kv_cache_usage_max_ratio"] = max(values) if values else None

    for field, names in _COUNTERS.items():
        # A counter's sample is "<name>_total"; very old clients sent "<name>".
        name = first_present(tuple(n + suffix for n in names for suffix in ("_total", "")))
        out[field] = None if name is None else sum((v for _, v in samples[name]), 0.0)

    histograms: dict[str, dict | None] = {}
    for field, names in HISTOGRAM_METRICS.items():
        name = next((n for n in names if n + "_count" in samples), None)
        histograms[field] = None if name is None else _histogram(samples, name)
    out["histograms"] = histograms
    return out


def _histogram(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict:
    by_le: dict[float, float] = {}
    for labels, value in samples.get(name + "_bucket", ()):
        le = float(labels["le"])
        if math.isfinite(le):
            by_le[le] = by_le.get(le, 0.0) + value
    return {
        "sum": sum((v for _, v in samples.get(name + "_sum", ())), 0.0),
        "count": sum((v for _, v in samples[name + "_count"]), 0.0),
        "buckets": [[le, by_le[le]] for le in sorted(by_le)],
    }


def histogram_delta(a: dict | None, b: dict | None) -> dict | None:
    """``b - a`` for two cumulative histograms of one metric (bucket by bucket).

    ``None`` when either is ``None``. Raises ``ValueError`` when the bucket
    bounds differ or a count went down (the server restarted between them).
    """
    if a is None or b is None:
        return None
    les_a = [le for le, _ in a["buckets"]]
    les_b = [le for le, _ in b["buckets"]]
    if les_a != les_b:
        raise ValueError("histograms have different bucket bounds")
    buckets = [[le, cb - ca] for (le, ca), (_, cb) in zip(a["buckets"], b["buckets"])]
    count = b["count"] - a["count"]
    if count < 0 or any(c < 0 for _, c in buckets):
        raise ValueError("histogram counts went down (server restarted?)")
    return {"sum": b["sum"] - a["sum"], "count": count, "buckets": buckets}


def histogram_quantile(hist: dict | None, q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, as Prometheus computes it.

    Linear interpolation inside the bucket holding rank ``q * count``; the first
    bucket starts at 0. A rank above the last finite bucket returns that bucket's
    upper bound. ``None`` for an empty histogram or one without finite buckets.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    if hist is None or not hist["buckets"] or hist["count"] <= 0:
        return None
    buckets = hist["buckets"]
    rank = q * hist["count"]
    for i, (le, cumulative) in enumerate(buckets):
        if cumulative >= rank:
            break
    else:
        return float(buckets[-1][0])
    if i == 0 and le <= 0:
        return float(le)
    start, below = (0.0, 0.0) if i == 0 else (buckets[i - 1][0], buckets[i - 1][1])
    in_bucket = cumulative - below
    if in_bucket <= 0:  # only when rank is 0 and the bucket is empty
        return float(start)
    return start + (le - start) * (rank - below) / in_bucket


# --------------------------------------------------------------------------- samplers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class MetricsSampler:
    """Scrapes a vLLM ``/metrics`` URL; failures are recorded, never raised."""

    def __init__(
        self, metrics_url: str, *, timeout_s: float = 2.0, client: httpx.Client | None = None
    ) -> None:
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout_s)

    def sample(self) -> dict:
        try:
            response = self._client.get(self.metrics_url, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            return {"t_unix_s": time.time(), "ok": False, "error": _one_line(exc)}
        t_unix_s = time.time()
        if response.status_code == 404:
            return {"t_unix_s": t_unix_s, "ok": False, "error": "no /metrics endpoint (HTTP 404)"}
        if response.status_code != 200:
            return {"t_unix_s": t_unix_s, "ok": False, "error": f"HTTP {response.status_code}"}
        try:
            fields = parse_vllm_metrics(response.text)
        except ValueError as exc:
            return {"t_unix_s": t_unix_s, "ok": False, "error": f"unparseable /metrics: {_one_line(exc)}"}
        return {"t_unix_s": t_unix_s, "ok": True, **fields}

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"MetricsSampler(metrics_url={self.metrics_url!r}, timeout_s={self.timeout_s})"


class GpuSampler:
    """NVIDIA GPU samples through NVML; ``{"absent": true, ...}`` when there is none.

    ``nvml`` replaces the ``pynvml`` module (for tests). ``sample()`` never
    raises for a missing driver or GPU; a field a GPU does not support is ``None``.
    """

    def __init__(self, *, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._handles: list[Any] | None = None
        self._absent_reason: str | None = None

    def _init(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self._absent_reason = "pynvml not installed (pip install nvidia-ml-py)"
                return
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from a missing library
            self._absent_reason = f"NVML unavailable: {_one_line(exc)}"
            return
        try:
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:
            self._absent_reason = f"NVML could not list GPUs: {_one_line(exc)}"
            self._shutdown()
            return
        if not self._handles:
            self._absent_reason = "no NVIDIA GPU found"
            self._shutdown()

    def sample(self) -> dict:
        if self._handles is None and self._absent_reason is None:
            self._init()
        if self._absent_reason is not None:
            return {"t_unix_s": time.time(), "absent": True, "reason": self._absent_reason}
        nvml = self._nvml
        gpus = []
        for index, handle in enumerate(self._handles or ()):
            util = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            name = self._field(lambda: nvml.nvmlDeviceGetName(handle))
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "util_ratio": None if util is None else util.gpu / 100,
                    "memory_used_bytes": None if memory is None else int(memory.used),
                    "memory_total_bytes": None if memory is None else int(memory.total),
                    "power_w": None if power_mw is None else power_mw / 1000,
                    "temperature_c": self._field(
                        lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                    ),
                }
            )
        return {"t_unix_s": time.time(), "gpus": gpus}

    def _field(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except self._nvml.NVMLError:  # not supported on this GPU, or lost
            return None

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def close(self) -> None:
        if self._handles:
            self._handles = None
            self._absent_reason = "closed"
            self._shutdown()

    def __repr__(self) -> str:
        return f"GpuSampler(absent_reason={self._absent_reason!r})"


class HostSampler:
    """CPU and memory of the load generator's processes, and of the whole machine.

    ``pids`` is a list or a callable returning the current list (workers come and
    go). ``cpu_core_ratio`` is CPU seconds per wall second since the previous
    sample (1.0 = one core busy), so it is ``None`` for a process's first sample;
    the total is ``None`` unless every listed process has a value. Processes that
    vanished are skipped.
    """

    def __init__(self, pids: Callable[[], list[int]] | list[int]) -> None:
        self._pids = pids
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (monotonic_s, cpu_s)
        self._host_primed = False

    def sample(self) -> dict:
        pids = self._pids() if callable(self._pids) else self._pids
        processes = []
        seen: set[int] = set()
        for pid in pids:
            try:
                proc = self._procs.get(pid)
                if proc is None or not proc.is_running():  # also catches a reused pid
                    proc = self._procs[pid] = psutil.Process(pid)
                    self._last.pop(pid, None)
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss_bytes = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            now_s = time.monotonic()
            cpu_s = times.user + times.system
            previous = self._last.get(pid)
            ratio = None
            if previous is not None and now_s > previous[0]:
                ratio = max(0.0, cpu_s - previous[1]) / (now_s - previous[0])
            self._last[pid] = (now_s, cpu_s)
            seen.add(pid)
            processes.append({"pid": pid, "cpu_core_ratio": ratio, "rss_bytes": rss_bytes})
        for gone in set(self._procs) - seen:
            self._procs.pop(gone, None)
            self._last.pop(gone, None)

        host_percent = psutil.cpu_percent(interval=None)
        host_cpu_ratio = host_percent / 100 if self._host_primed else None  # first call means nothing
        self._host_primed = True
        ratios = [p["cpu_core_ratio"] for p in processes]
        return {
            "t_unix_s": time.time(),
            "host_cpu_ratio": host_cpu_ratio,
            "cpu_core_ratio": sum(ratios) if ratios and None not in ratios else None,
            "rss_bytes": sum(p["rss_bytes"] for p in processes),
            "processes": processes,
        }

    def __repr__(self) -> str:
        return f"HostSampler(pids={self._pids!r})"


# --------------------------------------------------------------------------- recorder


class _JsonLine:
    """One encoded line, in the shape :class:`RecordWriter` writes (``to_json_line()``)."""

    __slots__ = ("line",)

    def __init__(self, data: Any) -> None:
        try:
            self.line = orjson.dumps(data) + b"\n"
        except (TypeError, orjson.JSONEncodeError) as exc:
            error = {"t_unix_s": time.time(), "ok": False, "error": f"unwritable sample: {_one_line(exc)}"}
            self.line = orjson.dumps(error) + b"\n"

    def to_json_line(self) -> bytes:
        return self.line


def _next_tick_s(tick_s: float, now_s: float, interval_s: float) -> float:
    """The first tick ``tick_s + k * interval_s`` (k >= 1) that is after ``now_s``."""
    k = max(1, math.floor((now_s - tick_s) / interval_s) + 1)
    return tick_s + k * interval_s


class TelemetryRecorder:
    """Samples on a steady cadence in a background thread, one JSON line per sample.

    ``samplers`` maps a stream name to a sampler; samples go to
    ``<telemetry_dir>/<name>.jsonl``. The thread starts with :meth:`start`, takes
    one last round of samples when :meth:`stop` is called, then closes the files
    and the samplers (the recorder owns them). A sampler whose sample says
    ``absent`` is written once and not sampled again; a sampler that raises gets
    ``{"ok": false, "error": ...}`` lines and the thread carries on.
    """

    def __init__(
        self,
        telemetry_dir: str | os.PathLike[str],
        samplers: Mapping[str, Sampler],
        *,
        interval_s: float = 1.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.telemetry_dir = Path(telemetry_dir)
        self.samplers = dict(samplers)
        self.interval_s = interval_s
        self.write_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TelemetryRecorder":
        if self._thread is not None:
            raise RuntimeError("telemetry recorder already started")
        # Open files here so a bad directory fails in the caller, not the thread.
        writers = {name: RecordWriter(self.telemetry_dir / f"{name}.jsonl") for name in self.samplers}
        self._thread = threading.Thread(
            target=self._run, args=(writers,), name="envelope-telemetry", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop sampling; True when the thread finished within ``timeout_s``."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def __enter__(self) -> "TelemetryRecorder":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, writers: dict[str, RecordWriter]) -> None:
        active = dict(self.samplers)
        try:
            next_s = time.monotonic()
            while True:
                stopping = self._stop.is_set()
                self._sample_round(active, writers)
                if stopping or not active:
                    return
                # Schedule on the grid start + k * interval: a slow round skips
                # ticks instead of shifting every later sample.
                now_s = time.monotonic()
                next_s = _next_tick_s(next_s, now_s, self.interval_s)
                self._stop.wait(next_s - now_s)
        finally:
            for writer in writers.values():
                writer.close()
            for sampler in self.samplers.values():
                close = getattr(sampler, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:
                        pass

    def _sample_round(self, active: dict[str, Sampler], writers: dict[str, RecordWriter]) -> None:
        for name, sampler in list(active.items()):
            try:
                data = sampler.sample()
            except Exception as exc:
                data = {"t_unix_s": time.time(), "ok": False, "error": _one_line(exc)}
            if isinstance(data, dict) and data.get("absent"):
                del active[name]
            try:
                writers[name].write(_JsonLine(data))  # type: ignore[arg-type]
            except OSError:  # a full disk must not end the run
                self.write_errors += 1

    def __repr__(self) -> str:
        return (
            f"TelemetryRecorder(telemetry_dir={str(self.telemetry_dir)!r}, "
            f"samplers={sorted(self.samplers)}, interval_s={self.interval_s})"
        )


def read_telemetry(
    telemetry_dir: str | os.PathLike[str], *, skipped: list[str] | None = None
) -> dict[str, list[dict]]:
    """Samples per stream from a telemetry directory: ``{"metrics": [...], ...}``.

    Always has ``metrics``, ``gpu`` and ``host`` (empty when the file is missing),
    plus any other ``*.jsonl`` stream. Unreadable lines (a torn last line) are
    skipped and described in ``skipped`` when a list is given.
    """
    directory = Path(telemetry_dir)
    out: dict[str, list[dict]] = {"metrics": [], "gpu": [], "host": []}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.jsonl")):
        out[path.stem] = [s for s in read_records(path, skipped=skipped) if isinstance(s, dict)]
    return out
