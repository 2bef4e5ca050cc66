"""Builders for small synthetic run directories with hand-checkable numbers."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest

_ids = itertools.count()


def make_record(stage: dict, start_unix_s: float, ttft_s: float, *, tokens: int = 11, gap_s: float = 0.05,
                error: str | None = None, done_after_s: float = 0.2, prompt_tokens: int = 300) -> dict:
    """A chat record: ``tokens`` one-token chunks, the first at ``ttft_s``, then every ``gap_s``."""
    t0 = 500.0 + start_unix_s  # a perf_counter unrelated to wall time
    rec = {
        "run_id": "r", "request_id": f"q{next(_ids)}", "worker_id": "h:1", "client": "chat",
        "endpoint": "chat", "pass_name": stage["pass_name"], "stage_index": stage["stage_index"],
        "stage_name": stage["stage_name"], "wall_start_unix_s": start_unix_s, "t_start_s": t0,
        "prompt_tokens": prompt_tokens, "requested_output_tokens": tokens, "schema": 1,
    }
    if error is None:
        offsets = [round(ttft_s + i * gap_s, 9) for i in range(tokens)]
        rec.update(t_first_token_s=t0 + offsets[0], t_last_token_s=t0 + offsets[-1], t_done_s=t0 + offsets[-1] + 0.001,
                   chunk_offsets_s=offsets, chunk_tokens=[1] * tokens, output_tokens=tokens, http_status=200)
    else:
        rec.update(t_done_s=t0 + done_after_s, error_category=error, http_status=500, output_tokens=None)
    return rec


def make_stage(index: int, users: int, start: float, end: float, *, pass_name: str = "sweep",
               slos: dict | None = None, spawn_rate: float = 1.0) -> dict:
    return {
        "pass_index": 0, "pass_name": pass_name, "stage_index": index, "stage_name": f"{pass_name}-{users}",
        "kind": "users", "target_users": users, "spawn_rate": spawn_rate, "target_rate_per_s": None,
        "duration_s": end - start, "start_unix_s": start, "end_unix_s": end,
        "slos": slos if slos is not None else {"ttft_p95_ms": 2000, "error_rate_max": 0.01},
        "workload": {"prompt_tokens": 300, "output_tokens": 11, "long_context": False},
    }


def write_run(root: Path, *, stages: list[dict] | None, records: list[dict], run_json: bool = True,
              metrics: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if run_json:
        start = min(s["start_unix_s"] for s in stages) if stages else 1000.0
        (root / "run.json").write_bytes(orjson.dumps({
            "run_id": root.name, "status": "complete", "options": {"api_key": "***"},
            "started_unix_s": start, "ended_unix_s": None,
        }))
    if stages is not None:
        (root / "stages.json").write_bytes(orjson.dumps(stages))
    (root / "records").mkdir(exist_ok=True)
    (root / "records" / "h_1.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    if metrics is not None:
        (root / "telemetry").mkdir(exist_ok=True)
        (root / "telemetry" / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in metrics))
    return root


@pytest.fixture
def builders():
    """(make_stage, make_record, write_run)."""
    return make_stage, make_record, write_run


@pytest.fixture
def known_run(tmp_path):
    """One stage, window [1010, 1060] with settle 8 s; numbers worked out in test_table.py."""
    st = make_stage(0, 2, 1000.0, 1060.0, spawn_rate=1.0)
    recs = [make_record(st, 1010.0 + 10 * i, ttft) for i, ttft in enumerate((0.1, 0.2, 0.3, 0.4))]
    recs.append(make_record(st, 1001.0, 1.0))  # before the window
    recs.append(make_record(st, 1050.0, 0.0, error="http_500", done_after_s=0.2))
    return write_run(tmp_path / "known", stages=[st], records=recs)
