"""Soak: 1,000 users against the simulated server for a long time on one Locust process.

    python benchmarks/soak.py                 # 1,000 users, 10 minutes
    python benchmarks/soak.py --minutes 1     # a short look

Runs our real locustfile (``locustfiles/llm.py``, headless, one process: the
local runner is the one worker) against ``python -m server.sim`` and prints:

- completeness: records written = Locust's request count (E2E + CANCELLED) =
  requests the simulator accepted, and whether every record file ends in a whole line;
- the client's memory: RSS after the warm-up, at the end of the stage, the growth
  between the two (the target is under 10 %) and a least-squares slope in MiB/min;
- open file descriptors and TCP connections over time: a leak shows as a count
  that keeps climbing while the user count is flat;
- the client's CPU (one core = 1.0): a saturated client measures itself.

Informational only: nothing here asserts. With two or more CPUs the simulator
is pinned to one and Locust to another.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from envelope.progress import RecordTailer  # noqa: E402

GROWTH_TARGET_RATIO = 0.10


@dataclass(frozen=True)
class Sample:
    """One look at the Locust process tree (and the simulator) while the soak runs."""

    t_unix_s: float
    rss_bytes: int
    fds: int
    tcp_connections: int
    cpu_s: float  # CPU seconds used so far (user + system)
    records: int
    served: int | None  # completion requests the simulator accepted so far (None: it did not answer in time)


# -- pure figures ------------------------------------------------------------------------------------

def growth_ratio(before: float, after: float) -> float:
    """Relative growth from ``before`` to ``after`` (0.05 = 5 %); NaN when ``before`` is not positive."""
    return (after - before) / before if before > 0 else math.nan


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t_s, value)`` points, per minute; NaN with fewer than two distinct times."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return math.nan
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var


def window(samples: Sequence[Sample], t0_unix_s: float, t1_unix_s: float) -> list[Sample]:
    """The samples taken in ``[t0_unix_s, t1_unix_s]``."""
    return [s for s in samples if t0_unix_s <= s.t_unix_s <= t1_unix_s]


def cpu_ratio(samples: Sequence[Sample]) -> float:
    """Mean CPU use between the first and last sample, in cores."""
    if len(samples) < 2 or samples[-1].t_unix_s <= samples[0].t_unix_s:
        return math.nan
    return (samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].t_unix_s - samples[0].t_unix_s)


# -- measuring -----------------------------------------------------------------------------------------

class _RecordCounter:
    """Counts complete record lines as they are appended (``RecordTailer`` reads each byte once)."""

    def __init__(self, run_dir: Path) -> None:
        self._tailer = RecordTailer(run_dir / "records")
        self._lines = 0

    def count(self) -> int:
        self._lines += len(self._tailer.poll())
        return self._lines


def _look(pid: int) -> tuple[int, int, int, float] | None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    rss = fds = conns = 0
    cpu = 0.0
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                fds += p.num_fds()
                t = p.cpu_times()
                cpu += t.user + t.system
            conns += len(p.net_connections(kind="tcp"))
        except psutil.Error:
            continue
    return rss, fds, conns, cpu


def _served(base_url: str, timeout_s: float = 10.0) -> int | None:
    import httpx

    try:
        return int(httpx.get(f"{base_url}/sim/faults", timeout=timeout_s).json()["requests"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


class Watcher:
    """Samples the Locust tree every ``interval_s`` on a thread until stopped."""

    def __init__(self, pid: int, run_dir: Path, base_url: str, interval_s: float) -> None:
        self.pid = pid
        self.base_url = base_url
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._counter = _RecordCounter(run_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-watcher", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            look = _look(self.pid)
            if look is not None:
                rss, fds, conns, cpu = look
                self.samples.append(Sample(t_unix_s=time.time(), rss_bytes=rss, fds=fds,
                                           tcp_connections=conns, cpu_s=cpu, records=self._counter.count(),
                                           served=_served(self.base_url, timeout_s=self.interval_s)))
            self._stop.wait(self.interval_s)


def locust_count(run_dir: Path) -> int | None:
    """Locust's request count (E2E + CANCELLED entries) from its stats CSV."""
    try:
        with open(run_dir / "locust" / "locust_stats.csv", newline="") as fh:
            return sum(int(row["Request Count"]) for row in csv.DictReader(fh) if row["Type"] in ("E2E", "CANCELLED"))
    except (OSError, KeyError, ValueError):
        return None


