"""The envelope table's row: one typed record per stage, split by concern.

:class:`TableRow` holds one part per concern, each a frozen dataclass whose field
names are the table's column names (so a column is named once, here):

* :class:`StageWindow`: which stage, and the steady-state window it was measured over;
* :class:`RequestCounts`: requests, errors, samples and workload sizes in the window;
* :class:`LatencyPercentiles`: TTFT, TPOT, ITL and E2E percentiles (ms);
* :class:`Throughput`: aggregate and per-request output tokens/s;
* :class:`OpenLoopCells`: what an open-loop stage sent against what it asked, and how late;
* :class:`ServerTelemetry`: the server's own gauges and counters over the window;
* :class:`ServerLatency`: the server's own latency histograms over the window, and the time outside the engine;
* :class:`Goodput`: SLO attainment (good requests / judged, Wilson interval) and goodput;
* :class:`Trust`: whether the numbers describe the server or the load generator;
* :class:`SloVerdict`: each SLO's :class:`SloResult` and the stage's overall pass.

Code reads a cell by attribute (``row.latency.ttft_p95_ms``). Writers and SLO
checks that go by column name use :meth:`TableRow.value` (or ``row[column]``);
:data:`TABLE_COLUMNS` is the column order of ``table.csv``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "LATENCY_METRICS",
    "PERCENTILES",
    "SloResult",
    "StageWindow",
    "RequestCounts",
    "LatencyPercentiles",
    "Throughput",
    "OpenLoopCells",
    "ServerTelemetry",
    "ServerLatency",
    "WindowIntegrity",
    "Goodput",
    "Trust",
    "SloVerdict",
    "TableRow",
    "ClientRow",
    "TABLE_COLUMNS",
]

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
PERCENTILES = (50, 90, 95, 99)
_NAN = float("nan")


@dataclass(frozen=True, slots=True, kw_only=True)
class SloResult:
    """One SLO checked against a row: ``measured op threshold``.

    ``passed`` is False when there was nothing to measure (``note`` "no data"), and None
    for a key this version does not know (``op`` "?").
    """

    key: str
    threshold: float
    measured: float | None
    passed: bool | None
    op: str
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageWindow:
    """Which stage, and its steady-state window (seconds from the run's start).

    ``quota_mean_in_flight``: the part of ``mean_in_flight`` that was a client class's rate quota sent
    beside a users stage's users (requests with an intended send time in a users stage); None when the
    run has none.
    """

    pass_name: str = ""
    stage_name: str = ""
    stage_index: int = 0
    kind: str = "users"
    target_users: int | None = None
    target_rate_per_s: float | None = None
    mean_in_flight: float = _NAN
    window_start_s: float = _NAN
    window_end_s: float = _NAN
    window_s: float = _NAN
    window_note: str = ""
    quota_mean_in_flight: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCounts:
    """Requests of the stage that started in the window (``cancelled`` ones apart), and what they asked.

    ``ok_requests`` is the population of the TTFT/TPOT/E2E percentiles; ``few_samples`` lists
    the percentiles it is too small for. ``stage_records``/``stage_output_tokens`` count the
    whole stage, not only the window (a cross-check against the server's counters).
    """

    requests: int = 0
    ok_requests: int = 0
    errors: int = 0
    error_rate: float = _NAN
    errors_by_category: str = ""
    cancelled: int = 0
    itl_samples: int = 0
    few_samples: str = ""
    prompt_tokens_p50: float = _NAN
    output_tokens_p50: float = _NAN
    stage_records: int = 0
    stage_output_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyPercentiles:
    """Exact percentiles (ms) over the window's successful requests; ITL per token.

    ``ttft_mean_ms``/``e2e_mean_ms``: plain means over the same requests (to set against the
    server's histogram means, see :class:`ServerLatency`).
    """

    ttft_p50_ms: float = _NAN
    ttft_p90_ms: float = _NAN
    ttft_p95_ms: float = _NAN
    ttft_p99_ms: float = _NAN
    tpot_p50_ms: float = _NAN
    tpot_p90_ms: float = _NAN
    tpot_p95_ms: float = _NAN
    tpot_p99_ms: float = _NAN
    itl_p50_ms: float = _NAN
    itl_p90_ms: float = _NAN
    itl_p95_ms: float = _NAN
    itl_p99_ms: float = _NAN
    e2e_p50_ms: float = _NAN
    e2e_p90_ms: float = _NAN
    e2e_p95_ms: float = _NAN
    e2e_p99_ms: float = _NAN
    ttft_mean_ms: float = _NAN
    e2e_mean_ms: float = _NAN


@dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    """Output tokens/s over the window: all requests together, and as one in-flight request sees it."""

    aggregate_output_tokens_per_s: float = _NAN
    per_user_output_tokens_per_s: float = _NAN


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenLoopCells:
    """Open-loop stages only (None elsewhere): rate sent, send lag, latency from the intended send time."""

    achieved_rate_per_s: float | None = None
    send_lag_p50_ms: float | None = None
    send_lag_p99_ms: float | None = None
    ttft_from_intended_p50_ms: float | None = None
    ttft_from_intended_p95_ms: float | None = None
    e2e_from_intended_p95_ms: float | None = None
    max_concurrency: int | None = None  # the stage's cap on requests in flight: waiting for a slot is send lag


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTelemetry:
    """The server's ``/metrics`` over the window (None without samples in it).

    ``server_prefix_cache_queried_tokens``/``server_prefix_cache_hit_ratio``: prompt tokens the
    server looked up in its prefix cache over the window, and the share of them that were hits
    (see :mod:`analysis.prefix_cache`: counter deltas between the last samples at or before the
    window's edges, as for :class:`ServerLatency`); None without the counters, across a restart,
    and (the ratio) when nothing was looked up.
    """

    server_requests_running_mean: float | None = None
    server_requests_waiting_max: float | None = None
    server_kv_cache_usage_max_ratio: float | None = None
    server_preemptions: float | None = None
    server_output_tokens_per_s: float | None = None
    server_prefix_cache_queried_tokens: float | None = None
    server_prefix_cache_hit_ratio: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLatency:
    """The server's latency histograms over the window (see :mod:`analysis.server_latency`).

    Deltas between the last ``/metrics`` sample at or before the window's start and the last at
    or before its end: the requests the server finished in between. Means are sum / count;
    p50/p95 are interpolated inside the histogram's buckets (Prometheus' ``histogram_quantile``),
    so they are only as fine as the bucket bounds. None without samples, without a finished
    request, without the histogram, or across a server restart.
    ``server_ttft_mean_bucket_ms``: the width of the bucket holding the server's mean TTFT (the
    resolution of a client/server comparison). ``outside_engine_ttft_mean_ms`` = client mean TTFT
    - server mean TTFT: time spent outside the engine (front end, network, load generator).
    """

    server_ttft_mean_ms: float | None = None
    server_ttft_p50_ms: float | None = None
    server_ttft_p95_ms: float | None = None
    server_queue_mean_ms: float | None = None
    server_queue_p50_ms: float | None = None
    server_queue_p95_ms: float | None = None
    server_prefill_mean_ms: float | None = None
    server_prefill_p50_ms: float | None = None
    server_prefill_p95_ms: float | None = None
    server_decode_mean_ms: float | None = None
    server_decode_p50_ms: float | None = None
    server_decode_p95_ms: float | None = None
    server_e2e_mean_ms: float | None = None
    server_e2e_p50_ms: float | None = None
    server_e2e_p95_ms: float | None = None
    server_requests_finished: int | None = None
    server_ttft_mean_bucket_ms: float | None = None
    outside_engine_ttft_mean_ms: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Trust:
    """Whether the window measured the server: the load generator's health, lost workers, a stopped server.

    ``load_generators_ended``: one mapping per worker lost or gone in the stage
    (:func:`analysis.workers.stage_endings`).
    """

    host_cpu_max_core_ratio: float | None = None
    client_saturated: bool | None = None
    server_stopped: bool = False
    client_loop_lag_max_ms: float | None = None
    client_cpu_max_percent: float | None = None
    client_over_budget: str | None = None  # why the load per process exceeded its budget (envelope.client_budget)
    load_generators_ended: tuple[Mapping[str, Any], ...] = ()
    trustworthy: bool = True
    untrustworthy_reasons: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowIntegrity:
    """Whether the window holds only this stage's steady state, and how many of its requests a stall touched.

    ``departing_user_requests``: requests the stage's records hold from users being stopped on a step
    down in users (left out of every number). ``settled_at_s``: when requests in flight first fell to the
    stage's target users (seconds from the run's start; None when the window did not wait for it).
    ``stalled_requests``/``stalled_share``: window requests during which the load generator's event
    loop stalled over the limit (None: the records do not say), and the percentiles without them.
    ``coalesced_chunk_share``: the share of the window's ITL values that are exactly 0 (two chunks
    timestamped by one socket read); when it is high, ITL percentiles measure read batching.
    """

    departing_user_requests: int = 0
    settled_at_s: float | None = None
    stalled_requests: int | None = None
    stalled_share: float | None = None
    stall_max_ms: float | None = None
    ttft_p95_unstalled_ms: float | None = None
    ttft_p99_unstalled_ms: float | None = None
    e2e_p95_unstalled_ms: float | None = None
    coalesced_chunk_share: float | None = None  # ITL gaps of exactly 0: chunks that came in one socket read


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodput:
    """SLO attainment and goodput over the window (see :mod:`envelope.attainment`); None without thresholds.

    ``good_requests``: the window's requests (cancelled ones apart) that succeeded and met every
    per-request threshold; ``attainment`` = good / requests, with its Wilson interval
    (``attainment_low``/``attainment_high``, 95%); goodput = the window's output tokens/s times the
    share of the judged successes' output tokens that good requests produced (and that in good
    requests per second): with every request good it equals the throughput column. ``over_capacity``: an open-loop stage whose in-flight count and
    TTFT kept rising through the window (no steady state; see :mod:`analysis.saturation`).
    """

    good_requests: int | None = None
    attainment: float | None = None
    attainment_low: float | None = None
    attainment_high: float | None = None
    attainment_target: float | None = None
    goodput_requests_per_s: float | None = None
    goodput_output_tokens_per_s: float | None = None
    over_capacity: bool | None = None
    over_capacity_note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SloVerdict:
    """The stage's SLOs: each one's result, and whether all that could be checked passed (None: none)."""

    slo_pass: bool | None = None
    slo_results: tuple[SloResult, ...] = ()


_PARTS: tuple[tuple[str, type], ...] = (
    ("window", StageWindow),
    ("counts", RequestCounts),
    ("latency", LatencyPercentiles),
    ("throughput", Throughput),
    ("open_loop", OpenLoopCells),
    ("server", ServerTelemetry),
    ("server_latency", ServerLatency),
    ("integrity", WindowIntegrity),
    ("goodput", Goodput),
    ("trust", Trust),
    ("slo", SloVerdict),
)
# column name -> the part that holds it
_PART_OF: dict[str, str] = {f.name: part for part, cls in _PARTS for f in dataclasses.fields(cls)}


@dataclass(frozen=True, slots=True, kw_only=True)
class TableRow:
    """One stage of the envelope table (see the module docstring)."""

    window: StageWindow = field(default_factory=StageWindow)
    counts: RequestCounts = field(default_factory=RequestCounts)
    latency: LatencyPercentiles = field(default_factory=LatencyPercentiles)
    throughput: Throughput = field(default_factory=Throughput)
    open_loop: OpenLoopCells = field(default_factory=OpenLoopCells)
    server: ServerTelemetry = field(default_factory=ServerTelemetry)
    server_latency: ServerLatency = field(default_factory=ServerLatency)
    integrity: WindowIntegrity = field(default_factory=WindowIntegrity)
    goodput: Goodput = field(default_factory=Goodput)
    trust: Trust = field(default_factory=Trust)
    slo: SloVerdict = field(default_factory=SloVerdict)

    def value(self, column: str) -> Any:
        """The cell of ``column`` (a name of :data:`TABLE_COLUMNS`); KeyError for any other name."""
        return getattr(getattr(self, _PART_OF[column]), column)

    def __getitem__(self, column: str) -> Any:
        return self.value(column)

    def has(self, column: str) -> bool:
        return column in _PART_OF

    def replace(self, **columns: Any) -> "TableRow":
        """A copy with cells changed by column name, whatever part holds them."""
        by_part: dict[str, dict[str, Any]] = {}
        for column, value in columns.items():
            by_part.setdefault(_PART_OF[column], {})[column] = value
        return dataclasses.replace(self, **{part: dataclasses.replace(getattr(self, part), **cells)
                                            for part, cells in by_part.items()})

    @classmethod
    def from_cells(cls, **columns: Any) -> "TableRow":
        """A row from cells named by column; the rest keep their defaults (for tests and readers)."""
        return cls().replace(**columns)

    def as_dict(self) -> dict[str, Any]:
        """Every cell by column name, in :data:`TABLE_COLUMNS` order."""
        return {c: self.value(c) for c in TABLE_COLUMNS}

    # the cells most code asks for, by their plain names
    @property
    def pass_name(self) -> str:
        return self.window.pass_name

    @property
    def stage_name(self) -> str:
        return self.window.stage_name

    @property
    def stage_index(self) -> int:
        return self.window.stage_index


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRow:
    """One client class in one stage: its own :class:`TableRow`, judged against its own SLOs.

    ``row`` is cut with the stage row's machinery over the same steady-state window, from the class's
    records only (``mean_in_flight``, throughput and goodput are the class's; the server's cells and
    the load generator's trust are the stage's). ``client_users``: distinct user ids among the class's
    records in the stage (None: none recorded, e.g. open loop). ``stage_clients``: every class that
    sent requests in the stage, this one included. ``slos``: the SLOs the class was judged against
    (its own from ``StageRecord.client_slos``, else the stage's).
    """

    client: str
    client_users: int | None = None
    stage_clients: tuple[str, ...] = ()
    slos: Mapping[str, float] = field(default_factory=dict)
    row: TableRow = field(default_factory=TableRow)


TABLE_COLUMNS: tuple[str, ...] = (
    "pass_name", "stage_name", "stage_index", "kind", "target_users", "target_rate_per_s",
    "mean_in_flight", "window_start_s", "window_end_s", "window_s", "window_note",
    "requests", "ok_requests", "errors", "error_rate", "errors_by_category", "cancelled",
    "aggregate_output_tokens_per_s", "per_user_output_tokens_per_s",
    *(f"{m}_p{q}_ms" for m in LATENCY_METRICS for q in PERCENTILES),
    "itl_samples", "few_samples",
    "prompt_tokens_p50", "output_tokens_p50",
    "stage_records", "stage_output_tokens",
    "server_requests_running_mean", "server_requests_waiting_max",
    "server_kv_cache_usage_max_ratio", "server_preemptions", "server_output_tokens_per_s",
    "host_cpu_max_core_ratio", "client_saturated", "server_stopped",
    "achieved_rate_per_s", "send_lag_p50_ms", "send_lag_p99_ms",
    "ttft_from_intended_p50_ms", "ttft_from_intended_p95_ms", "e2e_from_intended_p95_ms",
    "client_loop_lag_max_ms", "client_cpu_max_percent", "load_generators_ended",
    "trustworthy", "untrustworthy_reasons",
    "slo_pass", "slo_results",
    # added later, kept at the end so earlier columns keep their places
    "ttft_mean_ms", "e2e_mean_ms",
    *(f"server_{m}_{s}_ms" for m in ("ttft", "queue", "prefill", "decode", "e2e") for s in ("mean", "p50", "p95")),
    "server_requests_finished", "server_ttft_mean_bucket_ms", "outside_engine_ttft_mean_ms",
    "departing_user_requests", "settled_at_s", "stalled_requests", "stalled_share", "stall_max_ms",
    "ttft_p95_unstalled_ms", "ttft_p99_unstalled_ms", "e2e_p95_unstalled_ms", "coalesced_chunk_share",
    "good_requests", "attainment", "attainment_low", "attainment_high", "attainment_target",
    "goodput_requests_per_s", "goodput_output_tokens_per_s", "over_capacity", "over_capacity_note",
    "server_prefix_cache_queried_tokens", "server_prefix_cache_hit_ratio", "quota_mean_in_flight",
    "max_concurrency", "client_over_budget",
)
assert set(TABLE_COLUMNS) == set(_PART_OF), "every column is a field of exactly one part"
