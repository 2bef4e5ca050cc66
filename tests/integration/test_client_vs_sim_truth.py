"""The client's measurements against the simulator's truth, through our real locustfile.

The simulator writes down when each request arrived and when each chunk was
handed to the socket, with ``time.perf_counter()``; the Locust worker's records
use the same clock (``CLOCK_MONOTONIC`` on Linux), so the two sides compare
directly. At low load the client must see every chunk the server wrote, with
the server's token counts, never before the server wrote it, and its TTFT must
be the server's within a tolerance (a loose one: this box is shared; the
figures belong to benchmarks/client_accuracy.py).
"""

from __future__ import annotations

import bisect
import time

import httpx
import numpy as np
import pytest

from helpers.locust_runs import records, run_locust
from server.sim import SimConfig, SimServer
from server.sim.config import Distribution

pytestmark = [pytest.mark.slow]

EPS_S = 2e-6  # float rounding of perf_counter readings


def _scenario(tmp_path, transport: str):
    path = tmp_path / "truth.yaml"
    path.write_text(
        "name: truth\n"
        "defaults:\n"
        f"  client: {transport}\n"
        "  workload: {prompt_tokens: {distribution: uniform, min: 16, max: 400}, output_tokens: 24}\n"
        "  timeouts: {connect_s: 5, first_token_s: 10, total_s: 20}\n"
        "passes:\n"
        "  - name: low\n"
        "    stages:\n"
        "      - {users: 2, duration_s: 6}\n"
    )
    return path


@pytest.fixture
def sim():
    config = SimConfig(ttft_s=Distribution(kind="uniform", low_s=0.02, high_s=0.04), itl_s=0.005,
                       multi_token_chunk_probability=0.2, multi_token_chunk_tokens=2)
    proc = SimServer(config).start_in_subprocess()
    try:
        yield proc
    finally:
        proc.stop()


def _pairs(recs: list[dict], truth: list[dict]) -> list[tuple[dict, dict]]:
    """Each client record with its truth: same (prompt, output) tokens, arrival between send and first byte."""
    by_key: dict[tuple, list[dict]] = {}
    for t in sorted(truth, key=lambda t: t["t_arrival_s"]):
        by_key.setdefault((t["prompt_tokens"], t["tokens_sent"]), []).append(t)
    pairs = []
    for r in recs:
        cands = by_key.get((r["prompt_tokens"], r["output_tokens"]), [])
        arrivals = [t["t_arrival_s"] for t in cands]
        lo = bisect.bisect_left(arrivals, r["t_start_s"] - EPS_S)
        hi = bisect.bisect_right(arrivals, r["t_first_byte_s"] + EPS_S)
        assert hi - lo == 1, f"request {r['request_id']}: {hi - lo} truth records fit"
        pairs.append((r, cands[lo]))
    return pairs


MEDIAN_TTFT_ERROR_MS = {"fasthttp": 3.0, "openai": 10.0}


@pytest.mark.parametrize("transport", ["fasthttp", "openai"])
def test_client_records_agree_with_the_servers_truth(sim, tmp_path, transport):
    assert time.get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"
    run_dir = tmp_path / "run"
    proc = run_locust(sim.base_url, None, _scenario(tmp_path, transport), run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [r for r in records(run_dir) if r["error_category"] is None]
    truth = [t for t in httpx.get(f"{sim.base_url}/sim/truth", timeout=10).json() if t["outcome"] == "ok"]
    assert len(recs) >= 6 and len(recs) == len(truth)

    ttft_errors = []
    for r, t in _pairs(recs, truth):
        # what the server sent, the client saw: every chunk and its tokens
        assert r["chunk_tokens"] == t["chunk_tokens"] and r["output_tokens"] == t["tokens_sent"]
        # ... never before the server wrote it
        start, arrival = r["t_start_s"], t["t_arrival_s"]
        client_at = start + np.asarray(r["chunk_offsets_s"])
        server_at = arrival + np.asarray(t["chunk_offsets_s"])
        assert np.all(client_at >= server_at - EPS_S)
        assert r["t_first_token_s"] >= t["t_first_token_s"] - EPS_S
        ttft_errors.append((r["t_first_token_s"] - start) - (t["t_first_token_s"] - arrival))
    # the client's TTFT is the server's plus its own send and receive delays: small at low load
    assert min(ttft_errors) >= -EPS_S
    # The median client-minus-truth TTFT error, measured with this test on the 2-core VM while two other
    # test runs loaded both cores (2026-12-03, three runs each): fasthttp 0.51 / 0.55 / 0.63 ms,
    # openai 3.1 / 3.2 / 3.8 ms (the SDK parses every chunk into objects first). The bounds leave about
    # 5x and 2.5x for a slower machine; a regression of the magnitude benchmarks/client_accuracy.py
    # looks for (a yield between the stamp and the send, a hub starved by another greenlet) exceeds them.
    median_ms = 1000 * float(np.median(ttft_errors))
    assert median_ms < MEDIAN_TTFT_ERROR_MS[transport], (median_ms, ttft_errors)
