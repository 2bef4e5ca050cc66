"""The regression gate over runs: its error rates on synthetic record sets, and ``envelope compare --gate``."""

import io
import xml.etree.ElementTree as ET

import numpy as np
import orjson
import pytest

from analysis.cli import _fraction
from analysis.gate import GateSettings, attainment_regression, check_confidence
from analysis.gate_runs import GateInputError, StageSamples, gate_runs, gate_stages
from analysis.load import load_run
from envelope.attainment import Thresholds
from envelope.cli import main as envelope_main

SEEDS = range(100)
FAST = GateSettings(resamples=2000)  # the exit codes below are the same at the default 10,000

# A realistic sweep: TTFT lognormal and wider as load grows (p95 / p50 from 1.4 to 2.3), TPOT
# lognormal around 20 ms, per-request thresholds loose enough that attainment is 99-100%.
THRESHOLDS = Thresholds(ttft_ms=2000.0, tpot_ms=50.0)
SWEEP = ((1, 200.0, 0.2), (4, 250.0, 0.3), (8, 350.0, 0.4), (16, 600.0, 0.5))  # users, TTFT median ms, sigma
# The smallest requests per stage at which a 20% TTFT shift fails the gate (10% allowed, 95% overall,
# 12 checks) in at least 95 of 100 draws: at 700 it does in about 95% of draws, at 800 in 98% (of 400).
REQUESTS_PER_STAGE = 800


def stage(rng, n, users, ttft_median_ms, sigma, *, ttft_scale=1.0, thresholds=THRESHOLDS):
    ttft = rng.lognormal(np.log(ttft_median_ms), sigma, n) * ttft_scale
    tpot = rng.lognormal(np.log(20.0), 0.15, n)
    good = int(((ttft <= thresholds.ttft_ms) & (tpot <= (thresholds.tpot_ms or np.inf))).sum())
    return StageSamples(key=f"sweep / {users} users", ttft_ms=ttft, tpot_ms=tpot, requests=n, good_requests=good,
                        thresholds=thresholds)


def sweep_gate(seed, *, ttft_scale=1.0, n=REQUESTS_PER_STAGE):
    rng = np.random.default_rng(seed)
    pairs = [(stage(rng, n, *s), stage(rng, n, *s, ttft_scale=ttft_scale)) for s in SWEEP]
    return gate_stages(pairs, settings=FAST)


def test_same_distribution_passes_the_gate_in_at_least_95_of_100_draws():
    assert sum(sweep_gate(seed).exit_code == 0 for seed in SEEDS) >= 95


def test_ttft_twenty_percent_slower_fails_the_gate_in_at_least_95_of_100_draws():
    assert sum(sweep_gate(1000 + seed, ttft_scale=1.2).exit_code == 1 for seed in SEEDS) >= 95


def test_every_judged_check_of_a_sweep_shares_the_confidence():
    result = sweep_gate(0)

    assert result.family == 12 and len(result.checks) == 12
    level = check_confidence(0.95, 12)
    assert level == pytest.approx(1 - 0.05 / 12)
    assert all(c.confidence == level for c in result.checks)
    assert "the 12 judged latency and attainment checks share 95% confidence (Bonferroni)" in result.markdown()


def test_sharing_the_confidence_keeps_false_alarms_at_5_percent_where_judging_alone_does_not():
    # Four stages whose attainment (90%) is the same in both runs: the default allowed drop is 0, so every
    # check sits exactly at its limit. Judged alone at 95%, some check fails in about 10% of draws;
    # sharing the 95% over the four keeps the gate's false alarms near 2.5% (at most 5%).
    tight = Thresholds(ttft_ms=500.0)
    draws = 200
    shared = alone = 0
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        pairs = [tuple(StageSamples(key=f"sweep / {users} users", ttft_ms=np.empty(0), tpot_ms=np.empty(0),
                                    requests=300, good_requests=int(rng.binomial(300, 0.9)), thresholds=tight)
                       for _ in range(2)) for users in (1, 2, 4, 8)]
        shared += gate_stages(pairs, settings=FAST).exit_code
        alone += any(attainment_regression(b.good_requests, b.requests, n.good_requests, n.requests, settings=FAST,
                                           key="k").regressed for b, n in pairs)
    assert shared <= 0.05 * draws
    assert alone > 0.05 * draws


