"""Time the analysis on a large synthetic run: ``python benchmarks/analysis_1m.py [--records N]``.

Writes N synthetic records (default 1,000,000) as JSON lines into a temporary
run directory, split over 4 worker files and 4 stages (1, 5, 10, 20 users), then
runs ``load_run``, the table and the full report in a child process and prints
wall time per step and the child's peak RSS.

Each record has 32 content chunks of 4 tokens (128 output tokens): real 128-chunk
records would be ~128M floats for 1M requests, which measures the JSON parser
more than the analysis, so the chunk count is cut and the tokens per chunk kept.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from envelope.stages import StageRecord, WorkloadSummary, write_stages

CHUNKS = 32
TOKENS_PER_CHUNK = 4
USERS = (1, 5, 10, 20)


def generate(root: Path, n: int, *, seed: int = 1) -> None:
    """Write run.json, stages.json and ``n`` records (4 worker files) into ``root``."""
    rng = np.random.default_rng(seed)
    t0 = 1_795_000_000.0
    per_stage = n // len(USERS)
    stage_s = 600.0
    records = [StageRecord(pass_name="sweep", stage_index=i, stage_name=f"sweep-{users}", target_users=users,
                           spawn_rate=10.0, duration_s=stage_s, start_unix_s=t0 + i * stage_s,
                           end_unix_s=t0 + (i + 1) * stage_s,
                           slos={"ttft_p95_ms": 2000, "e2e_p95_ms": 20000, "error_rate_max": 0.01},
                           workload=WorkloadSummary(prompt_tokens=300, output_tokens=128))
               for i, users in enumerate(USERS)]
    write_stages(root, records)
    stages = [s.to_json() for s in records]
    (root / "run.json").write_bytes(orjson.dumps({
        "run_id": "bench", "status": "complete", "options": {}, "started_unix_s": t0,
        "ended_unix_s": t0 + len(USERS) * stage_s,
    }))
    rec_dir = root / "records"
    rec_dir.mkdir()
    files = [open(rec_dir / f"bench_{w}.jsonl", "wb") for w in range(4)]
    try:
        k = 0
        for i, stage in enumerate(stages):
            count = per_stage if i < len(USERS) - 1 else n - per_stage * (len(USERS) - 1)
            done = 0
            while done < count:
                b = min(20_000, count - done)
                starts = (stage["start_unix_s"] + np.sort(rng.uniform(0, stage_s, b))).tolist()
                ttft = rng.gamma(2.0, 0.1 * (1 + i), b)
                gaps = rng.gamma(4.0, 0.01, (b, CHUNKS))
                gaps[:, 0] = 0.0
                offsets = (ttft[:, None] + np.cumsum(gaps, axis=1)).round(6)
                failed = rng.random(b) < 0.002
                lines = [[] for _ in files]
                for j in range(b):
                    t_start = 1000.0 + (starts[j] - t0)
                    rec = {
                        "run_id": "bench", "request_id": f"r{k}", "worker_id": f"bench:{k % 4}",
                        "client": "chat", "endpoint": "chat", "pass_name": "sweep", "stage_index": i,
                        "stage_name": stage["stage_name"], "wall_start_unix_s": starts[j],
                        "t_start_s": t_start, "prompt_tokens": 300, "requested_output_tokens": 128,
                        "schema": 1,
                    }
                    if failed[j]:
                        rec.update(t_done_s=t_start + 0.5, error_category="http_500", http_status=500)
                    else:
                        off = offsets[j].tolist()
                        rec.update(
                            t_first_byte_s=t_start + 0.01, t_first_event_s=t_start + 0.01,
                            t_first_token_s=t_start + off[0], t_last_token_s=t_start + off[-1],
                            t_done_s=t_start + off[-1] + 0.001, chunk_offsets_s=off,
                            chunk_tokens=[TOKENS_PER_CHUNK] * CHUNKS,
                            output_tokens=CHUNKS * TOKENS_PER_CHUNK, http_status=200,
                        )
                    lines[k % 4].append(orjson.dumps(rec))
                    k += 1
                for fh, chunk in zip(files, lines):
                    fh.write(b"\n".join(chunk) + b"\n")
                done += b
    finally:
        for fh in files:
            fh.close()


def _child(run_dir: str, out_dir: str) -> None:
    from analysis.load import load_run
    from analysis.report import write_report
    from analysis.table import envelope_table

    times = {}
    t = time.perf_counter()
    run = load_run(run_dir)
    times["load_run"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = envelope_table(run)
    times["envelope_table"] = time.perf_counter() - t
    t = time.perf_counter()
    write_report(run, out_dir)
    times["write_report (table again + graphs + md/html)"] = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_rss_mib": peak_mib, "records": len(run.frame),
                      "stages": len(rows), "p95_ttft_ms": [r["ttft_p95_ms"] for r in rows]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="envelope-bench-"))
    try:
        t = time.perf_counter()
        generate(tmp, args.records)
        gen_s = time.perf_counter() - t
        size_mib = sum(f.stat().st_size for f in (tmp / "records").iterdir()) / 2**20
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(tmp), str(tmp / "report")],
                              capture_output=True, text=True)
        total_s = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"records: {res['records']:,} ({CHUNKS} chunks x {TOKENS_PER_CHUNK} tokens each), "
              f"{size_mib:,.0f} MiB of JSON lines, generated in {gen_s:.1f} s")
        print(f"{'step':<48} {'wall s':>8}")
        for step, s in res["times"].items():
            print(f"{step:<48} {s:>8.1f}")
        print(f"{'child process total (incl. imports)':<48} {total_s:>8.1f}")
        print(f"{'peak RSS of the child (MiB)':<48} {res['peak_rss_mib']:>8.0f}")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
