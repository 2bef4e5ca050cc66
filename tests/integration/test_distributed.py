"""Load generation beyond one process: a master and workers on separate hosts, and a worker lost mid-run.

The hosts are Linux network namespaces made by the test itself (tests/helpers/netns.py): the
simulated server, the master (``envelope run --expect-workers 2``) and two Locust workers each
have their own network stack and hostname, so a record can only reach the master's run
directory over the network. One worker's wall clock is set 30 s ahead (libfaketime, when it is
installed; ``make test`` installs it as root) to show that skew between hosts corrupts neither
durations nor the placement of records in stages. Where namespaces cannot be made the test is
skipped with the reason; the ``--processes`` tests elsewhere still run.

The lost-worker test needs no namespaces: a master and two workers on this host, one of them
SIGKILLed in the first stage.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.cli import main as analysis_main
from analysis.load import load_run
from analysis.table import envelope_table
from envelope.telemetry import parse_vllm_metrics
from helpers.locust_runs import LOCUSTFILE, REPO, locust_request_count, probe_tokens, records
from helpers.locust_runs import stages as read_stage_dicts
from helpers.netns import Topology, netns_unavailable_reason
from locustfiles.live import LiveAggregator

pytestmark = [pytest.mark.slow]

PY = sys.executable
SKEW_S = 30.0
SCENARIO = """\
name: dist
defaults:
  workload: {prompt_tokens: 32, output_tokens: 16}
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 20}
passes:
  - name: p
    stages:
      - {name: open, rate_per_s: 16, arrival: constant, duration_s: 4}
      - {name: closed, users: 4, spawn_rate: 100, duration_s: 4}
