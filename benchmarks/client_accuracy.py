"""How accurate are the client's TTFT, ITL and E2E? ``python benchmarks/client_accuracy.py [--quick]``.

Runs our real locustfile (``locustfiles/llm.py``, one Locust process, headless)
against the simulated server at 1, 50, 200, 500 and 1,000 concurrent streams.
The simulator records, per request, when the request arrived and when each chunk
was handed to the socket; every client record is paired with its truth record,
and the client's measurement minus the server's is the error:

- TTFT error = client TTFT - server TTFT = send delay + first-token delivery delay
  (split into its two parts in the second table);
- ITL error = client gap between two chunks - server gap between the same two;
- E2E error = client E2E - server E2E (to the last token).

Both sides read ``time.perf_counter()`` = ``CLOCK_MONOTONIC``, one clock for every
process on a Linux machine: no offset is estimated (see ``benchmarks/_common.py``).
With two or more CPUs the simulator is pinned to one and Locust to another.
Figures are medians over ``--repeats`` runs. Informational only: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

LEVELS = (1, 50, 200, 500, 1000)
SATURATED_CPU_RATIO = 0.9


def sim_config(args):
    from server.sim import SimConfig
    from server.sim.config import Distribution

    # Jittered timings keep 1,000 closed-loop users from running in lockstep.
    ttft, itl = args.ttft_ms / 1000, args.itl_ms / 1000
    return SimConfig(
        ttft_s=Distribution(kind="uniform", low_s=ttft * 0.8, high_s=ttft * 1.2),
        itl_s=Distribution(kind="uniform", low_s=itl * 0.75, high_s=itl * 1.25),
        max_model_len=8192,
    )


def one_level(args, sim, users: int, repeat: int, workdir: Path, plan: c.CpuPlan) -> dict:
    run_dir = workdir / f"u{users}-r{repeat}"
    run_dir.mkdir(parents=True)
    # Spawn over about one request's duration so that the users do not start in step.
    request_s = (args.ttft_ms + args.output_tokens * args.itl_ms) / 1000
    # Output lengths vary by +-8 tokens: with the prompt lengths, they tell requests apart in the truth.
    outputs = (max(args.output_tokens - 8, 2), args.output_tokens + 8)
    scenario = c.write_scenario(run_dir / "scenario.yaml", users=users, duration_s=args.duration_s,
                                output_tokens=outputs, spawn_rate=max(users / request_s, 1.0))
    since = _truth_count(sim)
    sim_cpu = c.CpuSampler(sim.pid).start()
    processes = c.processes_for(args.processes, users=users, cpus=plan.client)
    run = c.run_locust(sim.base_url, scenario, run_dir / "run", cpus=plan.client, processes=processes)
    sim_cpu.stop()
    truth = c.fetch_truth(sim.base_url, since)
    row = {"users": users, "repeat": repeat, "returncode": run.returncode, "processes": processes}
    if run.stage_start_s is None or run.stage_end_s is None or not run.records:
        row["failure"] = f"Locust exited {run.returncode} with {len(run.records)} records:\n{run.log_tail()}"
        return row
    t0 = run.stage_start_s + min(args.warmup_s, args.duration_s / 3)
    t1 = run.stage_end_s
    steady = [r for r in run.records if t0 <= r["t_start_s"] < t1]
    m = c.match_truth(steady, truth)
    err = c.errors_ms(m.pairs)
    cpu_s = run.sampler.cpu_s(t0, t1)
    row.update(
        requests=len(steady),
        failed=sum(1 for r in steady if r.get("error_category") is not None),
        matched=len(m.pairs), unmatched=m.unmatched, ambiguous=m.ambiguous,
        causality_violations=m.causality_violations,
        chunks_per_s=c.window_chunks(run.records, t0, t1) / (t1 - t0),
        client_cpu_ratio=cpu_s / (t1 - t0),
        sim_cpu_ratio=sim_cpu.cpu_s(t0, t1) / (t1 - t0),
        # runnable but another process had the CPU: how busy the machine was, not our work
        client_wait_ratio=run.sampler.waited_s(t0, t1) / (t1 - t0),
        sim_wait_ratio=sim_cpu.waited_s(t0, t1) / (t1 - t0),
    )
    for name in ("ttft", "itl", "e2e", "send", "first_token_lag"):
        row[f"{name}_p50_ms"] = c.pct(err[name], 50)
        row[f"{name}_p99_ms"] = c.pct(err[name], 99)
    row["min_lag_ms"] = min(c.pct(err["send"], 0), c.pct(err["first_token_lag"], 0)) if m.pairs else math.nan
    return row


def _truth_count(sim) -> int:
    """The index the next truth record will get (the simulator keeps every record since it started)."""
    return len(c.fetch_truth(sim.base_url, 0))


def explain(summary: list[dict]) -> list[str]:
    """Sentences on where the error starts to grow, from the measured rows."""
    lines: list[str] = []
    base = summary[0]
    base_p99 = base["ttft_p99_ms"]
    grown = next((s for s in summary[1:] if s["ttft_p99_ms"] > max(2 * base_p99, base_p99 + 1.0)), None)
    if grown is None:
        lines.append(f"TTFT error p99 stays within {max(2 * base_p99, base_p99 + 1.0):.2f} ms "
                     f"(twice the 1-stream figure, or +1 ms) up to {summary[-1]['users']} streams.")
    else:
        lines.append(
            f"TTFT error p99 grows from {base_p99:.2f} ms at {base['users']} stream(s) to "
            f"{grown['ttft_p99_ms']:.2f} ms at {grown['users']} streams, where the Locust process used "
            f"{grown['client_cpu_ratio']:.0%} of a CPU ({grown['chunks_per_s']:,.0f} chunks/s).")
    saturated = [s for s in summary if s["client_cpu_ratio"] >= SATURATED_CPU_RATIO]
    if saturated:
        s = saturated[0]
        lines.append(f"The client is CPU-saturated from {s['users']} streams ({s['client_cpu_ratio']:.0%} of a "
                     "CPU): chunks wait in the socket until the one gevent hub gets to their greenlet, so "
                     "every figure above that level includes the client's own queueing.")
    lines.append(
        "Why it grows before 100% CPU: one process runs every stream on one gevent hub. A chunk is "
        "timestamped when its greenlet runs and reads it, so it waits for the greenlets ahead of it in "
        "the hub's ready queue; that wait grows with the number of streams with data ready at once and "
        "with the client's CPU utilisation (queueing), which shows first at p99. The send part grows too: "
        "a new request is built and sent by a greenlet that also waits for its turn.")
    sim_busy = [s for s in summary if s["sim_cpu_ratio"] >= SATURATED_CPU_RATIO]
    if sim_busy:
        lines.append(f"Note: the simulator itself used {sim_busy[0]['sim_cpu_ratio']:.0%} of its CPU at "
                     f"{sim_busy[0]['users']} streams; its read delay is part of the 'send' column there.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/client_accuracy.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, one repeat (about 2 minutes)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams, comma-separated")
    p.add_argument("--repeats", type=int, default=None, help="runs per level (default 3, --quick 1)")
    p.add_argument("--duration-s", type=float, default=None, help="stage length (default 20, --quick 8)")
    p.add_argument("--warmup-s", type=float, default=None, help="requests started earlier are left out (default 3)")
    p.add_argument("--ttft-ms", type=float, default=50.0, help="simulated TTFT, +-20%% (default 50)")
    p.add_argument("--itl-ms", type=float, default=20.0, help="simulated ITL, +-25%% (default 20)")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--server-cpus", default=None, help="CPUs for the simulator, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="CPUs for Locust, e.g. 1")
    p.add_argument("--processes", default="1",
                   help="Locust worker processes: a number, or 'auto' (what `envelope run` picks for each level "
                        "on the client's CPUs; see envelope/client_budget.py)")
    args = p.parse_args(argv)
    if args.processes != "auto" and not (args.processes.isdigit() and int(args.processes) >= 1):
        p.error("--processes must be a positive integer or 'auto'")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration_s = args.duration_s or (8.0 if args.quick else 20.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (2.0 if args.quick else 3.0)
    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error("--levels must be integers separated by commas")
    c.check_shared_clock()
    plan = c.cpu_plan(server_cpus=args.server_cpus, client_cpus=args.client_cpus)

    print(f"Client accuracy: Locust (--processes {args.processes}, fasthttp) against the simulator; "
          f"{c.machine_line()}")
    print(f"Pinning: {plan.describe()}. Clock: perf_counter = {c.SHARED_CLOCK} on both sides.")
    print(f"Workload: {args.output_tokens} +-8 output tokens, TTFT {args.ttft_ms:g} ms +-20%, ITL {args.itl_ms:g} ms "
          f"+-25%; {args.duration_s:g} s per level, first {args.warmup_s:g} s left out, "
          f"median of {args.repeats} run(s).", flush=True)
    busy50, busy99, idle50, idle99 = c.wakeup_rtt_us(plan)
    print(f"Floor: a one-byte round trip between the two CPUs takes {busy50:.0f} us p50 / {busy99:.0f} us p99 "
          f"back to back, {idle50:.0f} / {idle99:.0f} us after 2 ms asleep; a TTFT error holds a send and a "
          "receive, each a wake-up like half of one.", flush=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="envelope-accuracy-") as tmp:
        sim = c.start_sim(sim_config(args), plan.server, log_path=Path(tmp) / "sim.log")
        try:
            for users in levels:
                for repeat in range(args.repeats):
                    t = time.monotonic()
                    row = one_level(args, sim, users, repeat, Path(tmp), plan)
                    if "failure" in row:
                        print(f"  {users} streams, run {repeat + 1}: FAILED: {row['failure']}", flush=True)
                        continue
                    rows.append(row)
                    print(f"  {users:>5} streams ({row['processes'] or 1} proc), run {repeat + 1}: "
                          f"{row['matched']} requests matched, "
                          f"TTFT error p50 {row['ttft_p50_ms']:.3f} / p99 {row['ttft_p99_ms']:.3f} ms, "
                          f"client CPU {row['client_cpu_ratio']:.0%} ({time.monotonic() - t:.0f} s)", flush=True)
        finally:
            sim.stop()

    summary = []
    for users in levels:
        mine = [r for r in rows if r["users"] == users]
        if not mine:
            continue
        s = {"users": users, "runs": len(mine), "processes": mine[0]["processes"]}
        for key in mine[0]:
            if key.endswith(("_ms", "_ratio", "_per_s")):
                s[key] = c.median_of(mine, key)
        for key in ("matched", "unmatched", "ambiguous", "causality_violations", "failed"):
            s[key] = sum(r[key] for r in mine)
        summary.append(s)
    if not summary:
        print("no level completed")
        return 1

    print("\nError of the client's measurement minus the server's truth (ms; median over runs):")
    print(c.table(
        ["streams", "processes", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99", "chunks/s",
         "chunks/s/proc", "client CPU", "requests"],
        [[s["users"], s["processes"] or 1, s["ttft_p50_ms"], s["ttft_p99_ms"], s["itl_p50_ms"], s["itl_p99_ms"],
          s["e2e_p50_ms"], s["e2e_p99_ms"], s["chunks_per_s"], s["chunks_per_s"] / (s["processes"] or 1),
          f"{s['client_cpu_ratio']:.0%}", s["matched"]] for s in summary]))
    print("\nWhere the TTFT error comes from (ms): send = server arrival - client send; "
          "first-token lag = client arrival - server write:")
    print(c.table(
        ["streams", "send p50", "send p99", "lag p50", "lag p99", "sim CPU", "CPU wait client/sim", "unmatched",
         "ambiguous", "clock viol."],
        [[s["users"], s["send_p50_ms"], s["send_p99_ms"], s["first_token_lag_p50_ms"],
          s["first_token_lag_p99_ms"], f"{s['sim_cpu_ratio']:.0%}",
          f"{s['client_wait_ratio']:.0%} / {s['sim_wait_ratio']:.0%}", s["unmatched"], s["ambiguous"],
          s["causality_violations"]] for s in summary]))
    print("(CPU wait: share of the time the process had work but another process held its CPU; "
          "above a few percent the machine was busy and the tails measure it, not Envelope.)")
    print()
    for line in explain(summary):
        print(line)
    failed = sum(s["failed"] for s in summary)
    if failed:
        print(f"Note: {failed} request(s) failed and are not in the error figures.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
