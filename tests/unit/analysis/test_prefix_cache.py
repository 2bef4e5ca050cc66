"""The server's prefix-cache hit rate per stage window, from its /metrics counters, worked out by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.load import load_run
from analysis.prefix_cache import (
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    PrefixCacheWindow,
    prefix_cache_counters,
    prefix_cache_window,
)
from analysis.report import write_report
from analysis.rows import TABLE_COLUMNS
from analysis.table import envelope_table


def test_names_tried_in_order_newest_first():
    assert PREFIX_CACHE_HITS[:4] == ("prefix_cache_hits_total", "prefix_cache_hits",
                                     "gpu_prefix_cache_hits_total", "gpu_prefix_cache_hits")
    assert "vllm:prefix_cache_queries_total" in PREFIX_CACHE_QUERIES
    assert "vllm:gpu_prefix_cache_queries" in PREFIX_CACHE_QUERIES
    assert PREFIX_CACHE_QUERIES.index("vllm:prefix_cache_queries_total") < PREFIX_CACHE_QUERIES.index(
        "vllm:gpu_prefix_cache_queries_total")


def test_delta_between_the_last_samples_at_or_before_each_edge():
    times, hits, queries = [100.0, 110.0, 130.0, 140.0], [0.0, 50.0, 350.0, 400.0], [0.0, 100.0, 500.0, 600.0]
    # start 105: the 100 s sample; end 135: the 130 s one -> 350 of 500 tokens
    w = prefix_cache_window(times, hits, queries, 105.0, 135.0)
    assert w == PrefixCacheWindow(queried_tokens=500.0, hit_tokens=350.0)
    assert w.hit_ratio == pytest.approx(0.7)
    # an edge exactly on a sample uses it: 110 -> 140 is 350 of 500 as well
    assert prefix_cache_window(times, hits, queries, 110.0, 140.0).hit_ratio == pytest.approx(0.7)
    assert prefix_cache_window(times, hits, queries, 90.0, 135.0) is None  # nothing at or before the start


def test_no_lookups_and_a_restart_give_none():
    flat = prefix_cache_window([1.0, 2.0], [10.0, 10.0], [20.0, 20.0], 1.0, 2.0)
    assert flat == PrefixCacheWindow(queried_tokens=0.0, hit_tokens=0.0) and flat.hit_ratio is None
    assert prefix_cache_window([1.0, 2.0], [10.0, 2.0], [20.0, 5.0], 1.0, 2.0) is None  # the counters went down


def test_counters_from_our_field_names_or_vllms_first_present_wins():
    frame = pd.DataFrame({
        "t_unix_s": [3.0, 1.0, 2.0, 4.0],
        # a server in transition: the new name wins where present, the old one fills in elsewhere
        "prefix_cache_hits_total": [30.0, None, 20.0, None],
        "vllm:gpu_prefix_cache_hits": [999.0, 10.0, 999.0, None],
        "vllm:prefix_cache_queries_total": [60.0, 20.0, 40.0, 80.0],
    })
    t, hits, queries = prefix_cache_counters(frame)
    # the 4.0 sample lacks hits: left out; the rest in time order
    assert t.tolist() == [1.0, 2.0, 3.0]
    assert hits.tolist() == [10.0, 20.0, 30.0]
    assert queries.tolist() == [20.0, 40.0, 60.0]
    assert [a.size for a in prefix_cache_counters(pd.DataFrame({"t_unix_s": [1.0]}))] == [0, 0, 0]
    assert [a.size for a in prefix_cache_counters(None)] == [0, 0, 0]


def _metrics(rows):
    return [{"t_unix_s": t, "ok": True, "requests_running": 1.0, "prefix_cache_hits_total": h,
             "prefix_cache_queries_total": q} for t, h, q in rows]


def test_table_column_and_server_section(builders, tmp_path):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0)  # ramp 2 s + settle 5 s: window [1007, 1060]
    recs = [make_record(st, 1010.0 + 10 * i, 0.1) for i in range(4)]
    # at or before 1007: the 1005 sample (100 of 200); at or before 1060: the 1059 one (1000 of 1500)
    metrics = _metrics([(1000.0, 0.0, 0.0), (1005.0, 100.0, 200.0), (1030.0, 400.0, 800.0),
                        (1059.0, 1000.0, 1500.0), (1065.0, 5000.0, 9000.0)])
    root = write_run(tmp_path / "cache", stages=[st], records=recs, metrics=metrics)
    run = load_run(root)
    (row,) = envelope_table(run)
    assert row.server.server_prefix_cache_queried_tokens == pytest.approx(1300.0)
    assert row.server.server_prefix_cache_hit_ratio == pytest.approx(900.0 / 1300.0)
    # new columns go at the end of table.csv, so earlier columns keep their places
    assert TABLE_COLUMNS[-5:-3] == ("server_prefix_cache_queried_tokens", "server_prefix_cache_hit_ratio")

    out = tmp_path / "report"
    write_report(run, out)
    table_md = (out / "table.md").read_text(encoding="utf-8")
    assert "| prefix cache hits |" in table_md and "| 69.2% |" in table_md
    csv_text = (out / "table.csv").read_text(encoding="utf-8")
    # then the quota, cap and load-generator budget columns, empty here
    assert csv_text.splitlines()[1].endswith(",1300.0,0.692308,,,")
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert "Prefix cache: 69.2% of the 1,300 prompt tokens the server looked up were cache hits." in md
    assert "## Where the time goes (server-side, per stage)" in md  # shown for the counters alone


def test_without_the_counters_no_column_and_no_line(known_run, tmp_path):
    run = load_run(known_run)
    (row,) = envelope_table(run)
    assert row.server.server_prefix_cache_hit_ratio is None
    assert row.server.server_prefix_cache_queried_tokens is None
    out = tmp_path / "report"
    write_report(run, out)
    assert "prefix cache" not in (out / "table.md").read_text(encoding="utf-8")
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert "Prefix cache" not in md and "Where the time goes" not in md
