import csv
import io

import matplotlib.image

from analysis.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sweep(builders, root, *, with_stages=True, telemetry=True):
    make_stage, make_record, write_run = builders
    stages = [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 4, 1030.0, 1060.0)]
    recs = []
    for i in range(20):  # stage 0: TTFT 0.1 s
        recs.append(make_record(stages[0], 1006.0 + i, 0.1))
    for i in range(40):  # stage 1: TTFT 2.5 s (over the 2 s SLO), TPOT flat
        recs.append(make_record(stages[1], 1040.0 + i * 0.4, 2.5))
    metrics = [{"t_unix_s": 1000.0 + t, "ok": True, "requests_running": 1, "requests_waiting": 0 if t < 30 else 3,
                "kv_cache_usage_ratio": 0.2, "preemptions_total": 0, "generation_tokens_total": 10 * t}
               for t in range(0, 61, 2)]
    return write_run(root, stages=stages if with_stages else None, records=recs,
                     metrics=metrics if telemetry else None)


def test_cli_writes_report(builders, tmp_path):
    run_dir = _sweep(builders, tmp_path / "run1")
    err = io.StringIO()
    assert main([str(run_dir)], err=err) == 0
    report = run_dir / "report"
    for name in ("throughput_vs_concurrency.png", "ttft_vs_concurrency.png", "timeline.png",
                 "ttft_distribution.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(report / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
    with open(report / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert sum(int(r["stage_output_tokens"]) for r in rows) == 60 * 11  # every record's tokens
    # telemetry in the half-open windows [1006, 1030) and [1039, 1060): waiting 0 then 3;
    # generation_tokens_total grows 10 tokens/s
    assert [float(r["server_requests_waiting_max"]) for r in rows] == [0.0, 3.0]
    assert [float(r["server_output_tokens_per_s"]) for r in rows] == [10.0, 10.0]
    md = (report / "envelope.md").read_text()
    assert "Safe up to 1 concurrent user" in md and "At 4 users p95 TTFT rose to 2.5 s" in md
    assert "because requests queued in the server" in md
    assert "percentiles are exact" in md.lower()
    html = (report / "envelope.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<img" in html


def test_missing_parts_are_listed(builders, tmp_path):
    run_dir = _sweep(builders, tmp_path / "run2", with_stages=False, telemetry=False)
    assert main([str(run_dir), "--out", str(tmp_path / "out")], err=io.StringIO()) == 0
    md = (tmp_path / "out" / "envelope.md").read_text()
    missing = md.split("## Missing", 1)[1]
    assert "stages.json: absent" in missing
    assert "telemetry/metrics.jsonl: absent" in missing
    with open(tmp_path / "out" / "table.csv", newline="") as fh:
        assert sum(int(r["stage_output_tokens"]) for r in csv.DictReader(fh)) == 660


def test_bad_run_dir_exit_2_one_line(tmp_path):
    err = io.StringIO()
    (tmp_path / "x").mkdir()
    assert main([str(tmp_path / "x")], err=err) == 2
    lines = err.getvalue().splitlines()
    assert lines[-1] == f"analysis: {tmp_path / 'x'}: not a run directory (no records/ and no stages.json)"
    assert "Traceback" not in err.getvalue()


def test_compare(builders, tmp_path):
    a = _sweep(builders, tmp_path / "a")
    b = _sweep(builders, tmp_path / "b")
    assert main(["--compare", str(a), str(b)], err=io.StringIO()) == 0
    out = b / "report" / "compare"
    assert (out / "compare.png").read_bytes()[:8] == PNG_SIGNATURE
    text = (out / "compare.md").read_text()
    assert "| sweep | 4 users |" in text and "+0.0%" in text


def test_malformed_records_one_line(tmp_path):
    (tmp_path / "r" / "records").mkdir(parents=True)
    (tmp_path / "r" / "records" / "a.jsonl").write_text('{"stage_index": "x", "wall_start_unix_s": "abc"}\n')
    err = io.StringIO()
    assert main([str(tmp_path / "r")], err=err) == 2
    assert err.getvalue().splitlines()[-1].startswith("analysis: unusable input:")


def test_argument_errors_are_one_line():
    for argv, line in (([], "analysis: give RUN_DIR or --compare RUN_A RUN_B"),
                       (["--colour"], "analysis: unrecognized arguments: --colour (see: python -m analysis --help)"),
                       (["--compare", "a"], "analysis: argument --compare: expected 2 arguments "
                                            "(see: python -m analysis --help)")):
        err = io.StringIO()
        assert main(argv, err=err) == 2
        assert err.getvalue() == line + "\n"


def _report_parser():
    from analysis.cli import add_report_arguments
    from envelope.usage import OneLineParser

    p = OneLineParser(prog="envelope report")
    add_report_arguments(p)
    return p


def test_report_cost_flags_reach_the_report(builders, tmp_path):
    import json

    from analysis.cli import run_report
    from envelope.usage import parse_or_say

    run_dir = _sweep(builders, tmp_path / "priced")
    args = parse_or_say(_report_parser(), [str(run_dir), "--usd-per-hour", "3.6", "--power-w", "350",
                                           "--target-users", "25", "--target-rate", "4"], prefix="envelope: ")
    assert (args.usd_per_hour, args.power_w, args.target_users, args.target_rate_per_s) == (3.6, 350.0, 25.0, 4.0)
    assert run_report(args, out=io.StringIO(), err=io.StringIO()) == 0
    doc = json.loads((run_dir / "report" / "envelope.json").read_text())
    assert doc["price"] == {"usd_per_hour": 3.6, "source": "--usd-per-hour", "stated_power_w": 350.0,
                            "stated_power_source": "--power-w"}
    (sweep,) = doc["passes"]
    # safe up to 1 user; target 25 users -> 25 boxes at $3.60/h x 730 h = $65,700 a month
    assert sweep["plan"]["boxes"] == 25 and sweep["plan"]["target_source"] == "--target-users 25"
    assert sweep["plan"]["usd_per_month"] == 25 * 3.6 * 730
    md = (run_dir / "report" / "envelope.md").read_text()
    assert "To serve 25 concurrent users at these SLOs you need 25 boxes" in md


def test_report_without_cost_flags_has_no_price(builders, tmp_path):
    import json

    from analysis.cli import run_report
    from envelope.usage import parse_or_say

    run_dir = _sweep(builders, tmp_path / "unpriced")
    args = parse_or_say(_report_parser(), [str(run_dir)], prefix="envelope: ")
    assert args.usd_per_hour is None and args.target_rate_per_s is None
    assert run_report(args, out=io.StringIO(), err=io.StringIO()) == 0
    assert json.loads((run_dir / "report" / "envelope.json").read_text())["price"] is None


def test_bad_cost_flags_are_one_line_usage_errors():
    from envelope.usage import parse_or_say

    for argv, line in (
        (["r", "--usd-per-hour", "0"],
         "envelope: argument --usd-per-hour: must be a positive number, got '0' (see: envelope report --help)"),
        (["r", "--power-w", "-5"],
         "envelope: argument --power-w: must be a positive number, got '-5' (see: envelope report --help)"),
        (["r", "--target-users", "inf"],
         "envelope: argument --target-users: must be a positive number, got 'inf' (see: envelope report --help)"),
        (["r", "--target-rate", "lots"],
         "envelope: argument --target-rate: not a number: 'lots' (see: envelope report --help)"),
        (["r", "--usd-per-hour", "nan"],
         "envelope: argument --usd-per-hour: must be a positive number, got 'nan' (see: envelope report --help)"),
    ):
        err = io.StringIO()
        assert parse_or_say(_report_parser(), argv, prefix="envelope: ", err=err) is None  # the caller exits 2
        assert err.getvalue() == line + "\n"