def test_stages_without_enough_data_or_with_different_thresholds_are_not_judged_and_not_counted():
    rng = np.random.default_rng(1)
    base = stage(rng, 300, *SWEEP[0])
    other = StageSamples(key=base.key, ttft_ms=base.ttft_ms[:15], tpot_ms=base.tpot_ms, requests=300,
                         good_requests=300, thresholds=Thresholds(ttft_ms=1000.0))

    result = gate_stages([(base, other)], settings=FAST)

    by_metric = {c.metric: c for c in result.checks}
    assert not by_metric["ttft_p95_ms"].judged and "15 new samples" in by_metric["ttft_p95_ms"].reason
    assert by_metric["tpot_p95_ms"].judged
    assert not by_metric["attainment"].judged and "thresholds differ" in by_metric["attainment"].reason
    assert result.family == 1 and by_metric["tpot_p95_ms"].confidence == pytest.approx(0.95)


# ---- run directories and the command line ----

def write_sweep(builders, root, *, seed, ttft_scale=1.0, users=(2, 8), scenario="chat", sha="a" * 64,
                status="complete", n=120, pass_name="sweep"):
    """A run of one stage per entry of ``users`` (60 s each), ``n`` requests a stage in its steady window."""
    make_stage, make_record, write_run = builders
    rng = np.random.default_rng(seed)
    stages, recs = [], []
    for i, u in enumerate(users):
        st = make_stage(i, u, 1000.0 + 60 * i, 1060.0 + 60 * i, pass_name=pass_name,
                        slos={"ttft_p95_ms": 2000, "ttft_ms": 1000, "error_rate_max": 0.01})
        stages.append(st)
        starts = np.linspace(st["start_unix_s"] + 20.0, st["end_unix_s"] - 1.0, n)
        for t0, ttft_s, gap_s in zip(starts, rng.lognormal(np.log(0.2), 0.1, n) * ttft_scale,
                                     rng.lognormal(np.log(0.02), 0.1, n)):
            recs.append(make_record(st, float(t0), float(ttft_s), gap_s=float(gap_s)))
    write_run(root, stages=stages, records=recs)
    info = orjson.loads((root / "run.json").read_bytes())
    info.update(status=status, scenario_path=f"scenarios/{scenario}.yaml", scenario_sha256=sha)
    (root / "run.json").write_bytes(orjson.dumps(info))
    (root / "scenario.yaml").write_text(f"name: {scenario}\n")
    return root


