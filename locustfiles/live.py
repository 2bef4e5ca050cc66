"""The live numbers of the web UI's LLM tab: a sliding window over request records.

Pure of Flask, Locust and gevent, so it is tested on tables of records.
:mod:`locustfiles.webui` feeds it the records that
:class:`envelope.progress.RecordTailer` reads from ``records/*.jsonl`` and
serves what it answers.

Definitions (the page states them too):

- The window holds the requests that *completed* (``t_done_s``, else the last
  timestamp the record has) in ``(end - window_s, end]``. While a test runs,
  ``end`` is now; once it stopped, ``end`` is the last completion seen, so the
  window stops moving and shows the last ``window_s`` of the run. It never
  starts before the first request did, so a test's first seconds are not
  divided by time when nothing was sent (the window is shorter then, and says so).
- Output tokens/s = output tokens of the successful requests in the window
  divided by ``window_s``. Selecting by completion time counts a request
  straddling the window's start in full; in a steady state that equals the rate
  at which tokens are produced (the report's steady-state table counts tokens by
  chunk arrival instead, which also needs the requests still in flight).
- Per-user output tokens/s = the median over those requests of output tokens
  divided by E2E: the rate one user sees, first-token wait included.
- TTFT, TPOT and E2E are :mod:`envelope.metrics` over the successful requests;
  percentiles are :func:`envelope.metrics.percentiles` (exact, numpy's linear
  interpolation), not Locust's rounded ones.
- Requests the load generator itself stopped (``cancelled``) are neither
  successes nor errors; the error rate is errors / (requests - cancelled).
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from envelope import metrics
from envelope.attainment import Attainment, Thresholds, attainment_target, good_mask, thresholds_from_slos
from envelope.records import ErrorCategory
from envelope.search_log import SearchEntry, read_search_log

__all__ = [
    "WINDOW_S",
    "LATENCY_METRICS",
    "RequestSummary",
    "WindowStats",
    "LiveAggregator",
    "HistoryPoint",
    "History",
    "completion_unix_s",
    "summarize",
    "window_stats",
    "check_slos",
    "overall_slo",
    "counter_increase",
    "json_safe",
    "tab_rows",
    "search_section",
    "search_pass_view",
    "format_rate",
    "format_ms",
]

WINDOW_S = 10.0
LATENCY_METRICS = ("ttft", "tpot", "e2e")
_SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
_NAN = math.nan


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSummary:
    """What the window needs from one record; latencies in ms, NaN when undefined."""

    end_unix_s: float
    category: str | None  # None: succeeded
    output_tokens: int
    ttft_ms: float = _NAN
    tpot_ms: float = _NAN
    e2e_ms: float = _NAN
    request_output_tokens_per_s: float = _NAN
    itl_ms: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.category is None


def completion_unix_s(rec: Mapping[str, Any]) -> float | None:
    """Wall-clock time at which a record's request completed; None without the timestamps to place it.

    ``t_done_s`` (stream finished or failed), else the last timestamp the record has.
    """
    t_start, wall = rec.get("t_start_s"), rec.get("wall_start_unix_s")
    if t_start is None or wall is None:
        return None
    t_done = next((rec[k] for k in ("t_done_s", "t_last_token_s", "t_first_token_s")
                   if rec.get(k) is not None), t_start)
    return float(wall) + float(t_done) - float(t_start)


def _ms(seconds: float | None) -> float:
    return _NAN if seconds is None else seconds * 1000.0


def summarize(rec: Mapping[str, Any], *, keep_itl: bool = False) -> RequestSummary | None:
    """The summary of one record dict (the JSON form of a RequestRecord); None when it cannot be placed in time."""
    end = completion_unix_s(rec)
    if end is None:
        return None
    category = rec.get("error_category")
    rate = metrics.request_output_tokens_per_s(rec)
    return RequestSummary(
        end_unix_s=end,
        category=None if category is None else str(category),
        output_tokens=int(rec.get("output_tokens") or 0),
        ttft_ms=_ms(metrics.ttft_s(rec)),
        tpot_ms=_ms(metrics.tpot_s(rec)),
        e2e_ms=_ms(metrics.e2e_s(rec)),
        request_output_tokens_per_s=_NAN if rate is None else float(rate),
        itl_ms=tuple(v * 1000.0 for v in metrics.itl_s(rec)) if keep_itl else (),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowStats:
    """The requests that completed in ``(start_unix_s, end_unix_s]``."""

    start_unix_s: float
    end_unix_s: float
    window_s: float
    requests: int  # completed in the window, cancelled included
    ok: int
    errors: int  # failed, cancelled not included
    cancelled: int
    error_rate: float  # errors / (requests - cancelled); NaN with none
    output_tokens: int  # of the successful requests
    output_tokens_per_s: float
    per_user_output_tokens_per_s: float  # median of output tokens / E2E; NaN with no success
    errors_by_category: dict[str, int]
    latency_ms: dict[str, dict[str, float]]  # {"ttft": {"p50", "p95", "mean", "n"}, "tpot": …, "e2e": …}
    values_ms: dict[str, np.ndarray] = field(repr=False)  # per metric, the successful requests' values (for SLOs)

    def percentile_ms(self, metric: str, q: float) -> float:
        """The exact ``q`` percentile of ``metric`` (ttft, tpot, itl, e2e) over the window; NaN with no value."""
        return metrics.percentiles(self.values_ms[metric], qs=(q,))[f"p{q:g}"]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "values_ms"}
        out["errors_by_category"] = dict(sorted(self.errors_by_category.items(), key=lambda kv: (-kv[1], kv[0])))
        return out


def window_stats(summaries: Iterable[RequestSummary], *, end_unix_s: float, window_s: float = WINDOW_S,
                 not_before_unix_s: float | None = None) -> WindowStats:
    """Counts, output rate and exact latency percentiles of the summaries completed in ``(start, end]``.

    ``start`` is ``end - window_s``, or ``not_before_unix_s`` (the first request's
    start) when that is later; the result's ``window_s`` is ``end - start``, and
    the rate is NaN when that is not positive.
    """
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    start, span_s = end_unix_s - window_s, window_s  # the span as given: end - start may differ in the last bit
    if not_before_unix_s is not None and not_before_unix_s > start:
        start, span_s = not_before_unix_s, end_unix_s - not_before_unix_s
    mine = [s for s in summaries if start < s.end_unix_s <= end_unix_s]
    good = [s for s in mine if s.ok]
    cancelled = sum(1 for s in mine if s.category == ErrorCategory.CANCELLED)
    failed = [s.category for s in mine if not s.ok and s.category != ErrorCategory.CANCELLED]
    judged = len(mine) - cancelled
    values = {
        "ttft": np.array([s.ttft_ms for s in good], dtype=float),
        "tpot": np.array([s.tpot_ms for s in good], dtype=float),
        "e2e": np.array([s.e2e_ms for s in good], dtype=float),
        "itl": np.fromiter((v for s in good for v in s.itl_ms), dtype=float),
    }
    latency: dict[str, dict[str, float]] = {}
    for name in LATENCY_METRICS:
        arr = values[name]
        pct = metrics.percentiles(arr, qs=(50, 95))
        pct["n"] = int(np.count_nonzero(~np.isnan(arr)))
        latency[name] = pct
    rates = np.array([s.request_output_tokens_per_s for s in good], dtype=float)
    rates = rates[~np.isnan(rates)]
    tokens = sum(s.output_tokens for s in good)
    return WindowStats(
        start_unix_s=start,
        end_unix_s=end_unix_s,
        window_s=span_s,
        requests=len(mine),
        ok=len(good),
        errors=len(failed),
        cancelled=cancelled,
        error_rate=len(failed) / judged if judged else _NAN,
        output_tokens=tokens,
        output_tokens_per_s=tokens / span_s if span_s > 0 else _NAN,
        per_user_output_tokens_per_s=float(np.median(rates)) if rates.size else _NAN,
        errors_by_category=dict(Counter(failed)),
        latency_ms=latency,
        values_ms=values,
    )


def check_slos(stats: WindowStats, slos: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each SLO of a stage checked against the window: ``{key, threshold, op, measured, passed, note}``.

    Keys as in ``stages.json``: ``<ttft|tpot|itl|e2e>_<pNN>_ms``, ``error_rate_max``,
    ``min_output_tokens_per_s``. ``passed`` is None when the window holds no
    completed request (nothing to judge yet) or the key is unknown; False when
    requests completed but none gave the metric (every one failed).
    """
    results = []
    thresholds = thresholds_from_slos({k: v for k, v in slos.items() if v is not None})
    for key, threshold in slos.items():
        if threshold is None or key in ("ttft_ms", "tpot_ms", "e2e_ms"):  # per-request: judged via attainment
            continue
        threshold = float(threshold)
        op, measured = "<=", _NAN
        if key == "attainment_min":
            continue  # checked below, with the default target when the key is absent
        if key == "error_rate_max":
            measured = stats.error_rate
        elif key == "min_output_tokens_per_s":
            op, measured = ">=", stats.output_tokens_per_s
        else:
            parts = key.split("_")
            if len(parts) == 3 and parts[0] in _SLO_METRICS and parts[1].startswith("p") and parts[2] == "ms":
                try:
                    q = float(parts[1][1:])
                except ValueError:
                    q = _NAN
                if 0 <= q <= 100:
                    measured = stats.percentile_ms(parts[0], q)
                else:
                    op = "?"
            else:
                op = "?"
        if op == "?":
            results.append({"key": key, "threshold": threshold, "op": op, "measured": None, "passed": None,
                            "note": "unknown SLO key; not checked"})
            continue
        if stats.requests - stats.cancelled == 0:
            results.append({"key": key, "threshold": threshold, "op": op, "measured": None, "passed": None,
                            "note": "no request completed in the window"})
            continue
        if math.isnan(measured):
            results.append({"key": key, "threshold": threshold, "op": op, "measured": None, "passed": False,
                            "note": "no successful request in the window"})
            continue
        passed = measured <= threshold if op == "<=" else measured >= threshold
        results.append({"key": key, "threshold": threshold, "op": op, "measured": float(measured),
                        "passed": bool(passed), "note": ""})
    if thresholds.any:
        results.append(_attainment(stats, thresholds, attainment_target(slos)))
    return results