"""
OPEN_REQUESTS = 64  # 16/s for 4 s, constant arrivals: exactly this many, whoever sends them


def _faketime_lib() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVELOPE_", "LOCUST_"))}
    env.update(extra)
    return env


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} absent)"


def _line_counts(run_dir: Path) -> dict[str, int]:
    return {p.name: p.read_bytes().count(b"\n") for p in sorted((run_dir / "records").glob("*.jsonl"))}


def test_master_and_two_workers_on_separate_hosts(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test skipped: network namespaces unavailable here: {reason}")
    scenario = tmp_path / "dist.yaml"
    scenario.write_text(SCENARIO)
    faketime = _faketime_lib()
    skew_s = SKEW_S if faketime else 0.0
    logs = tmp_path / "logs"
    logs.mkdir()
    out = {"dist": tmp_path / "runs-dist", "single": tmp_path / "runs-single"}
    homes = {w: tmp_path / f"home-{w}" for w in ("w1", "w2")}
    with contextlib.ExitStack() as files, Topology(["srv", "master", "w1", "w2"]) as net:
        def log(name: str):
            return files.enter_context((logs / name).open("w"))

        url = f"http://{net.ip('srv')}:8000"  # a fresh namespace has its own ports: a fixed one is free
        net.popen("srv", [PY, "-m", "server.sim", "--host", net.ip("srv"), "--port", "8000", "--ttft-ms", "20",
                          "--itl-ms", "2", "--max-model-len", "4096"],
                  cwd=REPO, stdout=log("sim.log"), stderr=subprocess.STDOUT)
        net.wait_port("master", net.ip("srv"), 8000, timeout_s=60)
        master = net.popen("master", [PY, "-m", "envelope.cli", "run", "--scenario", str(scenario), "--host", url,
                                      "--expect-workers", "2", "--master-bind-host", net.ip("master"),
                                      "--out", str(out["dist"])],
                           hostname="master", cwd=REPO, env=_clean_env(),
                           stdout=log("master.out"), stderr=log("master.err"))
        workers = {}
        for w in ("w1", "w2"):
            homes[w].mkdir()
            env = _clean_env()
            if w == "w2" and faketime:  # this host's wall clock is 30 s ahead; its monotonic clock is not touched
                env.update(LD_PRELOAD=faketime, FAKETIME=f"+{SKEW_S:g}s", DONT_FAKE_MONOTONIC="1")
            # no --scenario: a worker runs the master's; its working directory stays empty
            workers[w] = net.popen(w, [PY, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                                       "--master-host", net.ip("master")],
                                   hostname=w, cwd=homes[w], env=env,
                                   stdout=log(f"{w}.log"), stderr=subprocess.STDOUT)
        rc = master.wait(timeout=400)
        for proc in workers.values():
            proc.wait(timeout=60)
        dist_metrics = parse_vllm_metrics(net.run("master", [PY, "-c", _FETCH, url + "/metrics"]).stdout)
        # the same load from one process on the master's host, for comparison
        single = net.run("master", [PY, "-m", "envelope.cli", "run", "--scenario", str(scenario), "--host", url,
                                    "--out", str(out["single"])],
                         cwd=REPO, env=_clean_env(), timeout_s=300)
    assert rc == 0, _tail(logs / "master.err") + _tail(logs / "master.out")
    assert single.returncode == 0, single.stderr[-3000:]
    run_dir = next(out["dist"].iterdir())
    single_dir = next(out["single"].iterdir())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"

    # every record reached the master over the network: one file per worker host, nothing on the workers
    counts = _line_counts(run_dir)
    assert sorted(name.split("_")[0] for name in counts) == ["w1", "w2"], counts
    assert all(list(home.iterdir()) == [] for home in homes.values())
    recs = records(run_dir)
    assert len(recs) == sum(counts.values()) == locust_request_count(run_dir) > OPEN_REQUESTS
    assert [r["error_category"] for r in recs if r["error_category"]] == []
    # the token totals match the server's own counters (this server served only this run so far, and the
    # master's capability probe before it: once for the run, not once per worker)
    probe_output, probe_prompt = probe_tokens(run_dir)
    assert probe_output > 0
    assert sum(r["output_tokens"] for r in recs) + probe_output == dist_metrics["generation_tokens_total"]
    assert sum(r["prompt_tokens"] for r in recs) + probe_prompt == dist_metrics["prompt_tokens_total"]
    assert not any(r["output_tokens_estimated"] for r in recs)
    opened = [r for r in recs if r["stage_name"] == "open"]
    assert len(opened) == OPEN_REQUESTS
    assert sorted(sum(1 for r in opened if r["worker_id"].startswith(w)) for w in ("w1", "w2")) == [32, 32]

    # the ledger: both finished, every record accounted for, the clock offsets as measured
    ledger = {w["worker_id"].split(":")[0]: w for w in json.loads((run_dir / "workers.json").read_text())["workers"]}
    assert sorted(ledger) == ["w1", "w2"]
    for host, w in ledger.items():
        assert w["status"] == "finished" and w["record_gaps"] == 0
        assert w["records_received"] == counts[f"{host}_{w['worker_id'].split(':')[1]}.jsonl"]
        true_offset = -skew_s if host == "w2" else 0.0  # master minus worker; all hosts share one real clock
        assert abs(w["clock_offset_s"] - true_offset) <= w["clock_uncertainty_s"] + 0.002, (host, w)

    # records sit in their stages on the master's clock (a 30 s skew would put w2's far outside)
    run = load_run(run_dir)
    assert run.records_outside_stage == 0 and run.placement_tolerance_s < 1.1
    for stage in run.stages:
        mine = [r for r in recs if r["stage_index"] == stage.stage_index]
        assert all(stage.start_unix_s - 0.5 <= r["wall_start_unix_s"] <= stage.end_unix_s + 0.5 for r in mine)

    # the live view of the master's run directory covers both hosts in the same window
    live = LiveAggregator(window_s=5.0)
    live.add(recs)
    open_stage = next(s for s in run.stages if s.stage_name == "open")
    window = live.window(open_stage.end_unix_s)
    in_window = [r for r in opened if open_stage.end_unix_s - 5.0 < r["wall_start_unix_s"] + 0.1
                 and r["wall_start_unix_s"] <= open_stage.end_unix_s]
    per_host = [sum(1 for r in in_window if r["worker_id"].startswith(w)) for w in ("w1", "w2")]
    assert min(per_host) >= 15 and abs(per_host[0] - per_host[1]) <= 2, per_host
    assert window.requests >= sum(per_host) - 2

    # the analysis of the merged directory equals the analysis of the same records as one process's file
    pooled = tmp_path / "pooled"
    shutil.copytree(run_dir, pooled, ignore=shutil.ignore_patterns("records", "workers.json", "report"))
    (pooled / "records").mkdir()
    with open(pooled / "records" / "one-process.jsonl", "wb") as fh:
        for path in sorted((run_dir / "records").glob("*.jsonl")):
            fh.write(path.read_bytes())
    compared = ("requests", "stage_records", "stage_output_tokens", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms",
                "e2e_p95_ms", "itl_p99_ms", "aggregate_output_tokens_per_s", "errors")
    merged_rows, pooled_rows = envelope_table(run), envelope_table(load_run(pooled))
    assert [[r[c] for c in compared] for r in merged_rows] == [[r[c] for c in compared] for r in pooled_rows]

    # ... and a real single-process run of the same load gives the same numbers, within timing noise
    single_rows = {r["stage_name"]: r for r in envelope_table(load_run(single_dir))}
    merged = {r["stage_name"]: r for r in merged_rows}
    assert single_rows["open"]["stage_records"] == merged["open"]["stage_records"] == OPEN_REQUESTS
    assert single_rows["open"]["stage_output_tokens"] == merged["open"]["stage_output_tokens"] == OPEN_REQUESTS * 16
    for stage in ("open", "closed"):
        assert abs(single_rows[stage]["ttft_p50_ms"] - merged[stage]["ttft_p50_ms"]) < 15.0, (stage, single_rows,
                                                                                            merged)

    # the report says how the load was generated
    report = (run_dir / "report" / "envelope.md").read_text()
    assert "## Load generators" in report and "2 load-generator worker processes on 2 hosts" in report
    assert "(0 outside)" in report and " lost " not in report


_FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


# -- a worker lost mid-run --------------------------------------------------------------------------
LOSS_SCENARIO = """\
name: loss
defaults:
  workload: {prompt_tokens: 32, output_tokens: 32}
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 20}
passes:
  - name: p
    stages:
      - {name: before, users: 4, spawn_rate: 100, duration_s: 10}
      - {name: after, users: 4, spawn_rate: 100, duration_s: 8}
