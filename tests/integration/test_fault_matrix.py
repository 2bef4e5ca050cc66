"""Server faults, injected by the simulated server, through our real locustfile and the analysis.

One headless Locust run (2 then 4 users, 6 s each) against the simulator with every fault kind
armed at once, each a fixed number of times, early in the run. The faults land on different
error categories, so their counts stay apart. The simulator counts what it injected; each
fault must come back as exactly that many failed requests of its own category in the records,
in Locust's failures CSV and in the analysis report, and the run must go on succeeding.

The simulator's ``refuse`` accepts a connection and resets it at once, before reading the
request: the client sees ``connection_closed``. A port nobody listens on (``connect_error``)
is covered by tests/integration/test_server_death.py, where the server is killed mid-run.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.cli import main as analysis_main
from analysis.load import load_run
from envelope.records import ErrorCategory
from helpers.locust_runs import locust_request_count, records, run_locust
from server.sim import FaultSpec, SimConfig, SimServer

pytestmark = [pytest.mark.slow]

FIRST_TOKEN_TIMEOUT_S = 2.0
TOTAL_TIMEOUT_S = 4.0

SCENARIO = f"""
name: faults
seed: 0
defaults:
  client: fasthttp
  endpoint: chat
  timeouts: {{connect_s: 5, first_token_s: {FIRST_TOKEN_TIMEOUT_S}, total_s: {TOTAL_TIMEOUT_S}}}
  workload: {{prompt_tokens: 32, output_tokens: 8, fixed_output: true}}
  slos: {{ttft_p95_ms: 2000, error_rate_max: 0.5}}
passes:
  - name: faults
    stages:
      - {{users: 2, spawn_rate: 10, duration_s: 6}}
      - {{users: 4, spawn_rate: 10, duration_s: 6}}
