"""``envelope run``: validation before anything starts, the Locust command line, and short runs against the simulated server."""

from __future__ import annotations

import calendar
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envelope.cli import locust_command, locust_env, locustfile_path, main, run_dir_name, schedule_completed
from envelope.secrets import Secret

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "scenarios" / "smoke.yaml"

TINY = """\
name: tiny
defaults:
  client: fasthttp
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 10}
  workload: {prompt_tokens: 16, output_tokens: 8, fixed_output: true}
  slos: {ttft_p95_ms: 5000, error_rate_max: 0.01}
passes:
  - name: tiny
    stages:
      - {users: 1, duration_s: DURATION}
      - {users: 2, duration_s: DURATION}
"""


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def assert_usage_error(tmp_path: Path, argv: list[str], pattern: str) -> None:
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(*argv, "--out", str(out_dir))
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()  # no run directory, nothing launched


def test_bad_scenario_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npasses:\n  - name: p\n    stages:\n      - {users: 1, duration_s: 10, colour: red}\n")
    assert_usage_error(tmp_path, ["run", "--scenario", str(bad), "--host", "http://127.0.0.1:9"],
                       rf"^envelope: {re.escape(str(bad))}:5: .*unknown key 'colour'")


def test_missing_scenario_file(tmp_path):
    assert_usage_error(tmp_path, ["run", "--scenario", str(tmp_path / "nope.yaml"), "--host", "http://x:1"],
                       r"nope\.yaml: file not found")


def test_unknown_profile(tmp_path):
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--profile", "no-such-profile"],
                       r"unknown server profile 'no-such-profile'; available: .*cpu-tiny")


@pytest.mark.parametrize("server_args", [[], ["--profile", "cpu-tiny", "--host", "http://127.0.0.1:9"]])
def test_exactly_one_of_profile_and_host(tmp_path, server_args):
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), *server_args],
                       r"give exactly one of --profile NAME .* or --host URL")


def test_unreadable_key_file(tmp_path):
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9",
                                  "--api-key-file", str(tmp_path / "missing-key")],
                       r"API key file .*missing-key: cannot read")
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9",
                                  "--api-key-file", str(empty)], r"API key file .*empty-key: is empty")


def test_named_key_variable_must_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVELOPE_TEST_UNSET_KEY", raising=False)
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9",
                                  "--api-key-env", "ENVELOPE_TEST_UNSET_KEY"],
                       r"--api-key-env ENVELOPE_TEST_UNSET_KEY: the variable is not set")


def test_argument_syntax_errors_are_one_line(tmp_path):
    assert_usage_error(tmp_path, ["run", "--host", "http://127.0.0.1:9"], r"required: --scenario")
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9",
                                  "--processes", "0"], r"--processes must be at least 1")
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "127.0.0.1:9"],
                       r"--host must be an http:// or https:// URL")


def test_distributed_options_are_checked_before_anything_starts(tmp_path):
    base = ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9"]
    assert_usage_error(tmp_path, base + ["--expect-workers", "0"], r"--expect-workers must be at least 1 \(got 0\)")
    assert_usage_error(tmp_path, base + ["--expect-workers", "2", "--processes", "2"],
                       r"give --processes .* or --expect-workers .*, not both")
    assert_usage_error(tmp_path, base + ["--master-bind-host", "0.0.0.0"],
                       r"--master-bind-host and --master-bind-port need --expect-workers N")
    assert_usage_error(tmp_path, base + ["--expect-workers", "1", "--master-bind-port", "70000"],
                       r"--master-bind-port must be a TCP port, 1-65535 \(got 70000\)")