def _attainment(stats: WindowStats, thresholds: Thresholds, target: float) -> dict[str, Any]:
    """The window's share of good requests (:mod:`envelope.attainment`; latencies from the send time)."""
    judged = stats.requests - stats.cancelled
    result = {"key": "attainment_min", "threshold": target, "op": ">="}
    if judged == 0:
        return {**result, "measured": None, "passed": None, "note": "no request completed in the window"}
    v = stats.values_ms
    good = int(good_mask(np.ones(len(v["ttft"]), dtype=bool), v["ttft"], v["tpot"], v["e2e"], thresholds).sum())
    share = Attainment.of(good, judged)
    return {**result, "measured": share.share, "passed": bool(share.share >= target),
            "note": f"{good} of {judged} good ({thresholds.describe()}); 95% CI "
                    f"{100 * share.low:.0f}-{100 * share.high:.0f}%"}


def overall_slo(results: Sequence[Mapping[str, Any]]) -> bool | None:
    """True when every checked SLO passed, False when one failed, None when none could be checked."""
    checked = [r["passed"] for r in results if r["passed"] is not None]
    return all(checked) if checked else None


class LiveAggregator:
    """Totals since the start (or the last reset) and the recent completed requests.

    Records from several files arrive out of order, so a few windows' worth is
    kept (``horizon_windows``), measured back from the latest completion seen.
    """

    def __init__(self, *, window_s: float = WINDOW_S, keep_itl: bool = False, horizon_windows: float = 3.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.keep_itl = keep_itl
        self.horizon_s = window_s * max(horizon_windows, 1.0)
        self.reset()

    def __repr__(self) -> str:
        return f"LiveAggregator(window_s={self.window_s}, requests={self.requests}, errors={self.errors})"

    def reset(self) -> None:
        self.requests = 0
        self.ok = 0
        self.errors = 0
        self.cancelled = 0
        self.unplaced = 0  # records without the timestamps to place them in time
        self.output_tokens = 0
        self.errors_by_category: Counter[str] = Counter()
        self.latest_end_unix_s: float | None = None
        self.first_start_unix_s: float | None = None
        self._recent: list[RequestSummary] = []

    def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Count ``records`` (dicts) and keep what the window needs; returns how many were added."""
        added = 0
        for rec in records:
            added += 1
            self.requests += 1
            category = rec.get("error_category")
            if category is None:
                self.ok += 1
                self.output_tokens += int(rec.get("output_tokens") or 0)
            elif category == ErrorCategory.CANCELLED:
                self.cancelled += 1
            else:
                self.errors += 1
                self.errors_by_category[str(category)] += 1
            summary = summarize(rec, keep_itl=self.keep_itl)
            if summary is None:
                self.unplaced += 1
                continue
            self._recent.append(summary)
            if self.latest_end_unix_s is None or summary.end_unix_s > self.latest_end_unix_s:
                self.latest_end_unix_s = summary.end_unix_s
            wall = float(rec["wall_start_unix_s"])
            if self.first_start_unix_s is None or wall < self.first_start_unix_s:
                self.first_start_unix_s = wall
        if self._recent and self.latest_end_unix_s is not None:
            horizon = self.latest_end_unix_s - self.horizon_s
            if min(s.end_unix_s for s in self._recent) < horizon:
                self._recent = [s for s in self._recent if s.end_unix_s >= horizon]
        return added

    def window(self, end_unix_s: float) -> WindowStats:
        """The last ``window_s`` up to ``end_unix_s``, never starting before the first request seen."""
        return window_stats(self._recent, end_unix_s=end_unix_s, window_s=self.window_s,
                            not_before_unix_s=self.first_start_unix_s)

    def totals(self) -> dict[str, Any]:
        judged = self.requests - self.cancelled
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "error_rate": self.errors / judged if judged else _NAN,
            "output_tokens": self.output_tokens,
            "errors_by_category": dict(sorted(self.errors_by_category.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryPoint:
    """One sample of the charts."""

    t_unix_s: float
    users: int | None
    in_flight: int | None
    output_tokens_per_s: float
    ttft_p95_ms: float
    kv_cache_usage_ratio: float | None
    requests_waiting: float | None
    slo_pass: bool | None
    stage_index: int | None
    stage_name: str | None
    ttft_p95_slo_ms: float | None = None  # the stage's TTFT p95 target, for the chart's threshold line


class History:
    """The charts' samples, numbered; keeps the last ``max_points``."""

    def __init__(self, max_points: int = 7200) -> None:
        self._points: deque[tuple[int, HistoryPoint]] = deque(maxlen=max_points)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._points)

    @property
    def seq(self) -> int:
        """The number of the latest point (0 before the first)."""
        return self._seq

    def append(self, point: HistoryPoint) -> int:
        self._seq += 1
        self._points.append((self._seq, point))
        return self._seq

    def since(self, seq: int) -> list[HistoryPoint]:
        """The points numbered above ``seq`` (all of them for 0 or a number from before a restart)."""
        if seq > self._seq:
            seq = 0
        return [p for n, p in self._points if n > seq]