"""

# (spec, category the client must record). A spec fires on every Nth request it is asked about
# (the first spec that fires wins), at most `count` times. 401/404 come late, after successes,
# since a 401/404 on the very first requests is meant to stop a run early.
F = FaultSpec
FAULTS: tuple[tuple[FaultSpec, str], ...] = (
    (F(kind="refuse", every_nth=3, count=2), ErrorCategory.CONNECTION_CLOSED),  # closed at accept
    (F(kind="http_500", every_nth=5, count=3), ErrorCategory.HTTP_500),
    (F(kind="http_503", every_nth=6, count=3), ErrorCategory.HTTP_503),
    (F(kind="http_429", every_nth=7, count=2, retry_after_s=1), ErrorCategory.HTTP_429),
    (F(kind="http_429", every_nth=8, count=2), ErrorCategory.HTTP_429),  # no Retry-After
    (F(kind="reset", every_nth=4, count=3, after_chunks=2), ErrorCategory.CONNECTION_RESET),
    (F(kind="stall", every_nth=9, count=2, after_chunks=0, stall_s=3 * FIRST_TOKEN_TIMEOUT_S),
     ErrorCategory.TIMEOUT_FIRST_TOKEN),
    (F(kind="stall", every_nth=10, count=2, after_chunks=2, stall_s=2.5 * TOTAL_TIMEOUT_S),
     ErrorCategory.TIMEOUT_TOTAL),
    (F(kind="malformed", every_nth=3, count=3, after_chunks=1), ErrorCategory.MALFORMED_SSE),
    (F(kind="no_done", every_nth=4, count=3), ErrorCategory.INCOMPLETE_STREAM),
    (F(kind="no_usage", every_nth=5, count=3), ErrorCategory.MISSING_USAGE),
    (F(kind="error_event", every_nth=6, count=3, after_chunks=2), ErrorCategory.STREAM_ERROR_EVENT),
    (F(kind="http_401", every_nth=25, count=1), ErrorCategory.HTTP_401),
    (F(kind="http_404", every_nth=30, count=1), ErrorCategory.HTTP_404),
)
CATEGORIES = sorted({cat for _, cat in FAULTS})


@dataclass(frozen=True)
class FaultRun:
    run_dir: Path
    returncode: int
    stderr: str
    injected: dict[str, int]  # kind -> count, as the simulator counted
    truth: list[dict]  # the simulator's record of every completion request
    records: list[dict]
    summary: str  # what `python -m analysis` printed

    def injected_as(self, category: str) -> int:
        """How many requests the simulator spoiled in a way that should read as ``category``."""
        if category == ErrorCategory.TIMEOUT_FIRST_TOKEN:
            return sum(1 for t in self.truth if t["fault"] == "stall" and t["chunks_sent"] == 0)
        if category == ErrorCategory.TIMEOUT_TOTAL:
            return sum(1 for t in self.truth if t["fault"] == "stall" and t["chunks_sent"] > 0)
        kinds = {spec.kind for spec, cat in FAULTS if cat == category}
        return sum(self.injected.get(k, 0) for k in kinds)


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory) -> FaultRun:
    root = tmp_path_factory.mktemp("faults")
    scenario = root / "faults.yaml"
    scenario.write_text(SCENARIO)
    # multi-token chunks too, so the token-count audit has something to find
    config = SimConfig(ttft_s=0.005, itl_s=0.005, multi_token_chunk_probability=0.25, multi_token_chunk_tokens=3,
                       faults=tuple(spec for spec, _ in FAULTS))
    server = SimServer(config)
    url = server.start_in_thread()
    try:
        proc = run_locust(url, None, scenario, root / "run", timeout_s=180)
    finally:
        server.stop()  # also ends the stalled requests, so the truth log is complete
    run_dir = root / "run"
    if not (run_dir / "records").is_dir():
        pytest.fail(f"the Locust run wrote no records (exit {proc.returncode}): {proc.stderr[-3000:]}", pytrace=False)
    out, err = io.StringIO(), io.StringIO()
    assert analysis_main([str(run_dir)], out=out, err=err) == 0, err.getvalue()
    return FaultRun(run_dir=run_dir, returncode=proc.returncode, stderr=proc.stderr,
                    injected=server.app.faults.counts(), truth=list(server.app.truth.records),
                    records=records(run_dir), summary=out.getvalue())


def _report_failure_rows(run_dir: Path) -> dict[str, tuple[int, str]]:
    """The report's "Failed requests by category" table: category -> (requests, Locust failures)."""
    md = (run_dir / "report" / "envelope.md").read_text()
    section = md.split("## Failed requests by category", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in re.finditer(r"^\| ([a-z_0-9 ]+) \| ([\d,]+) \| ([\d,-]+) \|", section, flags=re.M):
        rows[m.group(1)] = (int(m.group(2).replace(",", "")), m.group(3))
    return rows


def _locust_failures(run_dir: Path) -> Counter:
    out: Counter = Counter()
    with open(run_dir / "locust" / "locust_failures.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Method"] == "E2E":
                m = re.match(r"""^\w+\(['"]([a-z0-9_]+)""", row["Error"])
                out[m.group(1) if m else row["Error"]] += int(row["Occurrences"])
    return out


def test_every_fault_fired_as_configured(fault_run):
    configured = Counter()
    for spec, _ in FAULTS:
        configured[spec.kind] += spec.count
    assert fault_run.injected == dict(configured), "the run was too short for every fault to fire"


def test_every_request_is_accounted_for(fault_run):
    recs = fault_run.records
    assert len(recs) == locust_request_count(fault_run.run_dir)
    cats = Counter(r["error_category"] for r in recs)
    assert cats[None] > 100
    known = {v for k, v in vars(ErrorCategory).items() if k.isupper()}
    assert set(cats) - {None} <= known
    # nothing failed except what was injected (no client_error, no stray timeouts)
    assert set(cats) - {None, ErrorCategory.CANCELLED} == set(CATEGORIES)
    assert fault_run.returncode in (0, 1), fault_run.stderr[-2000:]  # 1: Locust saw failures


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_fault_is_a_failed_request_of_its_own_category(fault_run, category):
    expected = fault_run.injected_as(category)
    assert expected >= 1
    in_records = sum(1 for r in fault_run.records if r["error_category"] == category)
    assert in_records == expected
    assert _locust_failures(fault_run.run_dir)[category] == expected
    requests, locust = _report_failure_rows(fault_run.run_dir)[category]
    assert (requests, locust) == (expected, str(expected))


def test_missing_usage_is_a_failed_request_of_its_own_category(fault_run):
    # no_usage fires from the 5th request on, after this process got usage from the server, so the
    # client expects usage (see locustfiles.users.send_one) and a stream without it fails
    expected = fault_run.injected_as(ErrorCategory.MISSING_USAGE)
    assert expected == 3
    assert sum(1 for r in fault_run.records if r["error_category"] == ErrorCategory.MISSING_USAGE) == expected
    assert _report_failure_rows(fault_run.run_dir)[ErrorCategory.MISSING_USAGE][0] == expected


def test_report_totals_match_the_records(fault_run):
    rows = _report_failure_rows(fault_run.run_dir)
    failed = [r for r in fault_run.records if r["error_category"] not in (None, ErrorCategory.CANCELLED)]
    assert rows["all failures"] == (len(failed), f"{len(failed):,}")
    with open(fault_run.run_dir / "report" / "failures.csv", newline="") as fh:
        per_stage = Counter()
        for row in csv.DictReader(fh):
            per_stage[row["category"]] += int(row["requests"])
    assert per_stage == Counter(r["error_category"] for r in fault_run.records if r["error_category"])
    assert "Locust's failures CSV (E2E entries) counts the same failures, category by category." in (
        fault_run.run_dir / "report" / "envelope.md").read_text()


def test_the_run_goes_on_after_every_fault(fault_run):
    recs = sorted(fault_run.records, key=lambda r: r["wall_start_unix_s"])
    ok_starts = [r["wall_start_unix_s"] for r in recs if r["error_category"] is None]
    for category in CATEGORIES:
        failed = [r for r in recs if r["error_category"] == category]
        if not failed:
            continue
        last_end = max(r["wall_start_unix_s"] + (r["t_done_s"] - r["t_start_s"]) for r in failed)
        assert any(t > last_end for t in ok_starts), f"nothing succeeded after the last {category}"
    assert {r["stage_name"] for r in recs if r["error_category"] is None} == {"faults-2u", "faults-4u"}
    assert all(r["error_category"] in (None, ErrorCategory.CANCELLED) for r in recs[-10:])
    # the server never stopped answering, so no stage is left out of the envelope
    assert "stopped answering" not in (fault_run.run_dir / "report" / "envelope.md").read_text()


def test_token_audit_finds_the_simulators_multi_token_chunks(fault_run):
    """Per-chunk token counts in the report's audit equal what the simulator sent to the clean requests."""
    clean = [t for t in fault_run.truth if t["fault"] is None and t["outcome"] == "ok"]
    audit = load_run(fault_run.run_dir).token_audit
    ok = [r for r in fault_run.records if r["error_category"] is None]
    assert audit.requests == len(ok)
    if any(r["error_category"] == ErrorCategory.CANCELLED for r in fault_run.records):
        pytest.skip("a request was cancelled at the end: the simulator's clean set differs by it")
    # every clean request succeeded with usage, and nothing else did
    assert audit.output.requests == len(clean)
    assert audit.output.server_tokens == sum(t["tokens_sent"] for t in clean) == 8 * len(clean)
    assert audit.output.client_tokens == sum(t["chunks_sent"] for t in clean)
    assert audit.multi_token_chunks == sum(1 for t in clean for k in t["chunk_tokens"] if k > 1) > 0
    assert audit.output.server_more == sum(1 for t in clean if max(t["chunk_tokens"]) > 1)
    assert audit.prompt.equal == audit.prompt.requests == len(clean)
    md = (fault_run.run_dir / "report" / "envelope.md").read_text()
    assert f"{audit.multi_token_chunks:,} chunks carried more than one token" in md


def test_a_run_with_failed_requests_that_ran_its_schedule_is_complete(fault_run):
    import json

    info = json.loads((fault_run.run_dir / "run.json").read_text())
    assert info["status"] == "complete"
    assert "PARTIAL" not in fault_run.summary