def test_locust_command_for_a_master_of_remote_workers(tmp_path):
    argv = locust_command(locustfile=locustfile_path(), scenario=SMOKE, host="http://h:1", run_dir=tmp_path,
                          expect_workers=3, master_bind_host="10.0.0.3", master_bind_port=6000)
    assert argv[argv.index("--expect-workers") + 1] == "3"
    assert "--master" in argv and "--processes" not in argv
    assert argv[argv.index("--master-bind-host") + 1] == "10.0.0.3"
    assert argv[argv.index("--master-bind-port") + 1] == "6000"
    assert argv[argv.index("--expect-workers-max-wait") + 1] == "600"
    plain = locust_command(locustfile=locustfile_path(), scenario=SMOKE, host="http://h:1", run_dir=tmp_path)
    assert "--master" not in plain and "--expect-workers" not in plain


def test_stage_too_long_for_the_profile_names_its_line_before_launching(tmp_path):
    scenario = tmp_path / "two.yaml"
    scenario.write_text(
        "name: two\n"
        "defaults:\n"
        "  workload: {prompt_tokens: 100, output_tokens: 10}\n"
        "passes:\n"
        "  - name: a\n"
        "    stages:\n"
        "      - {users: 1, duration_s: 5}\n"
        "  - name: b\n"
        "    stages:\n"
        "      - {users: 1, duration_s: 5}\n"
        "      - users: 2\n"
        "        duration_s: 5\n"
        "        workload: {prompt_tokens: 4090}\n"
    )
    assert_usage_error(tmp_path, ["run", "--scenario", str(scenario), "--profile", "cpu-tiny"],
                       rf"^envelope: {re.escape(str(scenario))}:11: pass 'b', stage 'b-2u': prompt_tokens up to 4090 "
                       r"\+ output_tokens up to 10 = 4100 exceeds the server's max_model_len 4096 \(profile cpu-tiny\)$")


def test_scenario_model_the_profile_does_not_serve_names_its_line(tmp_path):
    scenario = tmp_path / "m.yaml"
    scenario.write_text(SMOKE.read_text().replace("model: null", "model: qwen3-8b"))
    line = next(i for i, text in enumerate(scenario.read_text().splitlines(), 1) if text.startswith("model:"))
    assert_usage_error(tmp_path, ["run", "--scenario", str(scenario), "--profile", "cpu-tiny"],
                       rf"^envelope: {re.escape(str(scenario))}:{line}: model 'qwen3-8b' is not served by profile "
                       r"cpu-tiny \(it serves: tiny-qwen3; or pass --model\)$")
    # --model wins over the scenario's model
    assert_usage_error(tmp_path, ["run", "--scenario", str(scenario), "--profile", "cpu-tiny", "--model", "x"],
                       r"^envelope: --model x: not served by profile cpu-tiny \(it serves: tiny-qwen3\)$")


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "envelope.cli", "run", "--scenario", str(SMOKE)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr == "envelope: give exactly one of --profile NAME (launch a server) or --host URL (use a running one)\n"


def test_run_dir_name_is_utc():
    t = calendar.timegm((2026, 11, 22, 6, 30, 5, 0, 0, 0))
    assert run_dir_name("capstone", t + 0.9) == "20261122-063005-capstone"


def test_locust_command_never_carries_the_key(tmp_path):
    key = Secret("sk-" + secrets.token_hex(8))
    argv = locust_command(locustfile=locustfile_path(), scenario=SMOKE, host="http://127.0.0.1:8000",
                          run_dir=tmp_path / "r", quick=True, duration_scale=0.5, processes=2, model="m")
    assert not any(key.get() in a for a in argv)
    assert not any("api-key" in a or "api_key" in a for a in argv)
    assert argv[:5] == [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "llm.py")]
    assert argv[argv.index("--csv") + 1] == str(tmp_path / "r" / "locust" / "locust")
    assert argv[argv.index("--html") + 1] == str(tmp_path / "r" / "locust" / "report.html")
    assert argv[argv.index("--duration-scale") + 1] == "0.5"
    assert argv[argv.index("--processes") + 1] == "2"
    assert "--quick" in argv and "--headless" in argv and "--only-summary" in argv
    assert "--record-text" not in argv  # prompts and completions stay out of the records unless asked for
    assert locust_command(locustfile=locustfile_path(), scenario=SMOKE, host="http://h:1", run_dir=tmp_path,
                          record_text=True)[-1] == "--record-text"
    env = locust_env(key, base={"PATH": "/bin", "ENVELOPE_API_KEY": "inherited"})
    assert env == {"PATH": "/bin", "ENVELOPE_API_KEY": key.get()}
    assert locust_env(None, base={"ENVELOPE_API_KEY": "inherited"}) == {}


