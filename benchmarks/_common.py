"""Shared parts of the client benchmarks: the simulator and Locust as pinned child processes,
matching client records to the simulator's truth, CPU accounting, and plain-text tables.

Clocks: a record's ``t_*_s`` are ``time.perf_counter()`` readings of the Locust
process; the simulator's truth ``t_*_s`` are ``time.perf_counter()`` readings of
the simulator process. On Linux both are ``clock_gettime(CLOCK_MONOTONIC)``, one
clock for every process on the machine, so the two sides are compared directly,
with no offset to estimate. :func:`check_shared_clock` refuses to run otherwise,
and every matched pair is checked for causality (the server cannot receive a
request before it was sent, nor the client a token before it was written).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envelope.records import iter_record_files, read_records  # noqa: E402

LOCUSTFILE = REPO / "locustfiles" / "llm.py"
SHARED_CLOCK = "clock_gettime(CLOCK_MONOTONIC)"

__all__ = [
    "REPO", "CpuPlan", "cpu_plan", "check_shared_clock", "wakeup_rtt_us", "start_sim", "pin", "CpuSampler", "write_scenario",
    "LocustRun", "run_locust", "processes_for", "fetch_truth", "Match", "match_truth", "errors_ms", "window_chunks", "pct",
    "median_of", "table", "machine_line",
]


# -- machine ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the simulator and the client may use (None: not pinned)."""

    server: frozenset[int] | None
    client: frozenset[int] | None

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (fewer than 2 CPUs available)"
        return f"simulator on CPU {_cpus(self.server)}, client on CPU {_cpus(self.client)}"


