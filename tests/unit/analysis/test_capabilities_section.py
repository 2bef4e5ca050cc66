"""The report's "Server capabilities" section, from probed capabilities (recorded servers) and records."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pandas as pd
import pytest

from analysis.capabilities import capabilities_lines, capability_table, output_length_rows, output_length_table
from envelope.capabilities import probe_capabilities, with_local_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "capabilities"


def probed(name: str):
    rec = json.loads((FIXTURES / name).read_text())

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        for ex in rec["exchanges"]:
            if (ex["method"], ex["path"]) == (request.method, request.url.path) and (
                    body is None or (ex["forced"], ex["stream_options"]) == ("min_tokens" in body,
                                                                             "stream_options" in body)):
                if isinstance(ex["status"], str):
                    raise httpx.ReadError(ex["status"], request=request)
                return httpx.Response(ex["status"], headers={"content-type": ex["content_type"]}, text=ex["body"])
        return httpx.Response(404)

    with httpx.Client(base_url="http://s", transport=httpx.MockTransport(handle)) as client:
        return probe_capabilities(client, model=rec["model"], paths=("/v1/chat/completions",),
                                  models_listed=name == "vllm.json", tokenize=name == "vllm.json")


def test_vllm_needs_no_substitute():
    caps = probed("vllm.json")
    lines = capabilities_lines(caps, pd.DataFrame({"output_tokens_estimated": [False, False]}))
    assert lines == ["The server did everything the workloads ask of vLLM.",
                     "Token counts of the 2 requests: the server's usage."]
    rows = {row[0]: row[1:] for row in capability_table(caps)[1:]}
    assert rows["POST /tokenize"] == ("yes", "prompts sized by the server's /tokenize (exact)")
    assert rows["GET /metrics"][0].startswith("yes: batch slots and queue (running, waiting), KV-cache usage")
    assert rows["/v1/chat/completions: usage in the stream"] == (
        "in every chunk", "tokens per chunk from the server's running count")
    assert rows["/v1/chat/completions: fixed output length (min_tokens, ignore_eos)"] == ("honoured", "-")
    assert rows["/v1/chat/completions: data: [DONE] at the end"] == ("yes", "-")


def test_transformers_serve_says_what_was_missing_and_how_each_number_was_obtained():
    caps = with_local_tokenizer(probed("transformers-serve.json"), "/models/tiny")
    lines = capabilities_lines(caps, pd.DataFrame({"output_tokens_estimated": [False] * 3}))
    assert lines[0] == ("Probed before any load, the server differs from vLLM in: no model list; no /tokenize; "
                        "no /metrics; /v1/chat/completions: usage only at the end; /v1/chat/completions: no [DONE]; "
                        "/v1/chat/completions: fixed output length rejected.")
    assert lines[1] == "Token counts of the 3 requests: the server's usage."  # it gives usage at the end
    rows = {row[0]: row[1:] for row in capability_table(caps)[1:]}
    assert rows["POST /tokenize"] == ("no", "prompts sized with the model's tokenizer (/models/tiny), exact")
    assert rows["GET /metrics"][0] == "no" and "KV cache" in rows["GET /metrics"][1]
    usage = rows["/v1/chat/completions: usage in the stream"]
    assert usage[0] == "only at the end of the stream" and "server's final count" in usage[1]
    forced = rows["/v1/chat/completions: fixed output length (min_tokens, ignore_eos)"]
    assert forced[0].startswith("refused (HTTP 422") and "max_tokens only" in forced[1]
    assert rows["/v1/chat/completions: data: [DONE] at the end"] == (
        "no", "a stream is complete when its finish_reason arrives")


def test_output_lengths_asked_and_given_per_stage():
    frame = pd.DataFrame({
        "stage_index": [0, 0, 0, 0, 1, 1],
        "ok": [True, True, True, False, True, True],
        "requested_output_tokens": pd.array([32, 32, 32, 32, 64, 64], dtype="Int64"),
        "output_tokens": pd.array([32, 10, 32, 1, 64, 64], dtype="Int64"),
    })
    rows = output_length_rows(frame, {0: "a", 1: "b"})
    assert [(r.stage_name, r.requests, r.asked_tokens_p50, r.given_tokens_p50) for r in rows] == [
        ("a", 3, 32.0, 32.0), ("b", 2, 64.0, 64.0)]
    assert rows[0].short_of_asked_ratio == pytest.approx(1 / 3) and rows[1].short_of_asked_ratio == 0.0
    assert output_length_table(rows)[1] == ("a", "3", "32", "12", "32", "32", "33%")


def test_a_run_without_a_probe_says_so():
    (line,) = capabilities_lines(None, None)
    assert line.startswith("This run has no capabilities.json")