"""
KILL_AFTER_S = 3.0  # into the first stage: the master declares the worker lost ~12 s later, mid-"after"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_killed_mid_run_keeps_its_shipped_records_and_the_report_names_it(tmp_path, start_sim):
    sim_url = start_sim(ttft_s=0.02, itl_s=0.004)
    scenario = tmp_path / "loss.yaml"
    scenario.write_text(LOSS_SCENARIO)
    run_dir = tmp_path / "run"
    port = str(_free_port())
    stack = contextlib.ExitStack()
    logs = {w: stack.enter_context((tmp_path / f"{w}.log").open("w")) for w in ("w1", "w2")}
    workers = {w: subprocess.Popen([PY, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-port", port],
                                   cwd=REPO, env=_clean_env(), stdout=logs[w], stderr=subprocess.STDOUT,
                                   start_new_session=True)
               for w in ("w1", "w2")}
    killed_pid = workers["w2"].pid
    try:
        master = subprocess.Popen(
            [PY, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--master", "--expect-workers", "2",
             "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--scenario", str(scenario),
             "--host", sim_url, "--run-dir", str(run_dir), "--csv", str(run_dir / "locust" / "locust"),
             "--only-summary"],
            cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # SIGKILL one worker once it has shipped records for a few seconds of the first stage
        victim_file = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and master.poll() is None:
            stages = run_dir / "stages.json"
            files = list((run_dir / "records").glob(f"*_{killed_pid}.jsonl"))
            if stages.exists() and files and time.time() - read_stage_dicts(run_dir)[0]["start_unix_s"] > KILL_AFTER_S:
                victim_file = files[0]
                break
            time.sleep(0.1)
        assert victim_file is not None, "the worker never shipped a record"
        os.killpg(killed_pid, signal.SIGKILL)
        stdout, stderr = master.communicate(timeout=180)
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        stack.close()
    assert master.returncode == 0, stderr[-3000:]
    assert f"load generator {socket.gethostname()}:{killed_pid} was lost" in stderr

    ledger = {w["worker_id"]: w for w in json.loads((run_dir / "workers.json").read_text())["workers"]}
    lost = ledger[f"{socket.gethostname()}:{killed_pid}"]
    survivor = next(w for w in ledger.values() if w is not lost)
    # what it shipped before it died is all in the run directory
    shipped = victim_file.read_bytes().count(b"\n")
    assert lost["status"] == "lost" and shipped == lost["records_received"] > 0 and lost["record_gaps"] == 0
    assert lost["last_heard_unix_s"] < lost["ended_unix_s"]
    assert survivor["status"] == "finished"
    recs = records(run_dir)
    assert len({r["request_id"] for r in recs}) == len(recs)
    # Locust's stats hold what the dead worker reported every 3 s; the records hold more of its work, not less
    assert len(recs) >= locust_request_count(run_dir)
    assert all(r["worker_id"] == survivor["worker_id"] for r in recs if r["stage_name"] == "after")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"

    # the report names the loss, says when, and flags the stage whose load fell
    out = tmp_path / "analysis.out"
    with out.open("w") as sink:
        assert analysis_main([str(run_dir)], out=sink, err=sink) == 0
    said = out.read_text()
    assert f"Load generator {lost['worker_id']} was lost at" in said
    report = (run_dir / "report" / "envelope.md").read_text()
    assert f"Load generator {lost['worker_id']} was lost at" in report
    run = load_run(run_dir)
    rows = {r["stage_name"]: r for r in envelope_table(run)}
    assert rows["before"]["trustworthy"] is False
    reasons = rows["before"]["untrustworthy_reasons"]
    assert (f"load generator {lost['worker_id']} went silent at" in reasons  # declared lost in the next stage
            or f"load generator {lost['worker_id']} was lost at" in reasons), reasons
    # Locust shares the next stage's users among the workers it still counts: until the dead one is
    # declared missing (10 s of silence), its share is lost in that stage too, and the table says so
    after = next(s for s in run.stages if s.stage_name == "after")
    named_in_after = f"load generator {lost['worker_id']}" in (rows["after"]["untrustworthy_reasons"] or "")
    assert named_in_after == (lost["ended_unix_s"] >= after.start_unix_s)


# -- the master interrupted mid-run ----------------------------------------------------------------
SLOW_SCENARIO = """\
name: slow
defaults:
  workload: {prompt_tokens: 32, output_tokens: 200, fixed_output: true}
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 30}
passes:
  - name: p
    stages:
      - {name: long, users: 6, spawn_rate: 100, duration_s: 60}