def counter_increase(samples: Sequence[tuple[float, float]], start_unix_s: float, end_unix_s: float) -> float | None:
    """How much a cumulative counter grew in ``(start, end]``, from ``(t_unix_s, value)`` samples in time order.

    From the last sample at or before ``start`` (the first sample, when none is
    that old) to the last at or before ``end``; None with fewer than two samples
    in reach. A counter that went down (a server restart) counts from its new value.
    """
    upto = [v for t, v in samples if t <= end_unix_s]
    if len(upto) < 2:
        return None
    base = max((i for i, (t, _) in enumerate(samples[: len(upto)]) if t <= start_unix_s), default=0)
    total = 0.0
    for a, b in zip(upto[base:], upto[base + 1:]):
        total += b - a if b >= a else b
    return total


def search_section(run_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The tab's ``search`` section from ``RUN/search.json``: every search pass, or why the file could not be read.

    ``{"passes": [...], "error": None}``; no run directory or no file yet gives no passes,
    and a damaged file gives no passes and an error sentence, never an exception.
    """
    if run_dir is None:
        return {"passes": [], "error": None}
    try:
        entries = read_search_log(run_dir)
        passes = [search_pass_view(e) for e in entries]
    except Exception as exc:  # a damaged file must not stop the tab; say what is wrong instead
        return {"passes": [], "error": str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"}
    return {"passes": json_safe(passes), "error": None}


def search_pass_view(entry: SearchEntry) -> dict[str, Any]:
    """One search pass as the tab shows it: the probe running, the probes so far, the bracket or the final reason."""
    spec = dict(entry.spec)
    return {
        "pass_name": str(entry.pass_name),
        "over": str(entry.over),
        "unit": "users" if entry.over == "users" else "requests/s",
        "confidence": spec.get("confidence"),
        "target": entry.target,
        "thresholds": dict(entry.thresholds),
        "running_level": entry.running_level,
        "done": bool(entry.done),
        "status": str(entry.status),
        "bracket": str(entry.bracket),
        "reason": str(entry.reason),
        "highest_pass": entry.highest_pass,
        "lowest_fail": entry.lowest_fail,
        "probes": [{
            "stage_name": str(p.stage_name), "level": p.level, "good": p.good, "judged": p.judged,
            "attainment": p.attainment, "attainment_low": p.attainment_low, "attainment_high": p.attainment_high,
            "verdict": str(p.verdict), "decision": str(p.decision), "next_level": p.next_level,
        } for p in entry.probes],
    }


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has neither), numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def format_rate(value: float | None, unit: str = "tokens/s") -> str:
    """``1,234 tokens/s``, ``12.3 tokens/s``; ``-`` for no value."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:,.1f} {unit}"


def format_ms(value: float | None) -> str:
    """``1,234 ms``, ``56.7 ms``, ``0.84 ms``; ``-`` for no value."""
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f} ms"
    return f"{value:.1f} ms" if abs(value) >= 1 else f"{value:.2f} ms"


