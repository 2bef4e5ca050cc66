"""Injected faults of the simulated server: each does what it says and is counted."""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager

import httpx
import pytest

from server.sim import FaultSpec, SimConfig, SimServer
from server.sim.faults import FaultPlan

BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@contextmanager
def sim(*faults: FaultSpec, **kwargs):
    server = SimServer(SimConfig(ttft_s=0.0, itl_s=0.002, faults=faults, **kwargs))
    url = server.start_in_thread()
    try:
        with httpx.Client() as client:
            yield url, client
    finally:
        server.stop()


def read_stream(client: httpx.Client, url: str, body: dict = BODY):
    """(status, [(t, payload)]) of a streamed chat request."""
    out = []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r, out
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append((time.perf_counter(), line[6:]))
    return r, out


def injected(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/sim/faults").json()["injected"]


@pytest.mark.parametrize(
    "kind,status,err_type",
    [("http_500", 500, "InternalServerError"), ("http_503", 503, "ServiceUnavailableError"),
     ("http_429", 429, "RateLimitError"), ("http_404", 404, "NotFoundError")],
)
def test_http_status_faults(kind, status, err_type):
    with sim(FaultSpec(kind=kind, every_nth=2)) as (url, c):
        statuses = []
        for _ in range(4):
            r = c.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False, "stream_options": None})
            statuses.append(r.status_code)
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["type"] == err_type and err["code"] == status
                assert "retry-after" not in r.headers
        assert statuses == [200, status, 200, status]
        assert injected(c, url) == {kind: 2}
        truth = c.get(f"{url}/sim/truth").json()
        assert [t["fault"] for t in truth] == [None, kind, None, kind]


def test_429_with_retry_after_and_401():
    with sim(FaultSpec(kind="http_429", count=1, retry_after_s=7), FaultSpec(kind="http_401", count=1)) as (url, c):
        r1 = c.post(f"{url}/v1/chat/completions", json=BODY)
        r2 = c.post(f"{url}/v1/chat/completions", json=BODY)
        r3 = c.post(f"{url}/v1/chat/completions", json=BODY)
        assert (r1.status_code, r1.headers["retry-after"]) == (429, "7")
        assert r2.status_code == 401 and r2.json() == {"error": "Unauthorized"}
        assert r3.status_code == 200
        assert injected(c, url) == {"http_429": 1, "http_401": 1}


def test_refuse_closes_new_connections():
    with sim(FaultSpec(kind="refuse", count=1)) as (url, c):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
        assert c.get(f"{url}/health").status_code == 200
        assert injected(c, url) == {"refuse": 1}


def test_reset_mid_stream_after_k_chunks():
    with sim(FaultSpec(kind="reset", after_chunks=2, count=1)) as (url, c):
        got = []
        with pytest.raises(httpx.TransportError):
            with c.stream("POST", f"{url}/v1/chat/completions", json=BODY) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got.append(json.loads(line[6:]))
        # role chunk + exactly two content chunks before the reset
        assert [g["usage"]["completion_tokens"] for g in got] == [0, 1, 2]
        truth = c.get(f"{url}/sim/truth").json()
        assert truth[0]["outcome"] == "reset" and truth[0]["tokens_sent"] == 2
        assert injected(c, url) == {"reset": 1}


def test_stall_before_first_token_and_after_k():
    with sim(FaultSpec(kind="stall", after_chunks=0, stall_s=0.3, count=1),
             FaultSpec(kind="stall", after_chunks=2, stall_s=0.3, count=1)) as (url, c):
        t0 = time.perf_counter()
        _, ev = read_stream(c, url)
        assert ev[0][0] - t0 >= 0.3
        _, ev = read_stream(c, url)
        content = ev[1:-2]  # drop role, usage-only and [DONE]
        gaps = [b[0] - a[0] for a, b in zip(content, content[1:])]
        # the stall falls between the 2nd and 3rd chunks; read times, not send times, so a late read of the
        # 2nd chunk shortens the gap a little (0.298 s seen on a slow box): the stall is what stands out
        assert gaps[1] >= 0.25 and max(gaps[:1] + gaps[2:]) < 0.15, gaps
        assert injected(c, url) == {"stall": 2}
        assert [t["stall_s"] for t in c.get(f"{url}/sim/truth").json()] == [0.3, 0.3]


