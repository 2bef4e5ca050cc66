"""The sweep report's ranking: the best configuration per workload, and when two cannot be told apart."""

from __future__ import annotations

import dataclasses

from analysis.sweep import SweepCell, SweepRow, _table, best_choices


def _cell(passed, failed, tps=100.0, unit="users", flagged=False):
    return SweepCell(pass_name="chat", kind="search", unit=unit, passed_level=passed, failed_level=failed,
                     status="bracketed", output_tokens_per_s=tps, usd_per_million_output_tokens=None,
                     broke_first="p95 TTFT", cause="queueing", flagged=flagged)


def _row(label, cell):
    return SweepRow(label=label, settings={}, host=None, run_dir=label, status="complete", failure=None,
                    log_tail=None, cells={} if cell is None else {"chat": cell})


def test_the_best_is_the_highest_level_that_passed_and_clear_when_every_other_failed_below_it():
    rows = [_row("seqs=4", _cell(4, 6)), _row("seqs=16", _cell(16, 18)), _row("seqs=8", _cell(8, 10))]
    (best,) = best_choices(rows, ["chat"])
    assert (best.label, best.passed_level, best.runner_up, best.clear) == ("seqs=16", 16, "seqs=8", True)
    assert best.sentence == ("chat: best is seqs=16, meeting the SLOs up to 16 users (failed at 18 users). "
                             "Every other configuration failed at or below that level.")


def test_overlapping_brackets_are_not_told_apart():
    # seqs=32 passed 16 and failed at 24; seqs=16 passed 12 but only failed at 20: either could be larger
    rows = [_row("seqs=16", _cell(12, 20)), _row("seqs=32", _cell(16, 24)), _row("seqs=4", _cell(4, 6))]
    (best,) = best_choices(rows, ["chat"])
    assert best.label == "seqs=32" and not best.clear
    assert "Not told apart from seqs=16" in best.sentence and "seqs=4" not in best.sentence.split("Not told")[1]


def test_nothing_failed_in_a_configuration_that_passed_less_means_it_was_not_pushed_far_enough():
    rows = [_row("a", _cell(8, None)), _row("b", _cell(16, None))]
    (best,) = best_choices(rows, ["chat"])
    assert best.label == "b" and not best.clear and "(no tested level failed)" in best.sentence


def test_ties_go_to_the_higher_throughput_and_a_flagged_boundary_says_so():
    rows = [_row("a", _cell(8, 12, tps=500.0)), _row("b", _cell(8, 12, tps=650.0, flagged=True))]
    (best,) = best_choices(rows, ["chat"])
    assert best.label == "b" and "NOT TRUSTWORTHY" in best.sentence


def test_no_configuration_passed_and_a_configuration_without_a_result():
    rows = [_row("a", _cell(None, 2)), _row("b", None)]
    (best,) = best_choices(rows, ["chat"])
    assert best.label is None and best.sentence == "chat: no configuration met the SLOs at any tested level."
    rows = [_row("a", _cell(4, 8)), _row("b", None)]
    (best,) = best_choices(rows, ["chat"])
    assert best.label == "a" and best.clear


def test_every_configuration_is_planned_for_one_common_target():
    from analysis.sweep import sweep_plans

    def priced(passed, failed, usd=0.10):
        return SweepCell(pass_name="chat", kind="search", unit="users", passed_level=passed, failed_level=failed,
                         status="bracketed", output_tokens_per_s=500.0, usd_per_million_output_tokens=None,
                         broke_first="p95 TTFT", cause="queueing", flagged=False, usd_per_hour=usd)

    rows = [SweepRow(label=f"seqs={n}", settings={}, host=None, run_dir=str(n), status="complete", failure=None,
                     log_tail=None, cells={"chat": priced(n, n + 1)}, price_source="--usd-per-hour")
            for n in (4, 8, 16)]
    (plan,) = sweep_plans(rows, ["chat"])
    assert (plan.target, plan.target_source) == (160.0, "default: 10x the highest boundary of the sweep")
    assert {k: (p.boxes, p.usd_per_month) for k, p in plan.plans.items()} == {
        "seqs=4": (40, 40 * 0.10 * 730), "seqs=8": (20, 20 * 0.10 * 730), "seqs=16": (10, 10 * 0.10 * 730)}
    assert plan.sentence.startswith("chat: to serve 160 concurrent users (default: 10x the highest boundary of the "
                                    "sweep), seqs=16 needs 10 boxes ($730.00 a month), seqs=8 needs 20 boxes")
    (given,) = sweep_plans(rows, ["chat"], target_users=50)
    assert given.target_source == "--target-users 50"
    assert [p.boxes for p in given.plans.values()] == [13, 7, 4]  # ceil(50 / 4), ceil(50 / 8), ceil(50 / 16)
    unpriced = [SweepRow(label="a", settings={}, host=None, run_dir="a", status="complete", failure=None,
                         log_tail=None, cells={"chat": priced(4, 5, usd=None)})]
    assert sweep_plans(unpriced, ["chat"]) == []


def test_the_boundary_column_says_what_each_end_was():
    """A search whose lowest levels were unresolved did not fail there: only fixed stages fail at the lowest."""
    stages = dataclasses.replace(_cell(None, 1), kind="stages")
    rows = [_row("vllm", _cell(4, None)), _row("plain", _cell(None, 2)), _row("cb", _cell(2, 4)),
            _row("fixed", stages)]
    cells = {r[0]: r[2] for r in _table(rows, "chat")[1:]}
    assert cells == {"vllm": "≥ 4 users (nothing failed)", "plain": "below 2 users (none passed with confidence)",
                     "cb": "2 users [failed at 4]", "fixed": "below 1 user (failed at the lowest)"}
