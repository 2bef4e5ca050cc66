"""Graphs of the envelope, each drawn on the matplotlib Axes it is given.

Nothing here picks a backend, opens a figure file or shows a window; the
report and the CLI do that. Every graph has a title, axis labels with units,
and SLO thresholds as labelled dashed horizontal lines, so it reads on its own.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.chunks import RequestChunks
from analysis.common import METRIC_NAMES
from analysis.rows import TableRow
from envelope.stages import StageRecord

__all__ = [
    "plot_throughput_vs_concurrency",
    "plot_latency_vs_concurrency",
    "plot_timeline",
    "plot_ttft_distribution",
    "BUCKET_S",
]

BUCKET_S = 5.0


def _x(row: TableRow) -> float:
    w = row.window
    for v in (w.target_users, w.target_rate_per_s, w.mean_in_flight):
        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            return float(v)
    return float("nan")


def _x_label(table: Sequence[TableRow]) -> str:
    if any(r.window.target_users is not None and r.window.kind == "users" for r in table):
        return "concurrent users (target)"
    if any(r.window.target_rate_per_s is not None for r in table):
        return "request rate (requests/s, target)"
    return "mean requests in flight"


def _workload_key(rows: Sequence[TableRow]) -> tuple[str, float, float] | None:
    """A pass's load kind and median prompt and output tokens (rounded to whole tokens); None if unknown."""
    prompts = sorted(r.counts.prompt_tokens_p50 for r in rows if _finite(r.counts.prompt_tokens_p50))
    outs = sorted(r.counts.output_tokens_p50 for r in rows if _finite(r.counts.output_tokens_p50))
    if not prompts or not outs:
        return None
    return rows[0].window.kind, round(prompts[len(prompts) // 2]), round(outs[len(outs) // 2])


def _by_pass(table: Sequence[TableRow]) -> dict[str, list[TableRow]]:
    """One series per pass, sorted by level; passes that share a workload (same load kind, prompt and
    output tokens) are one series, so fixed passes of one stage each draw a line, not lone dots."""
    passes: dict[str, list[TableRow]] = {}
    for r in table:
        passes.setdefault(r.pass_name, []).append(r)
    groups: dict[Any, list[str]] = {}
    for name, rows in passes.items():
        groups.setdefault(_workload_key(rows) or ("pass", name), []).append(name)
    out: dict[str, list[TableRow]] = {}
    for names in groups.values():
        out[" + ".join(names)] = sorted((r for n in names for r in passes[n]), key=_x)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_throughput_vs_concurrency(ax: Any, table: Sequence[TableRow], *, label_prefix: str = "") -> None:
    """Aggregate output tokens/s against concurrency, one line per pass."""
    for name, rows in _by_pass(table).items():
        xs = [_x(r) for r in rows]
        ys = [_nan(r.throughput.aggregate_output_tokens_per_s) for r in rows]
        ax.plot(xs, ys, marker="o", label=f"{label_prefix}{name}" if (label_prefix or name) else None)
    floors = {float(s.threshold) for r in table for s in r.slo.slo_results if s.key == "min_output_tokens_per_s"}
    for t in sorted(floors):
        _slo_line(ax, t, f"SLO min {t:g} tokens/s")
    ax.set_title("Aggregate output throughput vs concurrency (steady-state windows)")
    ax.set_xlabel(_x_label(table))
    ax.set_ylabel("output tokens/s (all requests)")
    ax.set_ylim(bottom=0)
    _legend(ax)


def plot_latency_vs_concurrency(
    ax: Any,
    table: Sequence[TableRow],
    metric: str = "ttft",
    slos: Mapping[str, Any] | None = None,
    *,
    label_prefix: str = "",
) -> None:
    """p50/p95/p99 of ``metric`` (ttft, tpot, itl, e2e) in seconds against concurrency."""
    name = METRIC_NAMES.get(metric, metric.upper())
    for pname, rows in _by_pass(table).items():
        xs = [_x(r) for r in rows]
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            ys = [_nan(r.value(f"{metric}_p{q}_ms")) / 1000.0 for r in rows]
            tag = f"{label_prefix}{pname} " if (label_prefix or pname) else ""
            ax.plot(xs, ys, linestyle=style, marker="o", label=f"{tag}p{q}")
    if slos is None:
        slos = {}
        for r in table:
            for s in r.slo.slo_results:
                slos.setdefault(s.key, s.threshold)
    for key, t in sorted(slos.items()):
        if key.startswith(f"{metric}_") and key.endswith("_ms") and t is not None:
            pct = key.split("_")[1]
            _slo_line(ax, float(t) / 1000.0, f"SLO {pct} {float(t) / 1000.0:g} s")
    ax.set_title(f"{name} percentiles vs concurrency (successful requests)")
    ax.set_xlabel(_x_label(table))
    ax.set_ylabel(f"{name} (s)")
    ax.set_ylim(bottom=0)
    _legend(ax)


def plot_timeline(
    axes: Sequence[Any],
    frame: pd.DataFrame,
    stages: Sequence[StageRecord],
    telemetry: Mapping[str, pd.DataFrame] | None = None,
    *,
    chunks: RequestChunks | None = None,
    bucket_s: float = BUCKET_S,
    zero_unix_s: float | None = None,
) -> None:
    """The run over time on two or three axes.

    ``axes[0]``: target users (step) and aggregate output tokens/s per bucket;
    ``axes[1]``: p95 TTFT per bucket of request start; ``axes[2]`` (optional):
    server requests running/waiting and KV-cache use, when telemetry has them.
    ``chunks`` (the records' content chunks, :class:`analysis.chunks.RequestChunks`)
    gives throughput per bucket from when each chunk arrived; without it each
    request's tokens count at its end. Times count from
    ``zero_unix_s`` (the run's start, :func:`analysis.load.run_start_unix_s`;
    default: the first stage's start).
    """
    t0 = _t0(frame, stages) if zero_unix_s is None else zero_unix_s
    ax_users = axes[0]
    if stages:
        xs, ys = [], []
        for s in stages:
            users = s.target_users or 0
            xs += [s.start_unix_s - t0, s.end_unix_s - t0]
            ys += [users, users]
        ax_users.plot(xs, ys, color="0.4", drawstyle="steps-post", label="target users")
    ax_users.set_ylabel("users (target)")
    ax_users.set_ylim(bottom=0)
    ax_users.set_xlabel("time since run start (s)")
    ax_users.set_title(f"Load and throughput over time ({bucket_s:g} s buckets)")
    ax_tps = ax_users.twinx()
    last = chunks.last_arrival_unix_s() if chunks is not None else None
    if last is not None:
        edges = _edges(np.array([last - t0]), bucket_s)
        sums = chunks.token_histogram(edges, t0)
    elif len(frame):
        ok = frame["ok"].to_numpy(dtype=bool)
        end = frame["in_flight_end_unix_s"].to_numpy(dtype=float)[ok] - t0
        tok = pd.to_numeric(frame["output_tokens"], errors="coerce").to_numpy(dtype=float, na_value=0.0)[ok]
        edges = _edges(end, bucket_s)
        sums, _ = np.histogram(end, bins=edges, weights=tok)
    else:
        edges, sums = np.array([0.0, bucket_s]), np.array([0.0])
    ax_tps.plot(edges[:-1] + bucket_s / 2, sums / bucket_s, color="tab:blue", label="output tokens/s")
    ax_tps.set_ylabel("output tokens/s")
    ax_tps.set_ylim(bottom=0)
    handles = ax_users.get_legend_handles_labels()
    h2 = ax_tps.get_legend_handles_labels()
    if handles[0] or h2[0]:
        ax_users.legend(handles[0] + h2[0], handles[1] + h2[1], loc="upper left", fontsize="small")

    ax_ttft = axes[1]
    if len(frame):
        ok = frame["ok"].to_numpy(dtype=bool)
        start = frame["wall_start_unix_s"].to_numpy(dtype=float)[ok] - t0
        ttft = frame["ttft_ms"].to_numpy(dtype=float, na_value=np.nan)[ok] / 1000.0
        keep = ~np.isnan(ttft)
        if keep.any():
            b = np.floor(start[keep] / bucket_s).astype(np.int64)
            p95 = pd.Series(ttft[keep]).groupby(b).quantile(0.95)
            ax_ttft.plot(p95.index.to_numpy() * bucket_s + bucket_s / 2, p95.to_numpy(),
                         marker=".", color="tab:red", label="p95 TTFT")
    ax_ttft.set_title(f"p95 TTFT by request start ({bucket_s:g} s buckets)")
    ax_ttft.set_xlabel("time since run start (s)")
    ax_ttft.set_ylabel("TTFT (s)")
    ax_ttft.set_ylim(bottom=0)

    if len(axes) > 2:
        ax_srv = axes[2]
        m = (telemetry or {}).get("metrics")
        ax_srv.set_title("Server (vLLM /metrics)")
        ax_srv.set_xlabel("time since run start (s)")
        if m is None or m.empty or "t_unix_s" not in m.columns:
            ax_srv.text(0.5, 0.5, "no server telemetry", ha="center", va="center", transform=ax_srv.transAxes)
            ax_srv.set_ylabel("requests")
        else:
            t = m["t_unix_s"].to_numpy(dtype=float) - t0
            for col, label in (("requests_running", "running"), ("requests_waiting", "waiting")):
                if col in m.columns:
                    ax_srv.plot(t, pd.to_numeric(m[col], errors="coerce"), label=label)
            ax_srv.set_ylabel("requests")
            if "kv_cache_usage_ratio" in m.columns:
                ax_kv = ax_srv.twinx()
                ax_kv.plot(t, pd.to_numeric(m["kv_cache_usage_ratio"], errors="coerce"),
                           color="tab:purple", linestyle="--", label="KV cache use")
                ax_kv.set_ylabel("KV-cache use (0..1)")
                ax_kv.set_ylim(0, 1.05)
                ax_kv.legend(loc="upper right", fontsize="small")
            _legend(ax_srv, loc="upper left")


def plot_ttft_distribution(ax: Any, frame: pd.DataFrame) -> None:
    """Empirical CDF of TTFT (s) of successful requests, one curve per pass."""
    if len(frame):
        # two columns only: copying the whole frame of a million records costs ~0.5 GB
        ok = frame.loc[frame["ok"].to_numpy(dtype=bool), ["pass_name", "ttft_ms"]]
        for name, g in ok.groupby("pass_name", sort=False):
            v = np.sort(g["ttft_ms"].to_numpy(dtype=float, na_value=np.nan) / 1000.0)
            v = v[~np.isnan(v)]
            if v.size:
                frac = np.arange(1, v.size + 1) / v.size
                if v.size > 4000:  # more points than pixels: keep evenly spaced ranks and the tail
                    keep = np.unique(np.r_[np.linspace(0, v.size - 1, 4000).astype(np.int64), v.size - 1])
                    v, frac = v[keep], frac[keep]
                ax.step(v, frac, where="post", label=f"{name} (n={len(g)})")
    ax.set_title("TTFT distribution (successful requests, all stages)")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    _legend(ax)


def _slo_line(ax: Any, y: float, label: str) -> None:
    ax.axhline(y, color="tab:red", linestyle="--", linewidth=1, label=label)


def _legend(ax: Any, loc: str = "best") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize="small")


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def _t0(frame: pd.DataFrame, stages: Sequence[StageRecord]) -> float:
    if stages:
        return float(min(s.start_unix_s for s in stages))
    if len(frame):
        return float(frame["wall_start_unix_s"].min())
    return 0.0


def _edges(t: np.ndarray, bucket_s: float) -> np.ndarray:
    hi = float(np.nanmax(t)) if t.size else bucket_s
    n = max(1, int(math.ceil(max(hi, 0.0) / bucket_s)) + 1)
    return np.arange(n + 1) * bucket_s