def test_malformed_chunk():
    with sim(FaultSpec(kind="malformed", after_chunks=1, count=1)) as (url, c):
        _, ev = read_stream(c, url)
        payloads = [p for _, p in ev]
        bad = []
        for i, p in enumerate(payloads[:-1]):
            try:
                json.loads(p)
            except json.JSONDecodeError:
                bad.append(i)
        assert bad == [2]  # role, first content, then the broken second content chunk
        assert payloads[-1] == "[DONE]"
        assert c.get(f"{url}/sim/truth").json()[0]["malformed_chunk"] == 1


def test_no_done_and_no_usage():
    with sim(FaultSpec(kind="no_done", count=1), FaultSpec(kind="no_usage", count=1)) as (url, c):
        _, ev = read_stream(c, url)
        assert ev[-1][1] != "[DONE]" and json.loads(ev[-1][1])["choices"] == []
        _, ev = read_stream(c, url)
        assert ev[-1][1] == "[DONE]"
        objs = [json.loads(p) for _, p in ev[:-1]]
        assert len(objs) == 6 and not any("usage" in o for o in objs)
        _, ev = read_stream(c, url)
        assert ev[-1][1] == "[DONE]" and all("usage" in json.loads(p) for _, p in ev[:-1])
        assert injected(c, url) == {"no_done": 1, "no_usage": 1}


def test_error_event_in_200_stream():
    with sim(FaultSpec(kind="error_event", after_chunks=3, count=1)) as (url, c):
        r, ev = read_stream(c, url)
        assert r.status_code == 200
        payloads = [p for _, p in ev]
        assert payloads[-1] == "[DONE]"
        err = json.loads(payloads[-2])
        assert err["error"]["type"] == "InternalServerError" and err["error"]["code"] == 500
        assert len(payloads) == 1 + 3 + 2
        truth = c.get(f"{url}/sim/truth").json()[0]
        assert truth["outcome"] == "error_event" and truth["tokens_sent"] == 3


def test_probability_faults_are_seeded():
    spec = FaultSpec(kind="http_500", probability=0.3)
    rng = random.Random("5:0:http_500")
    expected = [rng.random() < 0.3 for _ in range(40)]
    plan = FaultPlan((spec,), seed=5)
    assert [plan.on_request(stream=True) is not None for _ in range(40)] == expected
    assert plan.counts() == {"http_500": sum(expected)}
    with sim(spec, seed=5) as (url, c):
        codes = [c.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code
                 for _ in range(40)]
        assert [code == 500 for code in codes] == expected
        assert injected(c, url) == {"http_500": sum(expected)}


def test_stream_only_faults_skip_non_streamed_requests():
    plan = FaultPlan((FaultSpec(kind="no_done"), FaultSpec(kind="http_503", every_nth=2)), seed=0)
    kinds = [getattr(plan.on_request(stream=False), "kind", None) for _ in range(4)]
    assert kinds == [None, "http_503", None, "http_503"]
    assert plan.on_request(stream=True).kind == "no_done"


def test_the_capability_probe_is_served_but_left_out_of_faults_count_and_truth():
    """Envelope's probe (x-envelope-probe) before the load: a real answer, no injected fault, not counted."""
    from envelope.capabilities import PROBE_HEADER, probe_capabilities

    with sim(FaultSpec(kind="http_500")) as (url, c):  # every request of the load fails
        with httpx.Client(base_url=url) as client:
            caps = probe_capabilities(client, model="sim-model", paths=("/v1/chat/completions",),
                                      models_listed=True, tokenize=True)
        assert caps.problems == () and caps.endpoint("/v1/chat/completions").forced_output == "honoured"
        state = c.get(f"{url}/sim/faults").json()
        assert state["requests"] == 0 and state["injected"].get("http_500", 0) == 0
        assert c.get(f"{url}/sim/truth").json() == []
        # the same request without the header is the load: counted, faulted, in the truth
        r = c.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False, "stream_options": None})
        assert r.status_code == 500
        assert c.get(f"{url}/sim/faults").json()["requests"] == 1 and len(c.get(f"{url}/sim/truth").json()) == 1
        # and the header on a load request would hide it: only the probe sets it
        r = c.post(f"{url}/v1/chat/completions", json={**BODY, "stream": False, "stream_options": None},
                   headers={PROBE_HEADER: "capabilities"})
        assert r.status_code == 200