"""


def test_interrupting_the_master_loses_no_record_its_workers_made(tmp_path, start_sim):
    """Ctrl-C on the master while every user has a request in hand: the workers finish them and ship
    the records before the master quits (Locust alone waits half a second for its workers)."""
    scenario = tmp_path / "slow.yaml"
    scenario.write_text(SLOW_SCENARIO)
    run_dir = tmp_path / "run"
    port = str(_free_port())
    sim_url = start_sim(ttft_s=0.05, itl_s=0.01)  # 200 tokens: 2 s a request
    stack = contextlib.ExitStack()
    try:
        workers = [subprocess.Popen([PY, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-port", port],
                                    cwd=REPO, env=_clean_env(), start_new_session=True,
                                    stdout=stack.enter_context((tmp_path / f"w{i}.log").open("w")),
                                    stderr=subprocess.STDOUT)
                   for i in (1, 2)]
        master = subprocess.Popen(
            [PY, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--master", "--expect-workers", "2",
             "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--scenario", str(scenario),
             "--host", sim_url, "--run-dir", str(run_dir), "--csv", str(run_dir / "locust" / "locust"),
             "--only-summary"],
            cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and master.poll() is None:
            if sum(p.read_bytes().count(b"\n") for p in (run_dir / "records").glob("*.jsonl")) >= 12:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # mid-request: each takes about 2 s
        master.send_signal(signal.SIGINT)
        stdout, stderr = master.communicate(timeout=120)
        for proc in workers:
            assert proc.wait(timeout=60) is not None  # the workers quit with the master
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        stack.close()
    recs = records(run_dir)
    ledger = json.loads((run_dir / "workers.json").read_text())["workers"]
    assert len(ledger) == 2 and all(w["status"] == "finished" for w in ledger), ledger
    assert sum(w["records_received"] for w in ledger) == len(recs)
    # every request the users had in hand at the interrupt is a record, and Locust counts the same
    assert len(recs) == locust_request_count(run_dir) > 12, stderr[-2000:]
    assert sorted({r["worker_id"] for r in recs}) == sorted(w["worker_id"] for w in ledger)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "partial"
    assert "did not confirm" not in stderr
