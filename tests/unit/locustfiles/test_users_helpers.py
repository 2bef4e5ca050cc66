"""Helpers of the Locust side: client assignment, the per-recv body reader, and when send_one fails a
stream for missing usage."""

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from locustfiles.transports import _read_some
from envelope.scenario import pick_client_name
from helpers.locust_runs import REPO


def test_weighted_round_robin_mixes_clients_in_proportion():
    clients = [("chat", 3.0), ("eval", 1.0)]
    names = [pick_client_name(clients, n) for n in range(8)]
    assert Counter(names) == {"chat": 6, "eval": 2}
    assert names[:4].count("eval") == 1  # never a run of four of one client when weights are 3:1


def test_single_client_always_chosen():
    assert {pick_client_name([("only", 1.0)], n) for n in range(5)} == {"only"}


class FakeSocket:
    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.calls = 0

    def recv(self, n):
        self.calls += 1
        return self.pieces.pop(0) if self.pieces else b""


class FakeResponse:
    """Mimics geventhttpclient's response: feed() parses into _body_buffer; end marks completion."""

    block_size = 4096

    def __init__(self, pieces, pre=b"", headers=None):
        self._sock = FakeSocket(pieces)
        self._body_buffer = bytearray(pre)
        self.message_complete = False
        self._headers = {"transfer-encoding": "chunked"} if headers is None else headers

    def get(self, key, default=None):
        return self._headers.get(key, default)

    def feed(self, data):
        if data == b"END":
            self.message_complete = True
            self._sock = None
            return
        if data != b"FRAMING":  # chunk framing alone parses to no body bytes
            self._body_buffer += data


def test_read_some_returns_each_recv_without_waiting_for_more():
    resp = FakeResponse([b"data: a\n\n", b"FRAMING", b"data: b\n\n", b"END"], pre=b"data: 0\n\n")
    assert _read_some(resp) == b"data: 0\n\n"  # already buffered with the headers: no recv
    assert resp._sock.calls == 0
    assert _read_some(resp) == b"data: a\n\n"
    assert _read_some(resp) == b"data: b\n\n"  # framing-only recv is skipped, not returned empty
    assert _read_some(resp) == b""


def test_read_some_reports_a_connection_closed_mid_stream():
    resp = FakeResponse([b"data: a\n\n"])
    assert _read_some(resp) == b"data: a\n\n"
    with pytest.raises(ConnectionResetError):
        _read_some(resp)


def test_read_some_ends_a_close_delimited_body_at_the_close():
    """Without Content-Length or chunking, the server's close is the end of the body, not a reset."""
    resp = FakeResponse([b"data: a\n\n"], headers={})
    assert _read_some(resp) == b"data: a\n\n"
    assert _read_some(resp) == b""


# -- send_one: missing usage fails only once this process has got usage from the server ------------