def tab_rows(snapshot: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows ``{"metric", "value"}`` of the plain table Locust's LLM tab shows (the console's text fallback).

    ``snapshot`` is the JSON-safe dict the console serves (see :mod:`locustfiles.webui`).
    """
    win = snapshot.get("window") or {}
    lat = win.get("latency_ms") or {}
    server = snapshot.get("server") or {}
    totals = snapshot.get("totals") or {}
    span = float(win.get("window_s") or WINDOW_S)
    over = f"last {span:.0f} s" if span.is_integer() else f"last {span:.1f} s"
    rows = [
        ("Users", str(snapshot.get("users", "-"))),
        ("Requests in flight", "-" if snapshot.get("in_flight") is None else str(snapshot["in_flight"])),
        (f"Output tokens/s, all users ({over})", format_rate(win.get("output_tokens_per_s"))),
        (f"Output tokens/s per user, median request ({over})", format_rate(win.get("per_user_output_tokens_per_s"))),
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")):
        m = lat.get(name) or {}
        rows.append((f"{label} p50 / p95 ({over})", f"{format_ms(m.get('p50'))} / {format_ms(m.get('p95'))}"))
    errors = win.get("errors_by_category") or {}
    rows.append((f"Errors ({over})", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"))
    rows.append(("Requests / errors, whole run", f"{totals.get('requests', 0)} / {totals.get('errors', 0)}"))
    if server.get("ok"):
        kv = server.get("kv_cache_usage_ratio")
        rows += [
            ("Server: requests waiting", _num(server.get("requests_waiting"))),
            ("Server: KV-cache usage", "-" if kv is None else f"{kv * 100:.1f} %"),
            ("Server: preemptions (total)", _num(server.get("preemptions_total"))),
        ]
    else:
        rows.append(("Server gauges (/metrics)", str(server.get("error") or "not read yet")))
    rows.append(("Charts and downloads", "the page llm/ of this web UI"))
    return [{"metric": m, "value": v} for m, v in rows]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