def compare(*argv):
    out, err = io.StringIO(), io.StringIO()
    rc = envelope_main(["compare", *map(str, argv)], out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def test_gate_passes_two_runs_of_the_same_server(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2)

    rc, out, err = compare(base, new, "--gate", "--out", tmp_path / "cmp")

    assert rc == 0, err
    assert out.startswith("# Regression gate: BASE = base, NEW = new\n\n**Gate: pass**")
    assert (tmp_path / "cmp" / "gate.md").read_text() == out
    assert (tmp_path / "cmp" / "compare.md").is_file()
    assert err.splitlines() == [f"envelope: gate pass; wrote {tmp_path / 'cmp' / 'gate.md'}"]
    assert "| sweep / 8 users: TTFT p95 |" in out and "| sweep / 2 users: attainment |" in out


def test_gate_fails_a_slower_run_and_writes_junit(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, ttft_scale=1.5)
    junit = tmp_path / "gate.xml"

    rc, out, err = compare(base, new, "--gate", "--junit", junit)

    assert rc == 1, err
    assert "**Gate: FAIL**" in out
    root = ET.fromstring(junit.read_text())
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert int(root.get("failures")) == len(failed) >= 2
    assert set(failed) >= {"sweep / 2 users: TTFT p95", "sweep / 8 users: TTFT p95"}
    assert int(root.get("tests")) == 6  # two stages: TTFT, TPOT and attainment each
    assert (new / "report" / "compare" / "gate.md").is_file()


def test_allowances_are_honoured(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, ttft_scale=1.5)

    rc, out, err = compare(base, new, "--gate", "--max-ttft-regression", "100%", "--max-attainment-drop", "0.5",
                           "--confidence", "99%")

    assert rc == 0, err
    assert "allowed +100.0%" in out


def test_different_scenarios_are_unusable_input_in_one_line(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, scenario="other")

    rc, out, err = compare(base, new, "--gate")

    assert rc == 2 and out == ""
    assert err.splitlines() == ["envelope: runs of different scenarios: BASE base ran 'chat', NEW new ran 'other'; "
                                "gate runs of the same scenario"]
    assert not (new / "report").exists()


def test_an_edited_scenario_of_the_same_name_is_gated_and_said(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, sha="b" * 64)

    rc, out, _ = compare(base, new, "--gate")

    assert rc == 0
    assert "The scenario chat was edited between the runs (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb)" in out


def test_a_failed_run_is_unusable_input(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, status="failed")

    rc, out, err = compare(base, new, "--gate")

    assert rc == 2 and out == ""
    assert err.splitlines() == ["envelope: NEW run new failed; a failed run cannot be gated"]


def test_a_run_without_records_is_unusable_input(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, n=0)

    rc, _, err = compare(base, new, "--gate")

    assert rc == 2
    assert err.splitlines() == ["envelope: NEW run new has no request records; nothing to gate on"]


def test_runs_without_a_stage_in_common_are_unusable_input(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, pass_name="other")

    with pytest.raises(GateInputError, match="no stage in common"):
        gate_runs(load_run(base), load_run(new), settings=FAST)
    rc, _, err = compare(base, new, "--gate")
    assert rc == 2 and len(err.splitlines()) == 1


def test_a_partial_run_is_judged_on_the_stages_it_has(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1)
    new = write_sweep(builders, tmp_path / "new", seed=2, users=(2,), status="partial", ttft_scale=1.5)

    result = gate_runs(load_run(base), load_run(new), settings=FAST)

    assert result.exit_code == 1
    assert {c.key.split(":")[0] for c in result.checks} == {"sweep / 2 users"}
    text = result.markdown()
    assert "NEW is a partial run" in text and "only the stages it has are judged" in text
    assert "Only in BASE, so not judged: sweep / 8 users." in text


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.1", 0.10), ("0.10", 0.10), ("150%", 1.5),
                                             (" 2.5% ", 0.025), ("0", 0.0), ("1", 1.0)])
def test_percentages_are_read_as_fractions(text, value):
    assert _fraction(text) == pytest.approx(value)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max-ttft-regression", "abc", "expected a percentage such as 10% or a fraction such as 0.10, got 'abc'"),
    ("--max-tpot-regression", "-5%", "expected a percentage of 0% or more, got '-5%'"),
    ("--max-ttft-regression", "10", "'10' is ambiguous: write 10% for 10 percent"),
    ("--max-attainment-drop", "nan", "expected a percentage of 0% or more"),
    ("--confidence", "40%", "expected a level between 50% and 100%"),
    ("--confidence", "1", "expected a level between 50% and 100%"),
])
def test_bad_gate_values_are_one_line_and_exit_2(builders, tmp_path, flag, value, says):
    base = write_sweep(builders, tmp_path / "base", seed=1, n=5)

    rc, out, err = compare(base, base, "--gate", f"{flag}={value}")

    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"envelope: argument {flag}: ") and says in err


def test_gate_flags_without_gate_are_refused(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1, n=5)

    rc, out, err = compare(base, base, "--junit", tmp_path / "x.xml", "--confidence", "0.9")

    assert rc == 2 and out == ""
    assert err.splitlines() == ["envelope: --junit, --confidence only make sense with --gate"]
    assert not (tmp_path / "x.xml").exists()


def test_compare_without_gate_is_unchanged(builders, tmp_path):
    base = write_sweep(builders, tmp_path / "base", seed=1, n=50)
    new = write_sweep(builders, tmp_path / "new", seed=2, n=50, scenario="other")

    rc, out, err = compare(base, new)

    assert rc == 0 and out == ""
    assert err.splitlines()[-1] == f"envelope: wrote {new / 'report' / 'compare' / 'compare.md'}"
    assert not (new / "report" / "compare" / "gate.md").exists()
