"""Real workloads against the session's real vLLM (cpu-tiny): a multi-turn chat, a workload that shares
no prefix, and two client classes with SLOs of their own, in one short ``envelope run`` (which also
records the server's ``/metrics``, where the prefix-cache counters come from).

- Each turn of a conversation sends the whole history: the server's ``usage.prompt_tokens``
  grows by the previous answer (as the model tokenizes its text) plus the new message, plus
  the template's fixed tokens for one more turn.
- The server's prefix cache hits the histories, and (nearly) never the synthetic prompts,
  which differ from their first token.
- Two classes sharing a stage get a row and a sentence each.

A conversation of 4 short turns takes ~0.6 s here, so the 12 s conversation stage completes dozens (40 in
one run; 20 s gave 90, each checked against the server's tokenizer), and its window (the last 6 s) holds
turns past the first, whose histories the prefix cache hits (a ratio of 0.50 in 12 s as in 20 s).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict

import httpx
import pytest

from analysis.load import load_run
from analysis.table import envelope_table
from helpers.locust_runs import REPO, records

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MESSAGE_TOKENS = 40

SCENARIO = f"""\
name: workloads
record_text: true
defaults:
  timeouts: {{connect_s: 10, first_token_s: 60, total_s: 120}}
  workload: {{prompt_tokens: 120, output_tokens: 24, fixed_output: true}}
  slos: {{error_rate_max: 0.05}}
clients:
  - name: chat-app
    slos: {{ttft_p95_ms: 5000}}
  - name: eval-runner
    rate_per_s: 1
    workload: {{prompt_tokens: 300, output_tokens: 16}}
    slos: {{e2e_p95_ms: 60000}}
passes:
  - name: conv
    clients: [chat-app]
    workload:
      conversation: {{turns: 4, message_tokens: {MESSAGE_TOKENS}, answers: server}}
    stages: [{{users: 2, duration_s: 12}}]
  - name: single
    clients: [chat-app]
    stages: [{{users: 2, duration_s: 12}}]
  - name: tenants
    stages: [{{name: both, users: 2, duration_s: 15}}]
"""


@pytest.fixture(scope="module")
def workloads_run(vllm_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("workloads")
    scenario = base / "workloads.yaml"
    scenario.write_text(SCENARIO)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    env["ENVELOPE_API_KEY"] = vllm_server.api_key.get()
    proc = subprocess.run([sys.executable, "-m", "envelope.cli", "run", "--scenario", str(scenario),
                           "--host", vllm_server.base_url, "--out", str(base / "runs")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (base / "runs").iterdir()
    return run_dir


def _count(vllm_server, path: str, body: dict) -> int:
    resp = httpx.post(vllm_server.base_url + path, json={"model": vllm_server.served_model_name, **body},
                      headers={"Authorization": f"Bearer {vllm_server.api_key.get()}"}, timeout=30)
    resp.raise_for_status()
    return int(resp.json()["count"])


def test_a_conversations_prompt_grows_by_the_last_answer_and_the_new_message(workloads_run, vllm_server):
    conversations = defaultdict(list)
    for r in records(workloads_run):
        if r["conversation_id"] is not None and r["error_category"] is None:
            conversations[r["conversation_id"]].append(r)
    whole = [sorted(turns, key=lambda r: r["turn_index"]) for turns in conversations.values()
             if sorted(t["turn_index"] for t in turns) == [0, 1, 2, 3]]
    assert whole, f"no 4-turn conversation completed: {dict(conversations)}"
    # what one more turn adds around its answer and message, as the server's own template counts it
    one = [{"role": "user", "content": " a"}]
    two = one + [{"role": "assistant", "content": " b"}, {"role": "user", "content": " c"}]
    turn_overhead = (_count(vllm_server, "/tokenize", {"messages": two, "add_generation_prompt": True})
                     - _count(vllm_server, "/tokenize", {"messages": one, "add_generation_prompt": True}) - 2)
    empty = _count(vllm_server, "/tokenize", {"messages": [{"role": "assistant", "content": ""}],
                                              "add_generation_prompt": False})

    def in_template(answer: str) -> int:  # the answer's tokens where the template puts it
        return _count(vllm_server, "/tokenize", {"messages": [{"role": "assistant", "content": answer}],
                                                 "add_generation_prompt": False}) - empty

    for turns in whole:
        for before, after in zip(turns, turns[1:]):
            answer = in_template(before["completion_text"])
            grew = after["prompt_tokens"] - before["prompt_tokens"]
            assert grew == answer + MESSAGE_TOKENS + turn_overhead, (before["turn_index"], grew, answer, turn_overhead)
            # our own count of the next prompt, made before sending it, takes the answer's generated tokens
            # for its length once in the history (the text, tokenized again, can differ)
            assert after["requested_prompt_tokens"] - after["prompt_tokens"] == before["output_tokens"] - answer


def test_prefix_cache_hits_the_histories_and_not_the_synthetic_prompts(workloads_run):
    rows = {r.stage_name: r for r in envelope_table(load_run(workloads_run))}
    conv, single = rows["conv-2u"], rows["single-2u"]
    assert conv.server.server_prefix_cache_hit_ratio is not None and conv.server.server_prefix_cache_hit_ratio > 0.3
    assert single.server.server_prefix_cache_hit_ratio is not None and single.server.server_prefix_cache_hit_ratio < 0.1
    report = (workloads_run / "report" / "envelope.md").read_text()
    assert "By conversation turn" in report and "Prefix cache" in report


def test_two_classes_get_a_row_and_a_sentence_each(workloads_run):
    with open(workloads_run / "report" / "clients.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["stage_name"] == "both"]
    assert sorted(r["client"] for r in rows) == ["chat-app", "eval-runner"]
    report = (workloads_run / "report" / "envelope.md").read_text()
    section = report[report.index("## Per client class"):]
    section = section[:section.index("\n## ", 5)]
    assert "| tenants | both | 2 users | chat-app |" in section and "| tenants | both | 2 users | eval-runner |" in section
    assert "(pass tenants) chat-app meets its SLOs (TTFT p95 <= 5,000 ms, errors <= 5%)" in section
    assert "(pass tenants) eval-runner meets its SLOs (E2E p95 <= 60,000 ms, errors <= 5%)" in section
    # the chat app measured without the eval runner's load (single-2u) and with it (both)
    assert "chat-app's TTFT p95 was" in section and "without eval-runner (stage single-2u)" in section
