"""What ``engine_nice`` buys and costs on the real ``cpu-tiny`` server.

    .venv/bin/python benchmarks/cpu_arrangement.py                  # 1 round: with, then without; ~4 minutes
    .venv/bin/python benchmarks/cpu_arrangement.py --rounds 2 --out /tmp/ca   # 4 runs, ~8 minutes
    .venv/bin/python benchmarks/cpu_arrangement.py --rounds 2 --out /tmp/ca --reanalyse   # the table again

Each configuration is one ``envelope run`` (a fresh server each time) of two
stages, 1 user then 20 users, 300-token prompts, exactly 128 output tokens. For
each stage it prints the client's mean TTFT (from the records), the server's
mean TTFT (``vllm:time_to_first_token_seconds`` _sum/_count deltas over the
stage, from the run's telemetry), the same pair for E2E, and the server's output
tokens/s (``vllm:generation_tokens_total`` delta over the stage, its first 3 s
left out as ramp-up). "without" is a copy of ``cpu-tiny`` with ``engine_nice``
removed. Rounds alternate the order, so a drift in the machine's load does not
always fall on the same side. A figure, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envelope.records import iter_record_files, read_records  # noqa: E402
from envelope.stages import read_stages  # noqa: E402

RAMP_S = 3.0  # left out of the 20-user tokens/s: users are still arriving

SCENARIO = """\
name: cpu-arrangement
description: "engine_nice on and off: 1 user, then 20 users"
seed: 0
model: null
defaults:
  client: fasthttp
  endpoint: chat
  timeouts: {{connect_s: 10, first_token_s: 60, total_s: 300}}
  workload:
    prompt_tokens: 300
    output_tokens: 128
    fixed_output: true
    system_prefix_tokens: 0
    temperature: 0.0
record_text: false
passes:
  - name: one-user
    stages:
      - {{users: 1, duration_s: {d}}}
  - name: twenty-users
    stages:
      - {{users: 20, duration_s: {d}}}
"""


def profile_without_engine_nice(path: Path) -> None:
    """Write ``cpu-tiny`` without its ``engine_nice`` line to ``path``."""
    text = (REPO / "server" / "profiles" / "cpu-tiny.yaml").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.startswith("engine_nice:")]
    assert len(lines) == len(text.splitlines()) - 1, "cpu-tiny.yaml has no engine_nice line"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_once(scenario: Path, profile: str, out: Path) -> Path:
    """One ``envelope run``; returns its run directory."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    cmd = [str(Path(sys.executable).with_name("envelope")), "run", "--scenario", str(scenario), "--profile", profile,
           "--out", str(out), "--no-analysis"]
    with open(out / "envelope-run.log", "ab") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    (run_dir,) = set(out.iterdir()) - before - {out / "envelope-run.log"}
    return run_dir


def _at_or_before(samples: list[dict], t: float) -> dict:
    before = [s for s in samples if s["t_unix_s"] <= t]
    return before[-1] if before else samples[0]


def _hist_mean_ms(a: dict, b: dict, name: str) -> float:
    ha, hb = a["histograms"][name], b["histograms"][name]
    count = hb["count"] - ha["count"]
    return 1000.0 * (hb["sum"] - ha["sum"]) / count if count > 0 else float("nan")


def stage_figures(run_dir: Path) -> list[dict]:
    """Per stage: users, requests, client and server mean TTFT/E2E (ms), server output tokens/s."""
    records = [r for r in read_records(iter_record_files(run_dir)) if r.get("error_category") is None]
    samples = [json.loads(ln) for ln in (run_dir / "telemetry" / "metrics.jsonl").read_text().splitlines() if ln]
    samples = [s for s in samples if s.get("ok")]
    rows = []
    for stage in read_stages(run_dir):
        mine = [r for r in records if r["stage_name"] == stage.stage_name and r.get("t_first_token_s")]
        start, end = stage.start_unix_s, stage.end_unix_s or samples[-1]["t_unix_s"]
        # both ends at or before the boundary: a sample after the end would count
        # the next stage's first requests (20 at once after a 1-user stage)
        a, b = _at_or_before(samples, start), _at_or_before(samples, end)
        ra, rb = _at_or_before(samples, start + RAMP_S), _at_or_before(samples, end)
        dt = rb["t_unix_s"] - ra["t_unix_s"]
        n = max(len(mine), 1)
        rows.append({
            "stage": stage.stage_name,
            "requests": len(mine),
            "client_ttft_ms": 1000.0 * sum(r["t_first_token_s"] - r["t_start_s"] for r in mine) / n,
            "server_ttft_ms": _hist_mean_ms(a, b, "ttft_s"),
            "client_e2e_ms": 1000.0 * sum(r["t_last_token_s"] - r["t_start_s"] for r in mine) / n,
            "server_e2e_ms": _hist_mean_ms(a, b, "e2e_s"),
            "server_tokens_per_s": (rb["generation_tokens_total"] - ra["generation_tokens_total"]) / dt if dt > 0 else
            float("nan"),
            "client_cpu_max_percent": stage.client_cpu_max_percent,
        })
    return rows


def engine_nice_recorded(run_dir: Path) -> str:
    info = json.loads((run_dir / "server.json").read_text())
    arrangement = info.get("cpu_arrangement")
    if not arrangement:
        return "none"
    return f"nice {arrangement['engine_nice']} on {arrangement['threads_reniced']} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=25.0, help="each stage's length (default 25)")
    parser.add_argument("--rounds", type=int, default=1, help="with/without pairs, order alternating (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--reanalyse", action="store_true", help="print the table of the runs already in --out")
    args = parser.parse_args(argv)
    if args.reanalyse and args.out is None:
        parser.error("--reanalyse needs --out")

    out = args.out or Path(tempfile.mkdtemp(prefix="envelope-cpu-arrangement-"))
    out.mkdir(parents=True, exist_ok=True)
    scenario = out / "scenario.yaml"
    scenario.write_text(SCENARIO.format(d=args.duration_s), encoding="utf-8")
    plain = out / "cpu-tiny-no-engine-nice.yaml"
    profile_without_engine_nice(plain)
    configs = {"with": "cpu-tiny", "without": str(plain)}

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    print(f"# engine_nice on cpu-tiny, {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs; runs in {out}")
    print(f"{'config':8} {'round':>5} {'stage':14} {'reqs':>5} {'TTFT client':>11} {'server':>7} "
          f"{'E2E client':>10} {'server':>7} {'server tok/s':>12} {'Locust CPU%':>11}  load avg before / engine_nice")
    for rnd in range(args.rounds):
        order = ["with", "without"] if rnd % 2 == 0 else ["without", "with"]
        for name in order:
            load = "/".join(f"{x:.1f}" for x in os.getloadavg())
            if args.reanalyse:
                run_dir, load = next((out / f"{rnd}-{name}").glob("2*")), "-"
            else:
                run_dir = run_once(scenario, configs[name], out / f"{rnd}-{name}")
            for row in stage_figures(run_dir):
                cpu_pct = row["client_cpu_max_percent"]
                print(f"{name:8} {rnd:>5} {row['stage']:14} {row['requests']:>5} {row['client_ttft_ms']:>11.1f} "
                      f"{row['server_ttft_ms']:>7.1f} {row['client_e2e_ms']:>10.1f} {row['server_e2e_ms']:>7.1f} "
                      f"{row['server_tokens_per_s']:>12.0f} {cpu_pct if cpu_pct is not None else '-':>11}  "
                      f"{load} / {engine_nice_recorded(run_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