def test_schedule_completed(tmp_path):
    planned = [object(), object()]
    stages = [{"start_unix_s": 0.0, "end_unix_s": 10.0, "duration_s": 10.0},
              {"start_unix_s": 10.0, "end_unix_s": 19.0, "duration_s": 10.0}]
    assert not schedule_completed(tmp_path, planned)  # no stages.json
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    assert schedule_completed(tmp_path, planned)  # 9 s of 10: within the 2 s slack
    stages[1]["end_unix_s"] = 17.0  # interrupted 7 s into the last stage
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    assert not schedule_completed(tmp_path, planned)
    (tmp_path / "stages.json").write_text(json.dumps(stages[:1]))  # never reached the second stage
    assert not schedule_completed(tmp_path, planned)


# --------------------------------------------------------------------------- against the simulated server


@pytest.fixture
def sim(tmp_path):
    """(base_url, key) of ``python -m server.sim`` on a free port, protected by a random key."""
    pytest.importorskip("server.sim")
    key = "sk-sim-" + secrets.token_hex(12)
    log = tmp_path / "sim.log"
    env = {**os.environ, "ENVELOPE_TEST_SIM_KEY": key}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "server.sim", "--port", "0", "--api-key-env",
                                 "ENVELOPE_TEST_SIM_KEY", "--ttft-ms", "30", "--itl-ms", "5"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on (http://\S+)", log.read_text())
            url = m.group(1) if m else None
            time.sleep(0.05)
        if url is None:
            pytest.fail(f"simulated server did not start: {log.read_text()[-2000:]}")
        yield url, key
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def tiny_scenario(tmp_path: Path, duration_s: int) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("DURATION", str(duration_s)))
    return path


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def envelope_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from envelope.cli import main; sys.exit(main())", *args]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_complete_run_against_the_simulated_server(tmp_path, sim):
    url, key = sim
    out = tmp_path / "runs"
    proc = subprocess.run(envelope_cmd("run", "--scenario", str(tiny_scenario(tmp_path, 2)), "--host", url,
                                       "--out", str(out)),
                          env={**os.environ, "ENVELOPE_API_KEY": key}, capture_output=True, text=True,
                          timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-tiny", run_dir.name)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["options"]["api_key"] == "***"
    assert info["scenario_sha256"] and (run_dir / "scenario.yaml").read_text() == TINY.replace("DURATION", "2")
    assert json.loads((run_dir / "server.json").read_text())["launched"] is False
    assert (run_dir / "report" / "envelope.md").is_file() and (run_dir / "locust" / "locust_stats.csv").is_file()
    assert (run_dir / "telemetry" / "metrics.jsonl").stat().st_size > 0
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"report: {run_dir / 'report' / 'envelope.md'}"
    assert any(line.startswith("What broke first: ") for line in lines)
    assert not any(line.startswith(("PARTIAL", "FAILED")) for line in lines)
    assert files_containing(run_dir, key) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_interrupt_marks_partial_and_still_analyses(tmp_path, sim):
    url, key = sim
    out = tmp_path / "runs"
    proc = subprocess.Popen(envelope_cmd("run", "--scenario", str(tiny_scenario(tmp_path, 60)), "--host", url,
                                         "--out", str(out)),
                            env={**os.environ, "ENVELOPE_API_KEY": key}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until requests are being recorded
            if any(p.stat().st_size > 0 for p in out.glob("*/records/*.jsonl")):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    (run_dir,) = out.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "partial"
    assert (run_dir / "report" / "envelope.md").is_file()
    assert (run_dir / "locust" / "locust_stats.csv").is_file()  # Locust wrote its CSVs on SIGINT
    assert stdout.strip().splitlines()[-1].startswith("report: ")
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- --processes auto


def _budget(tmp_path: Path, monkeypatch, streams: int) -> Path:
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({"streams_per_process": streams, "rate_per_s_per_process": 1000,
                                "measured_on": "test", "method": "test"}))
    monkeypatch.setenv("ENVELOPE_CLIENT_BUDGET", str(path))
    return path


@pytest.mark.parametrize(("budget", "cores", "flags", "processes", "decided"), [
    (100, 8, [], None, False),  # the peak (2 users) fits one process: nothing to decide
    (1, 8, [], 2, True),  # the peak needs two: auto by default
    (1, 8, ["--processes", "3"], 3, False),  # an explicit number wins
    (100, 8, ["--processes", "auto"], None, True),  # asked for: decided, and one process it is
    (1, 2, [], None, True),  # 2 cores less the launched server's two: one process, short of cores
    (1, 8, ["--expect-workers", "2"], None, False),  # workers elsewhere are the user's arrangement
])
def test_processes_default_to_auto_when_the_peak_needs_more_than_one(tmp_path, monkeypatch, budget, cores, flags,
                                                                     processes, decided):
    from envelope.cli import _parser, _validate

    _budget(tmp_path, monkeypatch, budget)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    args = _parser().parse_args(["run", "--scenario", str(tiny_scenario(tmp_path, 2)), "--profile", "cpu-tiny",
                                 *flags])
    plan = _validate(args)
    assert plan.processes == processes
    assert (plan.process_choice is not None) == decided
    if decided:
        assert plan.process_choice.cores == max(cores - 2, 1)  # --profile: the server runs here


def test_processes_must_be_a_number_or_auto(tmp_path):
    assert_usage_error(tmp_path, ["run", "--scenario", str(SMOKE), "--host", "http://127.0.0.1:9",
                                  "--processes", "many"], r"argument --processes: invalid value 'many': a number of "
                                                          r"processes or 'auto'")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_too_few_cores_warn_in_one_line_before_the_run_and_the_stage_over_budget_is_flagged(tmp_path, sim,
                                                                                            monkeypatch):
    url, key = sim
    out = tmp_path / "runs"
    budget = _budget(tmp_path, monkeypatch, 1)  # one stream per process: the 2-user stage is over it
    proc = subprocess.run(envelope_cmd("run", "--scenario", str(tiny_scenario(tmp_path, 2)), "--host", url,
                                       "--out", str(out)),
                          env={**os.environ, "ENVELOPE_API_KEY": key, "ENVELOPE_CLIENT_BUDGET": str(budget)},
                          capture_output=True, text=True, timeout=170, cwd=REPO,
                          preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    warnings = [line for line in err if line.startswith("envelope: warning:")]
    assert warnings == ["envelope: warning: this machine has 1 core for the load generator but the scenario's peak "
                        "(peak 2 streams) needs 2 processes (one process times 1 streams or paces 1000 requests/s "
                        "accurately); stages above the budget will be flagged in the report"]
    assert err.index(warnings[0]) < next(i for i, line in enumerate(err) if "Locust started" in line)
    (run_dir,) = out.iterdir()
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert [(s["client_processes"], s["client_budget_streams_per_process"]) for s in stages] == [(1, 1), (1, 1)]
    import csv

    with open(run_dir / "report" / "table.csv", newline="") as fh:
        rows = {r["target_users"]: r for r in csv.DictReader(fh)}
    assert rows["1"]["client_over_budget"] == ""
    assert rows["2"]["client_over_budget"].startswith("load generator over its budget: 2 streams per process")
    assert rows["2"]["trustworthy"] == "False" and "over its budget" in rows["2"]["untrustworthy_reasons"]