def _cpus(cpus: Iterable[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


def cpu_plan(*, server_cpus: str | None = None, client_cpus: str | None = None, client_count: int = 1) -> CpuPlan:
    """One CPU for the simulator, the next ``client_count`` for the client (as many as exist)."""
    available = sorted(os.sched_getaffinity(0))
    if server_cpus or client_cpus:
        parse = lambda text: frozenset(int(c) for c in text.split(",")) if text else None  # noqa: E731
        return CpuPlan(parse(server_cpus), parse(client_cpus))
    if len(available) < 2:
        return CpuPlan(None, None)
    client = available[1:1 + max(client_count, 1)]
    return CpuPlan(frozenset(available[:1]), frozenset(client))


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (what ``taskset -a -p`` does)."""
    if cpus is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


def check_shared_clock() -> None:
    """Exit with one line unless ``perf_counter`` is the machine-wide monotonic clock."""
    impl = time.get_clock_info("perf_counter").implementation
    if impl != SHARED_CLOCK:
        sys.exit(f"error: time.perf_counter is {impl}, not {SHARED_CLOCK}: client and simulator "
                 "timestamps cannot be compared on this platform")


def machine_line() -> str:
    """One line describing this machine: CPU model, cores, load."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load}"


_RTT_CODE = r"""
import os, socket, sys, time
server_cpu, client_cpu, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
a, b = socket.socketpair()
if os.fork() == 0:
    if server_cpu:
        os.sched_setaffinity(0, {int(c) for c in server_cpu.split(",")})
    a.close()
    while True:
        d = b.recv(64)
        if not d:
            os._exit(0)
        b.send(d)
b.close()
if client_cpu:
    os.sched_setaffinity(0, {int(c) for c in client_cpu.split(",")})
def rtts(n, idle_s):
    out = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)  # both sides fall asleep, as between two chunks of one stream
        t = time.perf_counter(); a.send(b"x"); a.recv(64); out.append(time.perf_counter() - t)
    out.sort()
    return out[len(out) // 2] * 1e6, out[int(len(out) * 0.99)] * 1e6
busy, idle = rtts(n, 0.0), rtts(max(n // 5, 100), 0.002)
a.close(); os.wait()
print(*busy, *idle)
"""


def wakeup_rtt_us(plan: "CpuPlan", n: int = 2000) -> tuple[float, float, float, float]:
    """Microseconds of a one-byte round trip between a process on the server CPU and one on the
    client CPU, back to back (p50, p99) and after 2 ms asleep (p50, p99): the floor under any
    latency measured across the two (each direction is a wake-up)."""
    out = subprocess.run([sys.executable, "-c", _RTT_CODE, _cpus(plan.server), _cpus(plan.client), str(n)],
                         capture_output=True, text=True, timeout=120)
    try:
        busy50, busy99, idle50, idle99 = (float(x) for x in out.stdout.split())
    except ValueError:
        return math.nan, math.nan, math.nan, math.nan
    return busy50, busy99, idle50, idle99


# -- processes -------------------------------------------------------------------------------------

def start_sim(config, cpus: frozenset[int] | None, *, log_path: Path | None = None):
    """The simulator as a child process (``SimProcess``), pinned to ``cpus``."""
    from server.sim import SimServer

    proc = SimServer(config).start_in_subprocess(log_path=log_path)
    pin(proc.pid, cpus)
    return proc


def _tree_cpu_s(pid: int) -> tuple[float, float]:
    """(CPU seconds used, seconds spent runnable but waiting for a CPU) so far, by ``pid`` and
    its live children. The second comes from /proc/<pid>/task/*/schedstat: time other
    processes held the CPU while ours had work (a busy machine), 0 where unavailable."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return math.nan, math.nan
    total = waited = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
        try:
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/schedstat") as fh:
                    waited += int(fh.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return total, waited


class CpuSampler:
    """Samples a process tree's CPU seconds on the monotonic clock, to integrate over any window.

    Children that exit take their CPU time with them (psutil sees only live
    ones), so a window should end before the processes stop.
    """

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, cpu s, run-queue wait s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cpu-{pid}", daemon=True)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu, waited = _tree_cpu_s(self.pid)
            if not math.isnan(cpu):
                self.samples.append((time.perf_counter(), cpu, waited))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_s(self, t0: float, t1: float) -> float:
        """CPU seconds used between perf_counter times ``t0`` and ``t1`` (linear between samples)."""
        return self._between(1, t0, t1)

    def waited_s(self, t0: float, t1: float) -> float:
        """Seconds the processes were runnable but another process had their CPU, in [t0, t1]."""
        return self._between(2, t0, t1)

    def _between(self, column: int, t0: float, t1: float) -> float:
        if len(self.samples) < 2:
            return math.nan
        ts = np.asarray([s[0] for s in self.samples])
        # a child that exited makes a total drop: keep the running maximum
        vs = np.maximum.accumulate(np.asarray([s[column] for s in self.samples]))
        return float(np.interp(t1, ts, vs) - np.interp(t0, ts, vs))


def write_scenario(path: Path, *, users: int | None = None, duration_s: float, output_tokens: int | tuple[int, int],
                   prompt_tokens: tuple[int, int] = (16, 2047), transport: str = "fasthttp",
                   spawn_rate: float | None = None, total_timeout_s: float = 300.0,
                   rate_per_s: float | None = None, arrival: str = "poisson") -> Path:
    """A one-stage scenario YAML: ``users`` closed-loop users for ``duration_s``, or (``rate_per_s``)
    an open-loop stage whose requests arrive at that rate (``arrival``: poisson, constant, gamma).

    Prompt lengths are drawn uniformly from ``prompt_tokens`` so that a request's
    (prompt tokens, output tokens) pair, reported by the server to both sides,
    helps tell requests apart when matching them to the truth.
    """
    def tokens(value: int | tuple[int, int]) -> str:
        low, high = (value, value) if isinstance(value, int) else value
        return f"{low}" if low == high else f"{{distribution: uniform, min: {low}, max: {high}}}"

    prompt, output = tokens(prompt_tokens), tokens(output_tokens)
    if rate_per_s is not None:
        stage = f"{{rate_per_s: {rate_per_s:g}, arrival: {arrival}, duration_s: {duration_s:g}}}"
        name = f"bench-{rate_per_s:g}rps"
    else:
        stage = f"{{users: {users}, spawn_rate: {spawn_rate or users:g}, duration_s: {duration_s:g}}}"
        name = f"bench-{users}u"
    text = f"""# written by benchmarks/ (not a shipped scenario)
name: {name}
seed: 0
model: null
defaults:
  client: {transport}
  endpoint: chat
  timeouts: {{connect_s: 30, first_token_s: 120, total_s: {total_timeout_s:g}}}
  workload:
    prompt_tokens: {prompt}
    output_tokens: {output}
    fixed_output: true
passes:
  - name: bench
    stages:
      - {stage}
"""
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class LocustRun:
    """One finished Locust subprocess: its run directory, exit code, and CPU over its stage."""

    run_dir: Path
    returncode: int
    records: list[dict]
    stage_start_s: float | None  # perf_counter time the stage began (from stages.json)
    stage_end_s: float | None
    sampler: CpuSampler
    log_path: Path

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def run_locust(host: str, scenario: Path, run_dir: Path, *, cpus: frozenset[int] | None, processes: int | None = 1,
               timeout_s: float = 600.0) -> LocustRun:
    """Run ``locust -f locustfiles/llm.py --headless`` on ``cpus``; wait; read its records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "locust.log"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--scenario", str(scenario),
           "--host", host, "--run-dir", str(run_dir), "--csv", str(run_dir / "locust" / "locust"),
           "--only-summary", "--loglevel", "WARNING"]
    if processes is not None and processes > 1:
        cmd += ["--processes", str(processes)]

    def pin_self() -> None:  # runs in the child before exec: Locust and every worker it forks inherit it
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=pin_self, start_new_session=True)
    sampler = CpuSampler(proc.pid).start()
    try:
        returncode = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        returncode = proc.wait()
    finally:
        sampler.stop()
    records = list(read_records(iter_record_files(run_dir)))
    start_s = end_s = None
    if (run_dir / "stages.json").exists() and records:
        from envelope.stages import read_stages

        stages = read_stages(run_dir)
        # wall clock -> perf_counter, by the records' own pairs (wall_start_unix_s, t_start_s)
        offset = float(np.median([r["wall_start_unix_s"] - r["t_start_s"] for r in records]))
        if stages:
            start_s = stages[0].start_unix_s - offset
            end = stages[-1].end_unix_s
            end_s = None if end is None else end - offset
    return LocustRun(run_dir, returncode, records, start_s, end_s, sampler, log_path)


