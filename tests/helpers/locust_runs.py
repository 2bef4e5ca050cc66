"""Running our locustfile as a subprocess (as users do) and reading what it wrote."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from envelope.records import iter_record_files, read_records
from envelope.telemetry import parse_vllm_metrics

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "locustfiles" / "llm.py"


def run_locust(host: str, api_key: str | None, scenario: Path, run_dir: Path, *extra: str,
               timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    if api_key:
        env["ENVELOPE_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--scenario", str(scenario),
           "--host", host, "--run-dir", str(run_dir), "--csv", str(run_dir / "locust" / "locust"),
           "--only-summary", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def probe_tokens(run_dir: Path) -> tuple[int, int]:
    """(output, prompt) tokens the run's capability probe made the server count before the load
    (``capabilities.json``): in the server's counters, in no record."""
    from envelope.capabilities import read_capabilities

    caps = read_capabilities(run_dir)
    return (0, 0) if caps is None else (caps.probe_output_tokens, caps.probe_prompt_tokens)


def records(run_dir: Path) -> list[dict]:
    return list(read_records(iter_record_files(run_dir)))


def locust_request_count(run_dir: Path, *request_types: str) -> int:
    """Locust's request count for the given entry types (default: every request, E2E + CANCELLED)."""
    types = set(request_types or ("E2E", "CANCELLED"))
    with open(run_dir / "locust" / "locust_stats.csv", newline="") as fh:
        return sum(int(row["Request Count"]) for row in csv.DictReader(fh) if row["Type"] in types)


def generation_tokens_total(metrics_url: str) -> float:
    return parse_vllm_metrics(httpx.get(metrics_url, timeout=10).text)["generation_tokens_total"]


def stages(run_dir: Path) -> list[dict]:
    """stages.json's entries as dicts, through its one reader (FileNotFoundError / ValueError when unusable)."""
    from envelope.stages import read_stages

    return [s.to_json() for s in read_stages(run_dir)]


def files_containing(run_dir: Path, needle: str) -> list[Path]:
    hits = []
    for path in run_dir.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(path)
    return hits
