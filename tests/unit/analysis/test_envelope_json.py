"""report/envelope.json: strict JSON, versioned, one object per table row and per pass, cost only with a price."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.cost import Price
from analysis.envelope_json import SCHEMA_VERSION, EnvelopeDocument, to_json, write_envelope_json

RUN = Path(__file__).resolve().parents[2] / "fixtures" / "golden_run"


def _strict(text: str) -> dict:
    """json.loads that refuses NaN and Infinity (JSON has neither)."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The golden run's report twice: without a price, and at $2.50/h with a rate target."""
    from analysis.load import load_run
    from analysis.report import write_report
    from analysis.table import envelope_table

    run_dir = tmp_path_factory.mktemp("json") / "golden_run"
    shutil.copytree(RUN, run_dir)
    run = load_run(run_dir)
    rows = envelope_table(run)
    plain, priced = run_dir / "report", run_dir / "priced"
    written = write_report(run, plain, rows=rows)
    write_report(run, priced, rows=rows, price=Price(usd_per_hour=2.5, source="--usd-per-hour"),
                 target_rate_per_s=20.0)
    return written, _strict((plain / "envelope.json").read_text("utf-8")), \
        _strict((priced / "envelope.json").read_text("utf-8")), plain


def test_written_every_time_as_strict_json(golden):
    written, doc, _, plain = golden
    assert written["envelope.json"] == plain / "envelope.json"
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert list(doc) == ["schema_version", "run", "price", "stages", "passes", "notes"]


def test_run_identity(golden):
    _, doc, _, _ = golden
    run = doc["run"]
    assert run["run_id"] == "20261203-093834-golden"
    assert run["status"] == "complete" and run["complete"] is True and run["partial_reasons"] == []
    assert run["scenario_name"] == "golden" and run["scenario_path"] == "golden.yaml"
    assert run["scenario_sha256"] == "0f6381f36e03324a56a7e62c5971104b42095bb57b0db9cd5e46d73d2f81e478"
    assert run["model"] == "sim-model" and run["engine_version"] == "0.32.0+envelope.sim"
    assert run["server_launched"] is False and run["quick"] is False
    assert any("gpu.jsonl" in m for m in run["missing"])