def _send_one_categories(sends: list[tuple[str, bool]]) -> dict:
    """Run send_one in a fresh interpreter (importing Locust monkey-patches the standard library,
    which must not happen inside pytest) with a transport that feeds a canned stream, for each
    (stream, asks for usage) in ``sends``: "usage" or "no_usage". Returns what the records said."""
    code = textwrap.dedent(f"""
        import json
        from types import SimpleNamespace
        from envelope.prompts import BuiltPrompt
        from locustfiles.sources import RequestPlan
        import locustfiles.users as users
        from locustfiles.transports import Outcome, RequestSpec

        def chunk(content, tokens=None):
            obj = {{"choices": [{{"index": 0, "delta": {{"content": content}}, "finish_reason": None}}]}}
            if tokens is not None:
                obj["usage"] = {{"prompt_tokens": 10, "completion_tokens": tokens}}
            return json.dumps(obj).encode()

        STREAMS = {{"usage": [chunk("a", 1), chunk("b", 2), b"[DONE]"],
                    "no_usage": [chunk("a"), chunk("b"), b"[DONE]"]}}
        written = []
        ctx = SimpleNamespace(record_text=False, clock_offset_s=0.0, in_flight=0, run_id="run", worker_id="h:1",
                              server_gave_usage=False, capabilities=None, local_tokenizer=None, note_result=lambda rec: None,
                              record_writer=lambda: SimpleNamespace(write=written.append))
        environment = SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(fire=lambda **kw: None)))
        stage = SimpleNamespace(pass_name="p", index=0, name="s")
        client = SimpleNamespace(name="chat", endpoint="chat")
        gave = []
        for stream, asks in {sends!r}:
            body = {{"model": "m", "stream": True, "messages": []}}
            if asks:
                body["stream_options"] = {{"include_usage": True, "continuous_usage_stats": True}}
            spec = RequestSpec(path="/v1/chat/completions", body=body, headers={{}}, connect_timeout_s=1,
                               first_token_timeout_s=1, total_timeout_s=1)
            users.build_request = lambda *a, spec=spec: (spec, RequestPlan(built=BuiltPrompt(messages=[], text=None, target_tokens=10), prompt_tokens=10, output_tokens=2))

            def transport(spec, obs, events=STREAMS[stream]):
                for i, payload in enumerate(events):
                    obs.on_bytes(b"data: " + payload + b"\\n\\n", obs.t_start_s + 0.01 * (i + 1))
                return Outcome(http_status=200)

            users.send_one(ctx, environment, stage=stage, client=client, rng=None, request_id="r",
                           transport=transport)
            gave.append(ctx.server_gave_usage)
        print(json.dumps({{"categories": [r.error_category for r in written], "gave": gave,
                          "estimated": [r.output_tokens_estimated for r in written],
                          "output_tokens": [r.output_tokens for r in written]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_missing_usage_fails_once_the_server_has_given_usage():
    out = _send_one_categories([("no_usage", True), ("usage", True), ("no_usage", True), ("no_usage", False)])
    # before any usage the process cannot tell a server that never gives it: a success; after, a
    # failure; a request that did not ask for usage is never failed for lacking it
    assert out["categories"] == [None, None, "missing_usage", None]
    assert out["gave"] == [False, True, True, True]
    assert out["estimated"] == [True, False, True, True] and out["output_tokens"] == [2, 2, 2, 2]


def test_a_server_that_never_gives_usage_is_not_failed():
    out = _send_one_categories([("no_usage", True)] * 3)
    assert out["categories"] == [None, None, None] and out["gave"] == [False, False, False]


# -- send_one: an interrupt mid-request still leaves the record -----------------------------------

def test_an_interrupt_mid_request_is_recorded_then_goes_on():
    """A Ctrl-C or SIGTERM raises in whichever greenlet runs; when that is a user mid-stream the
    server already has the request, so its record must be written before the interrupt goes on
    (CI once counted 27 requests served and 26 records after a SIGTERM)."""
    code = textwrap.dedent("""
        import json
        from types import SimpleNamespace
        from envelope.prompts import BuiltPrompt
        from locustfiles.sources import RequestPlan
        import gevent
        import locustfiles.users as users
        from locustfiles.transports import RequestSpec

        written = []
        ctx = SimpleNamespace(record_text=False, clock_offset_s=0.0, in_flight=0, run_id="run", worker_id="h:1",
                              server_gave_usage=False, capabilities=None, local_tokenizer=None, note_result=lambda rec: None,
                              record_writer=lambda: SimpleNamespace(write=written.append))
        environment = SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(fire=lambda **kw: None)))
        spec = RequestSpec(path="/v1/chat/completions", body={"model": "m", "stream": True, "messages": []},
                           headers={}, connect_timeout_s=1, first_token_timeout_s=1, total_timeout_s=1)
        users.build_request = lambda *a: (spec, RequestPlan(built=BuiltPrompt(messages=[], text=None, target_tokens=10), prompt_tokens=10, output_tokens=2))
        raised = []
        for exc in (KeyboardInterrupt(), SystemExit(130), gevent.GreenletExit()):
            def transport(spec, obs, exc=exc):
                obs.on_bytes(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\\n\\n', obs.t_start_s + 0.01)
                raise exc
            try:
                users.send_one(ctx, environment, stage=SimpleNamespace(pass_name="p", index=0, name="s"),
                               client=SimpleNamespace(name="chat", endpoint="chat"), rng=None,
                               request_id="r", transport=transport)
            except BaseException as caught:
                raised.append(caught is exc)
        print(json.dumps({"raised": raised, "in_flight": ctx.in_flight,
                          "records": [[r.error_category, r.error_detail, len(r.chunk_offsets_s)] for r in written]}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raised"] == [True, True, True]  # the same interrupt goes on, after the record
    assert out["in_flight"] == 0
    assert out["records"] == [
        ["cancelled", "interrupted mid-request (KeyboardInterrupt)", 1],
        ["cancelled", "interrupted mid-request (SystemExit)", 1],
        ["cancelled", "stopped by Locust mid-request", 1],
    ]


# -- the probed capabilities shape the request and the record -------------------------------------

def test_requests_and_records_follow_the_probed_capabilities():
    """transformers serve as probed (tests/fixtures/capabilities/transformers-serve.json): min_tokens and
    ignore_eos refused, usage only in the finish chunk, no [DONE]. Requests go without the refused fields;
    a stream that ends at its finish_reason is complete; one without usage from this server is
    missing_usage; with token_counting "tokenizer" the counts are the local tokenizer's, the server's kept."""
    code = textwrap.dedent("""
        import json, random
        from types import SimpleNamespace
        from envelope.capabilities import EndpointCapabilities, ServerCapabilities
        from envelope.prompts import calibrate
        from envelope.scenario import load_scenario
        import locustfiles.users as users
        from locustfiles.transports import Outcome

        scenario = load_scenario("scenarios/smoke.yaml")
        stage = scenario.resolve()[0]
        client = stage.clients[0]
        chat = EndpointCapabilities(path="/v1/chat/completions", streams=True, usage="final", done_marker=False,
                                    forced_output="rejected", stream_options=True, probe_output_tokens=8,
                                    refused="HTTP 422")
        out = {}
        for counting in ("server", "tokenizer"):
            caps = ServerCapabilities(models_listed=False, tokenize=False, metrics=False, endpoints=(chat,),
                                      token_counting=counting, tokenizer_path="/t")
            counter = SimpleNamespace(count_text=lambda text: len(text.split()),
                                      count_messages=lambda messages: 99, count_prompt=lambda text: 98)
            written = []
            ctx = SimpleNamespace(record_text=False, clock_offset_s=0.0, in_flight=0, run_id="run", worker_id="h:1",
                                  server_gave_usage=False, capabilities=caps, local_tokenizer=counter,
                                  note_result=lambda rec: None, record_writer=lambda: SimpleNamespace(write=written.append),
                                  factory=calibrate(None), model="/m", max_model_len=None, scenario=scenario,
                                  auth_headers=lambda: {})
            environment = SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(fire=lambda **kw: None)))
            bodies = []
            def transport(spec, obs, usage=True):
                bodies.append(spec.body)
                t = obs.t_start_s
                for i in range(3):
                    obs.on_bytes(b'data: {"choices":[{"index":0,"delta":{"content":" two words"}}]}\\n\\n', t + 0.01 * (i + 1))
                last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
                if usage:
                    last["usage"] = {"prompt_tokens": 64, "completion_tokens": 5}
                obs.on_bytes(b"data: " + json.dumps(last).encode() + b"\\n\\n", t + 0.05)
                return Outcome(http_status=200)
            for usage in (True, False):
                users.send_one(ctx, environment, stage=stage, client=client, rng=random.Random(0), request_id="r",
                               transport=lambda spec, obs, usage=usage: transport(spec, obs, usage))
            out[counting] = {
                "bodies": [sorted(b) for b in bodies],
                "records": [[r.error_category, r.output_tokens, r.prompt_tokens, r.token_source, r.output_tokens_server,
                             r.prompt_tokens_server, len(r.chunk_offsets_s)] for r in written]}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for counting in ("server", "tokenizer"):
        for body in out[counting]["bodies"]:  # fixed output asked by max_tokens alone
            assert "min_tokens" not in body and "ignore_eos" not in body and "max_tokens" in body
            assert "stream_options" in body  # accepted (ignored) by this server: still sent
    # server counting: complete without [DONE]; the stream without usage from a server that gives it fails
    assert out["server"]["records"] == [[None, 5, 64, "server", None, None, 3],
                                        ["missing_usage", 3, None, "chunks", None, None, 3]]
    # tokenizer counting: 3 chunks of " two words" are 6 tokens by the fake counter; the server's 5 kept beside
    assert out["tokenizer"]["records"] == [[None, 6, 99, "tokenizer", 5, 64, 3],
                                           ["missing_usage", 6, 99, "tokenizer", None, None, 3]]
