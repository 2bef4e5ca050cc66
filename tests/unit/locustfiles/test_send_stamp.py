"""The start stamp is taken where the request leaves: no other greenlet runs between it and the send.

Each run is a fresh interpreter with Locust's monkey-patching (the yield this
guards against comes from gevent's ``select``, which only a patched process
uses). The real fasthttp transport sends two requests to the simulator over one
pool (the first opens a connection, the second reuses it) while an order of
events is recorded: the stamp (``StreamObserver.sent``), every switch away from
the request's greenlet (``greenlet.settrace``), and every ``sendall`` on a
socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers.locust_runs import REPO

_CODE = textwrap.dedent("""
    import json, sys
    import locust  # monkey-patches the standard library, as in a real run
    import gevent, greenlet, time
    from gevent import socket as gsocket
    from envelope.stream import StreamObserver
    sys.path.insert(0, "tests")
    from helpers.fasthttp_sim import chat_spec, client_pool
    from locustfiles import patches
    from locustfiles.transports import stream_fasthttp
    from server.sim import SimConfig, SimServer

    if sys.argv[1] == "patched":
        patches.apply()
    events = []
    sender = []

    class Observer(StreamObserver):
        __slots__ = ()

        def sent(self, t_start_s):
            events.append("stamp")
            super().sent(t_start_s)

    original_sendall = gsocket.socket.sendall

    def sendall(self, *args, **kwargs):
        events.append("send")
        return original_sendall(self, *args, **kwargs)

    gsocket.socket.sendall = sendall

    def trace(event, args):
        if event in ("switch", "throw") and sender and args[0] is sender[0]:
            events.append("yield")

    def busy():  # another greenlet always ready: a yield would let it run
        while True:
            gevent.sleep(0)

    sim = SimServer(SimConfig(ttft_s=0.005, itl_s=0.001)).start_in_subprocess()
    try:
        spec, pool = chat_spec(), client_pool()
        outcomes = []

        def two_requests():
            for _ in range(2):
                events.append("request")
                obs = Observer(time.perf_counter())
                out = stream_fasthttp(pool, sim.base_url, spec, obs)
                outcomes.append([out.http_status, out.error_category, obs.t_start_s <= out.t_first_byte_s])

        neighbour = gevent.spawn(busy)
        g = gevent.Greenlet(two_requests)
        sender.append(g)
        greenlet.settrace(trace)
        g.start()
        g.join()
        greenlet.settrace(None)
        neighbour.kill()
        pool.close()
    finally:
        sim.stop()
    print(json.dumps({"events": events, "outcomes": outcomes}))
""")


def _run(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CODE, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _between_stamp_and_send(events: list[str]) -> list[list[str]]:
    """Per request: the events from its stamp up to its first send."""
    out = []
    for request in " ".join(events).split("request")[1:]:
        seq = request.split()
        start = seq.index("stamp")
        out.append(seq[start:seq.index("send", start) + 1])
    return out


def test_nothing_runs_between_the_start_stamp_and_the_send_on_a_new_or_a_reused_connection():
    got = _run("patched")
    assert got["outcomes"] == [[200, None, True], [200, None, True]]
    spans = _between_stamp_and_send(got["events"])
    assert spans == [["stamp", "send"], ["stamp", "send"]], got["events"]
    # the request did yield elsewhere (connecting, waiting for the answer): the tracer sees yields
    assert got["events"].count("yield") >= 2


def test_the_recorder_sees_the_yield_of_geventhttpclients_own_liveness_check():
    """Without the patch, taking a pooled connection runs gevent's select, which yields: the order of
    events shows it (so the test above can fail)."""
    got = _run("unpatched")
    spans = _between_stamp_and_send(got["events"])
    assert len(spans) == 2 and all("yield" in span for span in spans), got["events"]