def whole_lines(run_dir: Path) -> bool:
    """True when every record file ends with a newline (no torn last record)."""
    files = list((run_dir / "records").glob("*.jsonl"))
    return bool(files) and all(p.read_bytes()[-1:] in (b"\n", b"") for p in files)


# -- the run -----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the stage at full load (default 10)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--spawn-rate", type=float, default=50.0, help="users started per second (default 50)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="after the ramp, seconds left out of the growth figure (default: 60, or a quarter of the stage)")
    p.add_argument("--ttft-ms", type=float, default=100.0, help="simulated TTFT, +-20%% (default 100)")
    p.add_argument("--itl-ms", type=float, default=100.0, help="simulated ITL, +-25%% (default 100)")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--keep", metavar="DIR", help="keep the run directory here (default: a temporary one, removed)")
    return p


def sim_config(args):
    from server.sim import SimConfig
    from server.sim.config import Distribution

    ttft, itl = args.ttft_ms / 1000, args.itl_ms / 1000
    return SimConfig(
        ttft_s=Distribution(kind="uniform", low_s=ttft * 0.8, high_s=ttft * 1.2),
        itl_s=Distribution(kind="uniform", low_s=itl * 0.75, high_s=itl * 1.25),
        max_model_len=8192,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.minutes <= 0 or args.users < 1 or args.spawn_rate <= 0 or args.sample_s <= 0:
        print("error: --minutes, --users, --spawn-rate and --sample-s must be positive", file=sys.stderr)
        return 2
    duration_s = args.minutes * 60.0
    ramp_s = args.users / args.spawn_rate
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, duration_s / 4)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="envelope-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = c.cpu_plan()
    print(c.machine_line())
    print(f"CPUs: {plan.describe()}")
    print(f"{args.users} users (spawn {args.spawn_rate:g}/s, ramp {ramp_s:.0f} s), stage {duration_s:.0f} s, "
          f"warm-up {warmup_s:.0f} s after the ramp; simulated TTFT {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms, "
          f"{args.output_tokens} output tokens; run directory {workdir}")
    sim = c.start_sim(sim_config(args), plan.server, log_path=workdir / "sim.log")
    try:
        # the stage holds the users for ramp + duration: --minutes is time at full load
        scenario = c.write_scenario(workdir / "soak.yaml", users=args.users, duration_s=ramp_s + duration_s,
                                    output_tokens=args.output_tokens,
                                    prompt_tokens=(args.prompt_tokens, args.prompt_tokens),
                                    spawn_rate=args.spawn_rate, total_timeout_s=120.0)
        run_dir = workdir / "run"
        watcher: list[Watcher] = []
        started = threading.Event()

        def watch() -> None:  # find the Locust process run_locust starts, then sample it
            import psutil

            me = psutil.Process()
            while not started.is_set():
                for child in me.children():
                    try:
                        if "locust" in " ".join(child.cmdline()):
                            watcher.append(Watcher(child.pid, run_dir, sim.base_url, args.sample_s).start())
                            return
                    except psutil.Error:
                        continue
                time.sleep(0.05)

        finder = threading.Thread(target=watch, daemon=True)
        finder.start()
        try:
            run = c.run_locust(sim.base_url, scenario, run_dir, cpus=plan.client,
                               timeout_s=ramp_s + duration_s + 600)
        finally:
            started.set()
            finder.join()
            for w in watcher:
                w.stop()
        served_total = _served(sim.base_url, timeout_s=60.0)
        truth_total = len(c.fetch_truth(sim.base_url))
    finally:
        sim.stop()
    samples = watcher[0].samples if watcher else []
    report(run, samples, served_total, truth_total, ramp_s=ramp_s, warmup_s=warmup_s, duration_s=duration_s)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(run, samples: list[Sample], served_total: int | None, truth_total: int, *, ramp_s: float,
           warmup_s: float, duration_s: float) -> None:
    records = len(run.records)
    locust_n = locust_count(run.run_dir)
    cancelled = sum(1 for r in run.records if r.get("error_category") == "cancelled")
    failed = sum(1 for r in run.records if r.get("error_category") not in (None, "cancelled"))
    print()
    print(f"Locust exit code {run.returncode}")
    if run.returncode != 0:
        print(run.log_tail())
    same = records == locust_n == served_total
    print(f"records {records:,} | Locust count {'-' if locust_n is None else f'{locust_n:,}'} | "
          f"simulator accepted {'-' if served_total is None else f'{served_total:,}'} "
          f"(truth records {truth_total:,}) -> "
          f"{'all equal' if same else 'NOT EQUAL'}; failed {failed:,}, cancelled {cancelled:,}; "
          f"whole last lines: {whole_lines(run.run_dir)}")
    if not samples:
        print("no samples of the Locust process were taken")
        return
    stage0 = _stage_start_unix_s(run.run_dir)
    if stage0 is None:
        print("no stages.json: the stage never started")
        return
    steady = window(samples, stage0 + ramp_s + warmup_s, stage0 + ramp_s + duration_s)
    rows = [(f"{s.t_unix_s - stage0:.0f}", f"{s.rss_bytes / 2**20:.1f}", s.fds, s.tcp_connections, f"{s.records:,}",
             "-" if s.served is None else f"{s.served:,}") for s in samples]
    print()
    print("t_s: seconds since the stage began; rss, fds and tcp: the Locust process")
    print(c.table(["t_s", "rss_MiB", "fds", "tcp", "records", "served"], _thin(rows, 40)))
    print()
    if len(steady) < 2:
        print(f"too few samples after the warm-up ({len(steady)}): run longer or sample more often")
        return
    first, last = steady[0], steady[-1]
    growth = growth_ratio(first.rss_bytes, last.rss_bytes)
    slope = slope_per_min([(s.t_unix_s, s.rss_bytes / 2**20) for s in steady])
    fd_slope = slope_per_min([(s.t_unix_s, float(s.fds)) for s in steady])
    peak = max(s.rss_bytes for s in samples)
    print(f"client RSS after warm-up (t={first.t_unix_s - stage0:.0f} s): {first.rss_bytes / 2**20:.1f} MiB; "
          f"at the end of the stage (t={last.t_unix_s - stage0:.0f} s): {last.rss_bytes / 2**20:.1f} MiB; "
          f"growth {growth * 100:+.1f} % (target < {GROWTH_TARGET_RATIO * 100:.0f} %: "
          f"{'met' if growth < GROWTH_TARGET_RATIO else 'NOT met'}); slope {slope:+.2f} MiB/min; "
          f"peak {peak / 2**20:.1f} MiB")
    print(f"open fds after warm-up {first.fds}, at the end of the stage {last.fds}, min..max over the steady part "
          f"{min(s.fds for s in steady)}..{max(s.fds for s in steady)}, slope {fd_slope:+.2f}/min; "
          f"TCP connections {first.tcp_connections} -> {last.tcp_connections}; "
          f"last sample (users stopping) {samples[-1].fds} fds, {samples[-1].tcp_connections} TCP")
    span_s = last.t_unix_s - first.t_unix_s
    rate = (last.records - first.records) / span_s if span_s > 0 else math.nan
    cpu = cpu_ratio(steady)
    print(f"steady part: {rate:.1f} requests/s; client CPU {cpu:.2f} cores"
          + (" (saturated: the client's own timings are suspect)" if cpu > 0.9 else ""))


def _stage_start_unix_s(run_dir: Path) -> float | None:
    from envelope.stages import read_stages

    try:
        return float(read_stages(run_dir)[0].start_unix_s)
    except (OSError, ValueError, LookupError):
        return None


def _thin(rows: list, n: int) -> list:
    """At most ``n`` rows, evenly spaced, always keeping the last."""
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    picked = [rows[int(i * step)] for i in range(n)]
    return picked[:-1] + [rows[-1]]


if __name__ == "__main__":
    sys.exit(main())