def test_one_stage_per_table_row_with_units(golden):
    _, doc, _, plain = golden
    with open(plain / "table.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(doc["stages"]) == len(table) == 3
    for stage, cells in zip(doc["stages"], table):
        assert stage["stage_name"] == cells["stage_name"]
        assert stage["requests"] == int(cells["requests"])
        assert stage["ttft_p95_ms"] == pytest.approx(float(cells["ttft_p95_ms"]))
        assert stage["output_tokens_per_s"] == pytest.approx(float(cells["aggregate_output_tokens_per_s"]))
        assert stage["ok_requests_per_s"] == pytest.approx(int(cells["ok_requests"]) / float(cells["window_s"]))
        assert stage["slos"] and {"key", "op", "threshold", "measured", "passed", "note"} == set(stage["slos"][0])
        assert stage["cost"] is None and stage["energy"] is None  # no price, no GPU
    first, _, open_stage = doc["stages"]
    assert (first["level"], first["unit"], first["kind"]) == (1.0, "users", "users")
    assert (open_stage["level"], open_stage["unit"], open_stage["kind"]) == (8.0, "requests/s", "rate")
    att = open_stage["attainment"]
    assert att["low_ratio"] <= att["ratio"] <= att["high_ratio"] and att["confidence_ratio"] == 0.95
    # the open-loop stage sent 11% fewer requests than asked: flagged, with the reason
    assert open_stage["trust"]["trustworthy"] is False
    assert any("11% short" in r for r in open_stage["trust"]["reasons"])


def test_passes_carry_their_boundary(golden):
    _, doc, _, _ = golden
    by = {p["pass_name"]: p for p in doc["passes"]}
    assert set(by) == {"chat", "open"}
    chat, open_ = by["chat"], by["open"]
    assert chat["passed_level"] is None and chat["failed_level"] == 1.0 and chat["broke_first"] == "error rate"
    assert chat["plan"] is None and chat["plan_reason"] == "no boundary: no level met the SLOs"
    assert open_["passed_level"] == 8.0 and open_["unit"] == "requests/s" and open_["status"] == "all_pass"
    assert open_["safe_stage"]["stage_name"] == "open-8rps" and open_["safe_stage"]["attainment"]["ratio"] > 0.9
    assert open_["fail_stage"] is None
    assert open_["sentence"]


def test_no_price_no_cost(golden):
    _, doc, _, _ = golden
    assert doc["price"] is None
    by = {p["pass_name"]: p for p in doc["passes"]}
    assert by["open"]["cost_at_boundary"] is None and by["open"]["plan"] is None
    assert by["open"]["plan_reason"] == "no price"


def test_with_a_price_costs_and_plan(golden):
    _, _, doc, _ = golden
    assert doc["price"] == {"usd_per_hour": 2.5, "source": "--usd-per-hour", "stated_power_w": None,
                            "stated_power_source": None}
    for stage in doc["stages"]:
        c = stage["cost"]
        # $2.50/h / 3600 / tok/s x 1e6, and / req/s
        assert c["usd_per_million_output_tokens"] == pytest.approx(2.5 / 3600 / stage["output_tokens_per_s"] * 1e6)
        assert c["usd_per_request"] == pytest.approx(2.5 / 3600 / stage["ok_requests_per_s"])
        assert "$2.50/h / 3600 s/h" in c["formula"]
    open_ = {p["pass_name"]: p for p in doc["passes"]}["open"]
    plan = open_["plan"]
    # target 20 requests/s at 8 requests/s per box: ceil(2.5) = 3 boxes, (24 - 20) / 20 = 20% headroom,
    # 3 x $2.50 x 730 h = $5,475 a month
    assert (plan["boxes"], plan["target"], plan["per_box"], plan["unit"]) == (3, 20.0, 8.0, "requests/s")
    assert plan["headroom_ratio"] == pytest.approx(0.2) and plan["usd_per_month"] == pytest.approx(5475.0)
    assert plan["target_source"] == "--target-rate 20" and plan["hours_per_month"] == 730.0
    assert "boxes = ceil(20 requests/s / 8 requests/s per box) = 3" in plan["formula"]
    assert open_["cost_at_boundary"] == doc["stages"][2]["cost"]
    assert open_["plan_reason"] is None


def test_nan_and_infinity_become_null_and_numpy_numbers_plain():
    @dataclasses.dataclass(frozen=True)
    class Cells:
        a_ms: float
        b_ms: float
        n: object
        flag: object
        nested: tuple

    doc = Cells(a_ms=float("nan"), b_ms=float("inf"), n=np.int64(3), flag=np.bool_(True),
                nested=(np.float64("nan"), 1.5))
    got = to_json(doc)  # type: ignore[arg-type]
    assert got == {"a_ms": None, "b_ms": None, "n": 3, "flag": True, "nested": [None, 1.5]}
    assert type(got["n"]) is int and type(got["flag"]) is bool


def test_writer_takes_a_sink(golden):
    from analysis.envelope_json import RunIdentity

    ident = RunIdentity(run_id="r", status=None, complete=False, partial_reasons=(), scenario_name=None,
                        scenario_path=None, scenario_sha256=None, started_unix_s=float("nan"), ended_unix_s=None,
                        quick=None, duration_scale=None, profile=None, model=None, served_model_name=None,
                        engine_version=None, server_launched=None, missing=())
    sink = io.StringIO()
    write_envelope_json(EnvelopeDocument(schema_version=SCHEMA_VERSION, run=ident, price=None, stages=(),
                                         passes=(), notes=()), sink)
    assert sink.getvalue().endswith("}\n")
    assert _strict(sink.getvalue())["run"]["started_unix_s"] is None


def test_known_run_from_builders(known_run):
    from analysis.load import load_run
    from analysis.report import write_report

    out = known_run / "report"
    write_report(load_run(known_run), out, price=Price(usd_per_hour=3.6, source="--usd-per-hour"))
    doc = _strict((out / "envelope.json").read_text("utf-8"))
    (stage,) = doc["stages"]
    # window [1007, 1060] (2 s ramp + 5 s settle): 4 successful requests (and one error) in 53 s
    # -> 0.07547 req/s; $3.60/h = $0.001/s, / 0.07547 = $0.01325 per request
    assert (stage["window_start_s"], stage["window_end_s"], stage["window_s"]) == (7.0, 60.0, 53.0)
    assert stage["ok_requests"] == 4 and stage["errors"] == 1
    assert stage["ok_requests_per_s"] == pytest.approx(4 / 53)
    assert stage["cost"]["usd_per_request"] == pytest.approx(0.01325)
