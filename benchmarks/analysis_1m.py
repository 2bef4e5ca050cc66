"""Time the analysis on a large synthetic run: ``python benchmarks/analysis_1m.py [--records N]``.

Writes N synthetic records (default 1,000,000) as JSON lines into a temporary
run directory, split over 4 worker files and 4 stages (1, 5, 10, 20 users), then
runs ``load_run``, the table and the full report in a child process and prints
wall time per step and the child's peak RSS after each step; then does it again
(``--runs``), when the first analysis has left its Parquet copy of the records in cache/.

Each record has 128 content chunks of 1 token (``--chunks``, ``--tokens-per-chunk``):
what a 128-token streamed reply from vLLM carries, so a million records hold
128 million chunk offsets. ``--run-dir`` keeps the generated run (generated once,
reused after), so that two versions of the analysis read the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from envelope.stages import StageRecord, WorkloadSummary, write_stages

CHUNKS = 128
TOKENS_PER_CHUNK = 1
USERS = (1, 5, 10, 20)


def generate(root: Path, n: int, *, chunks: int = CHUNKS, tokens_per_chunk: int = TOKENS_PER_CHUNK,
             seed: int = 1) -> None:
    """Write run.json, stages.json and ``n`` records (4 worker files) into ``root``."""
    rng = np.random.default_rng(seed)
    t0 = 1_795_000_000.0
    per_stage = n // len(USERS)
    stage_s = 600.0
    records = [StageRecord(pass_name="sweep", stage_index=i, stage_name=f"sweep-{users}", target_users=users,
                           spawn_rate=10.0, duration_s=stage_s, start_unix_s=t0 + i * stage_s,
                           end_unix_s=t0 + (i + 1) * stage_s,
                           slos={"ttft_p95_ms": 2000, "e2e_p95_ms": 20000, "error_rate_max": 0.01},
                           workload=WorkloadSummary(prompt_tokens=300, output_tokens=chunks * tokens_per_chunk))
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
                gaps = rng.gamma(4.0, 0.01 * tokens_per_chunk, (b, chunks))
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
                        "t_start_s": t_start, "prompt_tokens": 300, "requested_output_tokens": chunks * tokens_per_chunk,
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
                            chunk_tokens=[tokens_per_chunk] * chunks,
                            output_tokens=chunks * tokens_per_chunk, http_status=200,
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

    def peak_mib() -> float:
        # VmHWM is this process's own peak; ru_maxrss would start at the parent's RSS at the fork
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    steps = {}
    imported = peak_mib()
    t = time.perf_counter()
    run = load_run(run_dir)
    steps["load_run"] = (time.perf_counter() - t, peak_mib())
    t = time.perf_counter()
    rows = envelope_table(run)
    steps["envelope_table"] = (time.perf_counter() - t, peak_mib())
    t = time.perf_counter()
    write_report(run, out_dir)
    steps["write_report (table again + graphs + md/html)"] = (time.perf_counter() - t, peak_mib())
    print(json.dumps({"steps": steps, "peak_rss_mib": peak_mib(), "imports_rss_mib": imported,
                      "records": len(run.frame), "chunks": run.chunks.total_chunks,
                      "stages": len(rows), "p95_ttft_ms": [r["ttft_p95_ms"] for r in rows],
                      "p95_itl_ms": [r["itl_p95_ms"] for r in rows],
                      "tokens_per_s": [r["aggregate_output_tokens_per_s"] for r in rows]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--chunks", type=int, default=CHUNKS, help="content chunks per successful record")
    p.add_argument("--tokens-per-chunk", type=int, default=TOKENS_PER_CHUNK)
    p.add_argument("--run-dir", type=Path, help="generate the run here (or reuse it if it holds records) and keep it")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    p.add_argument("--runs", type=int, default=2,
                   help="analyses in a row: the first reads the JSON lines, later ones the Parquet copy it left")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    if args.run_dir is not None:
        tmp = args.run_dir
        args.keep = True
    else:
        tmp = Path(tempfile.mkdtemp(prefix="envelope-bench-"))
    try:
        t = time.perf_counter()
        if (tmp / "records").is_dir():
            gen = "reused"
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            generate(tmp, args.records, chunks=args.chunks, tokens_per_chunk=args.tokens_per_chunk)
            gen = f"generated in {time.perf_counter() - t:.1f} s"
        size_mib = sum(f.stat().st_size for f in (tmp / "records").iterdir()) / 2**20
        shutil.rmtree(tmp / "cache", ignore_errors=True)  # the first analysis reads the JSON lines
        for i in range(args.runs):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(tmp), str(tmp / "report")],
                                  capture_output=True, text=True)
            total_s = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            cached = (tmp / "cache" / "records").is_dir() and any((tmp / "cache" / "records").iterdir())
            if i == 0:
                print(f"records: {res['records']:,}, content chunks: {res['chunks']:,}, "
                      f"{size_mib:,.0f} MiB of JSON lines ({gen}), {os.cpu_count()} CPUs")
            print(f"\nanalysis {i + 1} of {args.runs}" + (" (cache/ written by the one before)" if i else "")
                  + (f"; cache/records holds {_size_mib(tmp / 'cache' / 'records'):,.0f} MiB" if cached else ""))
            print(f"{'step':<48} {'wall s':>8} {'peak RSS so far, MiB':>21}")
            print(f"{'(imports)':<48} {'':>8} {res['imports_rss_mib']:>21.0f}")
            for step, (s, rss) in res["steps"].items():
                print(f"{step:<48} {s:>8.1f} {rss:>21.0f}")
            print(f"{'child process total (incl. imports)':<48} {total_s:>8.1f} {res['peak_rss_mib']:>21.0f}")
            print("p95 TTFT ms per stage:", [round(v, 3) for v in res["p95_ttft_ms"]])
            print("p95 ITL ms per stage:", [round(v, 4) for v in res["p95_itl_ms"]])
            print("output tokens/s per stage:", [round(v, 3) for v in res["tokens_per_s"]])
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