def processes_for(spec: str | int, *, users: int | None = None, rate_per_s: float | None = None,
                  cpus: frozenset[int] | None = None) -> int | None:
    """The ``--processes`` to give Locust: ``spec`` as a number (None for 1: no workers, one
    process), or for ``"auto"`` what ``envelope run`` would choose for this load on ``cpus``
    (the client's CPUs; all of this machine's when not pinned)."""
    if str(spec) != "auto":
        n = int(spec)
        return None if n <= 1 else n
    from envelope.client_budget import choose_processes

    cores = len(cpus) if cpus else len(os.sched_getaffinity(0))
    return choose_processes(peak_streams=users, peak_rate_per_s=rate_per_s, cores=cores).locust_processes


def fetch_truth(base_url: str, since: int = 0) -> list[dict]:
    """The simulator's truth records from index ``since``."""
    import httpx

    return httpx.get(f"{base_url}/sim/truth", params={"since": since}, timeout=60).json()


# -- client versus truth ---------------------------------------------------------------------------

@dataclass
class Match:
    """Client records paired with the simulator's truth for the same request."""

    pairs: list[tuple[dict, dict]] = field(default_factory=list)
    unmatched: int = 0  # no truth record arrived while the request was being sent (should be 0)
    ambiguous: int = 0  # more than one truth record fitted (resolved by arrival order, see match_truth)
    causality_violations: int = 0  # one arrived then, but wrote its first token after the client read it


_EPS_S = 2e-6  # float rounding of perf_counter values around 1e5 s


