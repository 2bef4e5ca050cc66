"""The search pass in the report: its envelope paragraph, its envelope graph, and the report's first screen."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from analysis.rows import SloResult, TableRow
from analysis.search import search_findings
from analysis.search_report import live_difference, probe_table, search_paragraph
from envelope.attainment import wilson_interval
from envelope.search_log import ProbeEntry, SearchEntry

RUN = Path(__file__).resolve().parents[2] / "fixtures" / "golden_run"


def _row(i: int, users: int, good: int, judged: int, *, tps: float, ttft_p95_ms: float, waiting: float = 0,
         pass_name: str = "find") -> TableRow:
    low, high = wilson_interval(good, judged)
    passed = low >= 0.95 or good / judged >= 0.95
    return TableRow.from_cells(
        pass_name=pass_name, stage_name=f"{pass_name}-{users}u-{i}", stage_index=i, kind="users", target_users=users,
        window_s=10.0, requests=judged, ok_requests=judged, errors=0, prompt_tokens_p50=300.0,
        output_tokens_p50=128.0, aggregate_output_tokens_per_s=tps, ttft_p50_ms=ttft_p95_ms / 2,
        ttft_p95_ms=ttft_p95_ms, tpot_p50_ms=10.0, tpot_p95_ms=12.0, e2e_p95_ms=2000.0,
        good_requests=good, attainment=good / judged, attainment_low=low, attainment_high=high,
        attainment_target=0.95, goodput_requests_per_s=good / 10.0, goodput_output_tokens_per_s=tps * good / judged,
        server_requests_waiting_max=waiting,
        slo_pass=passed,
        slo_results=(SloResult(key="attainment_min", threshold=0.95, measured=good / judged, passed=passed, op=">="),),
    )


def _entry(*, reason: str = "done", spec: dict | None = None, probes: tuple[ProbeEntry, ...] = ()) -> SearchEntry:
    return SearchEntry(pass_name="find", over="users", spec=spec or {"start": 4, "max": 64}, target=0.95,
                       thresholds={"ttft_ms": 500.0, "tpot_ms": 20.0}, probes=probes, done=True, reason=reason)


def _finding(rows, entry):
    (finding,) = search_findings(rows, [entry])
    return finding


BRACKETED = [_row(0, 4, 200, 200, tps=300, ttft_p95_ms=100), _row(1, 8, 50, 200, tps=560, ttft_p95_ms=900, waiting=5),
             _row(2, 6, 200, 200, tps=540, ttft_p95_ms=200), _row(3, 7, 160, 200, tps=555, ttft_p95_ms=700, waiting=3)]


def test_bracketed_paragraph_states_limit_interval_delivery_and_cause():
    text = search_paragraph(_finding(BRACKETED, _entry()), server={"max_num_seqs": 6})
    assert text.startswith("At ~300-token prompts and 128 output tokens, this server meets its SLOs "
                           "(TTFT <= 500 ms, TPOT <= 20 ms for >= 95% of requests) up to 6 concurrent users "
                           "(between 6 and 7 users at 95% confidence), delivering 540 output tokens/s "
                           "(goodput 20 requests/s); at 7 users attainment falls to 80% (95% CI 74-85%, 200 requests)")
    assert "because requests queued in the server" in text
    assert "up to 3 requests waiting in the server" in text
    assert "max_num_seqs 6" in text
    assert "above" not in text and "budget" not in text


def test_above_max_says_every_level_passed_up_to_the_maximum():
    rows = [_row(0, 4, 200, 200, tps=300, ttft_p95_ms=100), _row(1, 8, 200, 200, tps=560, ttft_p95_ms=150)]
    text = search_paragraph(_finding(rows, _entry(spec={"start": 4, "max": 8})))
    assert "meets its SLOs (TTFT <= 500 ms, TPOT <= 20 ms for >= 95% of requests) at every level up to the " \
           "search's maximum, 8 concurrent users" in text
    assert "falls to" not in text
    assert "max_num_seqs" not in text  # no server.json figure: nothing said


def test_below_min_says_even_the_minimum_failed():
    rows = [_row(0, 1, 20, 200, tps=80, ttft_p95_ms=900)]
    text = search_paragraph(_finding(rows, _entry(spec={"start": 1, "min": 1, "max": 8})))
    assert "does not meet its SLOs" in text and "even at the search's minimum, 1 user" in text
    assert "at 1 user attainment falls to 10%" in text


def test_wide_says_the_budget_ran_out_and_gives_the_bracket():
    rows = [_row(0, 4, 200, 200, tps=300, ttft_p95_ms=100), _row(1, 16, 50, 200, tps=560, ttft_p95_ms=900)]
    entry = _entry(reason="probe budget spent (2 of max_probes 2 run), so 10 users is not probed",
                   spec={"start": 4, "max": 64, "max_probes": 2})
    finding = _finding(rows, entry)
    assert finding.bracket.status == "wide"
    text = search_paragraph(finding)
    assert "at 4 concurrent users" in text and "fails them at 16 users" in text
    assert "the search's budget ran out" in text and "precision asked (1 user)" in text


def test_over_capacity_and_unresolved_levels_are_named():
    rows = BRACKETED + [_row(4, 5, 185, 200, tps=500, ttft_p95_ms=450).replace(
        over_capacity=True, over_capacity_note="in flight rose 3 -> 9")]
    text = search_paragraph(_finding(rows, _entry()))
    assert "Unresolved" in text and "5 users at 92%" in text
    assert "over capacity: no steady state at 5 users (find-5u-4: in flight rose 3 -> 9)" in text.lower()


def test_probe_table_lists_every_probe_with_its_logged_decision_and_live_answer_agrees():
    probes = tuple(ProbeEntry(stage_index=r.stage_index, stage_name=r.stage_name, level=r.window.target_users,
                              good=r.goodput.good_requests, judged=r.counts.requests, duration_s=10.0,
                              attainment=r.goodput.attainment, attainment_low=0.0, attainment_high=1.0,
                              verdict="pass", decision=f"decided after {r.stage_name}") for r in BRACKETED)
    entry = SearchEntry(**{**_entry(probes=probes).to_json(), "probes": probes, "highest_pass": 6.0,
                           "lowest_fail": 7.0, "status": "bracketed"})
    finding = _finding(BRACKETED, entry)
    table = probe_table(finding)
    assert len(table) == 1 + len(BRACKETED)
    assert [t[-1] for t in table[1:]] == [f"decided after {r.stage_name}" for r in BRACKETED]
    assert [t[-2] for t in table[1:]] == ["pass", "fail", "pass", "fail"]
    assert "agree" in live_difference(finding)
    other = SearchEntry(**{**entry.to_json(), "probes": probes, "highest_pass": 4.0, "lowest_fail": 6.0})
    assert "differ: live highest pass 4, lowest fail 6" in live_difference(_finding(BRACKETED, other))


def test_envelope_graph_has_one_point_per_probe_thresholds_zones_and_is_a_real_png():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.envelope_graph import PROBE_LABEL, plot_envelope
    from analysis.report import render_figure_png

    finding = _finding(BRACKETED, _entry())
    fig = Figure()
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    plot_envelope(axes, finding)
    (probes,) = [c for c in axes[0].collections if c.get_gid() == PROBE_LABEL]
    assert sorted(probes.get_offsets()[:, 0].tolist()) == [4, 6, 7, 8]
    thresholds = sorted(line.get_ydata()[0] for line in axes[0].get_lines() if line.get_linestyle() == "--")
    assert thresholds == [20.0, 500.0]
    assert len(axes[0].patches) == 3  # safe, bending, over
    assert "TTFT <= 500 ms" in axes[0].get_title() and "300-token prompts" in axes[0].get_title()
    (bars,) = axes[2].containers
    assert len(bars.lines[0].get_xdata()) == 4  # one attainment point per pooled level

    png = render_figure_png(lambda ax: plot_envelope(ax, finding), nrows=3, size_in=(9.0, 9.0), sharex=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 20_000 < len(png) < 1_000_000


@pytest.fixture(scope="module")
def searched_report(tmp_path_factory):
    """The golden run with its closed-loop pass logged as a search (two probes: 1 and 4 users)."""
    from analysis.load import load_run
    from analysis.report import write_report
    from envelope.search_log import write_search_log

    run_dir = tmp_path_factory.mktemp("searched") / "run"
    shutil.copytree(RUN, run_dir)
    write_search_log(run_dir, [SearchEntry(pass_name="chat", over="users", spec={"start": 1, "max": 8},
                                           target=0.95, thresholds={"ttft_ms": 80.0}, done=True, reason="done")])
    out = run_dir / "report"
    written = write_report(load_run(run_dir), out)
    return written, (out / "envelope.md").read_text(encoding="utf-8"), (out / "envelope.html").read_text("utf-8")


def test_first_screen_is_paragraph_graph_summary_then_metadata(searched_report):
    written, md, _ = searched_report
    assert "envelope_graph.png" in written
    body = md.split("\n## ")
    assert body[1].startswith("Envelope\n") and body[2].startswith("Summary\n") and body[3].startswith("Run\n")
    envelope = body[1]
    first, second = re.findall(r"^\*\*(\w+)\*\*: (.*)$", envelope, re.M)[:2]
    assert first[0] == "chat" and "this server" in first[1]  # the search paragraph comes first
    assert second[0] == "open"
    assert envelope.index("**open**") < envelope.index("](envelope_graph.png)")
    assert body[2].count("\n| ") == 1 + 3  # header and one line per stage
    assert md.index("## Search: how the boundary was found") > md.index("## Run")
    assert md.index("## Run") < md.index("## Table")


def test_html_tables_scroll_in_a_container(searched_report):
    _, md, page = searched_report
    tables = page.count("<table>")
    assert tables >= 3 and page.count('<div class="scroll"><table>') == tables
    assert ".scroll{overflow-x:auto" in page


def test_a_workload_measured_at_four_user_counts_gets_its_knee_in_the_report():
    """Fixed closed-loop stages of one workload across passes: 1, 2, 4, 8, 16 users, throughput rising then flat."""
    from analysis.search import workload_knees
    from envelope.stages import StageRecord, WorkloadSummary

    tps = {1: 100.0, 2: 200.0, 4: 400.0, 8: 420.0, 16: 425.0}
    stages, rows = [], []
    for i, (users, out) in enumerate(tps.items()):
        stages.append(StageRecord(stage_index=i, stage_name=f"p{i}-{users}u", pass_name=f"p{i}", target_users=users,
                                  workload=WorkloadSummary(prompt_tokens=300, output_tokens=128)))
        rows.append(TableRow.from_cells(pass_name=f"p{i}", stage_name=f"p{i}-{users}u", stage_index=i,
                                        target_users=users, ok_requests=50, aggregate_output_tokens_per_s=out))
    # another workload at only two user counts: no knee asked of it
    stages.append(StageRecord(stage_index=9, stage_name="long-1u", pass_name="long", target_users=1,
                              workload=WorkloadSummary(prompt_tokens=3000, output_tokens=256, long_context=True)))
    rows.append(TableRow.from_cells(pass_name="long", stage_name="long-1u", stage_index=9, target_users=1,
                                    ok_requests=5, aggregate_output_tokens_per_s=90.0))
    (found,) = workload_knees(stages, rows)
    assert found.workload == "300-token prompts, 128 output tokens" and found.levels == (1, 2, 4, 8, 16)
    assert found.knee is not None and found.knee.level == 4, found.reason
    assert workload_knees(stages, rows, skip_passes=("p0", "p1")) == []  # three user counts left: too few


def test_the_cause_falls_back_to_the_lightest_passing_level_when_the_boundary_moved_too_little():
    """TPOT 20 ms at 11 users, 21 ms at 12: too small a step to name; from 4 users (13 ms) it grew 1.6x."""
    rows = [_row(0, 4, 200, 200, tps=300, ttft_p95_ms=100).replace(tpot_p50_ms=13.0),
            _row(1, 11, 200, 200, tps=700, ttft_p95_ms=100).replace(tpot_p50_ms=20.0),
            _row(2, 12, 0, 200, tps=720, ttft_p95_ms=100).replace(tpot_p50_ms=21.0)]
    finding = _finding(rows, _entry())
    assert (finding.bracket.highest_pass, finding.bracket.lowest_fail) == (11, 12)
    assert finding.cause == "decode_slowdown"
    assert finding.evidence == ("from 4 users, TTFT p50 x1.0 while TPOT p50 x1.6",)


def test_the_fallback_baseline_may_be_a_lightest_level_that_met_the_target_without_confidence():
    """4 users judged 72 of 72 good: unresolved at 0.95 (its lower bound is 0.949), yet no worse a
    baseline for what changed by 12 users (a CI run's 4-user probes came out at 36 requests each)."""
    rows = [_row(0, 4, 72, 72, tps=300, ttft_p95_ms=100).replace(tpot_p50_ms=13.0),
            _row(1, 8, 200, 200, tps=560, ttft_p95_ms=100).replace(tpot_p50_ms=17.0),
            _row(2, 11, 200, 200, tps=700, ttft_p95_ms=100).replace(tpot_p50_ms=20.0),
            _row(3, 12, 0, 200, tps=720, ttft_p95_ms=100).replace(tpot_p50_ms=21.0)]
    finding = _finding(rows, _entry())
    assert 4 in finding.bracket.unresolved
    assert finding.cause == "decode_slowdown"
    assert finding.evidence == ("from 4 users, TTFT p50 x1.0 while TPOT p50 x1.6",)
