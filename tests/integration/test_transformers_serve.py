"""The second real engine: `envelope run` launches `transformers serve` on the tiny model and adapts to it.

transformers serve 5.19 refuses vLLM's min_tokens/ignore_eos (HTTP 422), gives usage only in the finish
chunk, ends its streams without [DONE], and has no /tokenize and no /metrics. A run against it must still
measure every request correctly: the probe learns this before the first stage, requests go without the
refused fields, a stream is complete at its finish_reason, prompts are sized with the model's own
tokenizer, and the report says what was missing and how each number was obtained instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.locust_runs import REPO, records

pytestmark = [pytest.mark.slow]

OUTPUT_TOKENS = 24
PROMPT_TOKENS = 48


def _scenario(tmp_path: Path, name: str, durations: tuple[int, int]) -> Path:
    data = {
        "name": name, "seed": 0,
        "defaults": {"client": "fasthttp", "endpoint": "chat",
                     "timeouts": {"connect_s": 10, "first_token_s": 60, "total_s": 120},
                     "workload": {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                                  "fixed_output": True},
                     "slos": {"ttft_p95_ms": 5000}},
        "passes": [{"name": "two", "stages": [{"users": 1, "duration_s": durations[0]},
                                              {"users": 2, "duration_s": durations[1]}]}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _envelope_run(tmp_path: Path, scenario: Path, *extra: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_API")}
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from envelope.cli import main; sys.exit(main())", "run",
         "--scenario", str(scenario), "--out", str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    from server.tiny_model import ensure_tiny_model

    return Tokenizer.from_file(str(Path(ensure_tiny_model()) / "tokenizer.json"))


@pytest.mark.timeout(600)
def test_a_run_against_transformers_serve_counts_every_token_with_the_models_tokenizer(tmp_path, tokenizer):
    run_dir = _envelope_run(tmp_path, _scenario(tmp_path, "tf-plain", (8, 8)), "--profile", "cpu-tiny-transformers",
                            "--record-text", "--count-tokens", "tokenizer")
    server = json.loads((run_dir / "server.json").read_text())
    assert (server["engine"], server["continuous_batching"]) == ("transformers", False)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"

    caps = json.loads((run_dir / "capabilities.json").read_text())
    (chat,) = caps["endpoints"]
    assert (chat["forced_output"], chat["usage"], chat["done_marker"]) == ("rejected", "final", False)
    assert "min_tokens" in chat["refused"] and "422" in chat["refused"]
    assert (caps["metrics"], caps["tokenize"], caps["models_listed"]) == (False, False, False)
    assert (caps["prompt_sizing"], caps["token_counting"]) == ("tokenizer", "tokenizer")

    recs = records(run_dir)
    by_stage = {r["stage_name"] for r in recs}
    assert len(by_stage) == 2 and len(recs) >= 10, (by_stage, len(recs))
    assert [r for r in recs if r["error_category"] is not None] == []  # none missing_usage or incomplete
    for r in recs:
        assert r["token_source"] == "tokenizer"
        # the answer counted as a direct tokenization of its text (with the tokenizer file itself)
        assert r["output_tokens"] == len(tokenizer.encode(r["completion_text"] or "", add_special_tokens=False).ids)
        # prompts sized with the local tokenizer are what the server counted, exactly
        assert r["prompt_tokens"] == r["prompt_tokens_server"] == r["requested_prompt_tokens"] == PROMPT_TOKENS
        # the server's own count, kept beside: max_tokens was honoured (the tiny model does not stop early)
        assert 0 < r["output_tokens_server"] <= OUTPUT_TOKENS
        assert r["requested_output_tokens"] == OUTPUT_TOKENS

    report = (run_dir / "report" / "envelope.md").read_text()
    section = report.split("## Server capabilities\n", 1)[1].split("\n## ", 1)[0]
    assert "Engine: transformers serve" in section and "one request at a time" in section
    assert "fixed output length rejected" in section and "no [DONE]" in section and "no /metrics" in section
    assert "prompts sized with the model's tokenizer" in section
    assert "| stage | requests | asked (p50) | given p5 | given p50 | given p95 | short of asked |" in section
    assert "the server has no /metrics" in report  # what broke first says what it could not see


@pytest.mark.timeout(600)
def test_continuous_batching_serves_two_users_with_the_servers_own_counts(tmp_path):
    """The -cb profile, counted as by default: usage from the server (it gives a final count)."""
    run_dir = _envelope_run(tmp_path, _scenario(tmp_path, "tf-cb", (6, 6)), "--profile", "cpu-tiny-transformers-cb")
    server = json.loads((run_dir / "server.json").read_text())
    assert (server["engine"], server["continuous_batching"]) == ("transformers", True)
    assert server["kv_cache"]["kv_cache_tokens"] == 512 * 32
    recs = records(run_dir)
    assert len(recs) >= 6 and [r for r in recs if r["error_category"] is not None] == []
    assert {r["token_source"] for r in recs} == {"server"}
    assert all(r["output_tokens_estimated"] is False and r["prompt_tokens"] == PROMPT_TOKENS for r in recs)
    assert all(r.get("completion_text") is None for r in recs)  # not recorded without --record-text
    # two users were in flight together at some moment: their requests overlapped in time
    two = sorted((r["wall_start_unix_s"], r["wall_start_unix_s"] + r["t_done_s"] - r["t_start_s"])
                 for r in recs if r["stage_name"].endswith("2u") or r["stage_index"] == 1)
    assert any(b0 < a1 for (_, a1), (b0, _) in zip(two, two[1:])), two