def match_truth(records: Sequence[dict], truth: Sequence[dict]) -> Match:
    """Pair successful client records with truth records, one to one.

    A request's truth must have the same (prompt tokens, output tokens), as the
    server reported them to the client, an arrival between the client's send
    (``t_start_s``) and its first response byte (``t_first_byte_s``), and a
    first token written no later than the client read one. When
    several fit, requests are served in order of their windows' ends, each
    taking the earliest arrival still free in its window (the greedy rule that
    pairs the most intervals with points); dropping them instead would drop the
    slow requests, whose windows are the long ones.
    """
    index: dict[tuple[int, int], list[dict]] = {}
    for t in sorted((t for t in truth if t.get("outcome") == "ok" and t.get("stream")),
                    key=lambda t: t["t_arrival_s"]):
        index.setdefault((t["prompt_tokens"], t["tokens_sent"]), []).append(t)
    wanted: dict[tuple[int, int], list[tuple[float, float, dict]]] = {}
    for r in records:
        if r.get("error_category") is not None or r.get("t_first_token_s") is None:
            continue
        hi = (r.get("t_first_byte_s") or r.get("t_first_event_s") or r["t_first_token_s"]) + _EPS_S
        wanted.setdefault((r.get("prompt_tokens"), r.get("output_tokens")), []).append(
            (hi, r["t_start_s"] - _EPS_S, r))
    out = Match()
    for key, windows in wanted.items():
        items = index.get(key, [])
        arrivals = [t["t_arrival_s"] for t in items]
        free = list(range(len(items)))  # indexes of unassigned truth records, in arrival order
        for hi, lo, r in sorted(windows, key=lambda w: w[0]):
            i = _first_free_at_or_after(free, arrivals, lo)
            fitting = []
            for j in free[i:]:
                if arrivals[j] > hi:
                    break
                # the server cannot have written the first token after the client read it
                if items[j]["t_first_token_s"] <= r["t_first_token_s"] + _EPS_S:
                    fitting.append(j)
            if not fitting:
                # nothing fits both ways: a clock problem if the arrival window alone had a candidate
                if any(arrivals[j] <= hi for j in free[i:i + 1]):
                    out.causality_violations += 1
                else:
                    out.unmatched += 1
                continue
            if len(fitting) > 1:
                out.ambiguous += 1
            j = fitting[0]
            free.remove(j)
            out.pairs.append((r, items[j]))
    return out


def _first_free_at_or_after(free: list[int], arrivals: list[float], lo: float) -> int:
    """Position in ``free`` (sorted indexes into sorted ``arrivals``) of the first arrival >= lo."""
    a, b = 0, len(free)
    while a < b:
        mid = (a + b) // 2
        if arrivals[free[mid]] < lo:
            a = mid + 1
        else:
            b = mid
    return a


def errors_ms(pairs: Sequence[tuple[dict, dict]]) -> dict[str, np.ndarray]:
    """Per-request (and per-gap for ITL) client-minus-truth errors, in milliseconds.

    - ``ttft``: client TTFT - server TTFT = send delay + first-token delivery delay.
    - ``send``: server arrival - client send (request building, the network, the server's read).
    - ``first_token_lag``: client first-token time - server write time (delivery and client lag).
    - ``e2e``: client E2E (to the last content chunk) - server E2E (to the last token written).
    - ``itl``: each client inter-chunk gap - the server's gap between the same two chunks
      (requests whose chunk counts differ on the two sides are left out).
    """
    ttft, send, lag, e2e, itl = [], [], [], [], []
    for r, t in pairs:
        cs, ta = r["t_start_s"], t["t_arrival_s"]
        ttft.append((r["t_first_token_s"] - cs) - (t["t_first_token_s"] - ta))
        send.append(ta - cs)
        lag.append(r["t_first_token_s"] - t["t_first_token_s"])
        if r.get("t_last_token_s") is not None and t.get("t_last_token_s") is not None:
            e2e.append((r["t_last_token_s"] - cs) - (t["t_last_token_s"] - ta))
        co, to = r.get("chunk_offsets_s") or (), t.get("chunk_offsets_s") or ()
        if len(co) == len(to) and len(co) > 1:
            itl.append(np.diff(np.asarray(co)) - np.diff(np.asarray(to)))
    scale = 1000.0
    return {
        "ttft": np.asarray(ttft) * scale,
        "send": np.asarray(send) * scale,
        "first_token_lag": np.asarray(lag) * scale,
        "e2e": np.asarray(e2e) * scale,
        "itl": (np.concatenate(itl) if itl else np.asarray([])) * scale,
    }


def window_chunks(records: Iterable[dict], t0: float, t1: float) -> int:
    """Content chunks whose client arrival time falls in [t0, t1) (perf_counter seconds)."""
    n = 0
    for r in records:
        offsets = r.get("chunk_offsets_s")
        if not offsets:
            continue
        arr = r["t_start_s"] + np.asarray(offsets)
        n += int(np.count_nonzero((arr >= t0) & (arr < t1)))
    return n


def pct(values: np.ndarray, q: float) -> float:
    """The q-th percentile (numpy's linear interpolation), NaN when empty."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def median_of(rows: Sequence[dict], key: str) -> float:
    """The median of ``row[key]`` over repeats, ignoring NaN."""
    vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return float(np.median(vals)) if vals else math.nan


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)
