"""What a request of a scenario's workload takes on this machine, for tests whose SLOs must fit its speed.

Machines differ (CI's 2 cores have run 3x slower than the day before), so a test that needs an SLO
to pass one load and fail another cannot fix the target in milliseconds: it measures the workload's
streamed requests on the session's ``cpu-tiny`` server, ``n`` at once, just before, and sets the target
between what a request that starts at once sees and what one that waits for a batch slot sees.
An idle ``cpu-tiny`` server costs about no CPU (measured: 0.01 CPU-seconds a second, all its processes), so
the session's server may stay up while a test launches another.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from envelope.prompts import TokenizerProbe, calibrate


@dataclass(frozen=True)
class Timing:
    """Streamed requests of one workload, ``at_once`` of them together, ``rounds`` times (seconds)."""

    at_once: int
    output_tokens: int
    ttft_s: list[float]
    e2e_s: list[float]

    @property
    def ttft_median_s(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def e2e_median_s(self) -> float:
        return statistics.median(self.e2e_s)

    @property
    def tpot_median_s(self) -> float:
        return statistics.median((e - t) / (self.output_tokens - 1) for t, e in zip(self.ttft_s, self.e2e_s))

    def queue_target_ms(self) -> float:
        """A TTFT target between a request that gets a batch slot at once (about this TTFT) and one that
        waits for a slot (about a whole request more): the TTFT plus half the end-to-end time."""
        return (self.ttft_median_s + self.e2e_median_s / 2) * 1000

    def describe(self) -> str:
        return (f"{self.at_once} at once: TTFT {self.ttft_median_s * 1000:.0f} ms, end to end "
                f"{self.e2e_median_s * 1000:.0f} ms, TPOT {self.tpot_median_s * 1000:.1f} ms (medians of "
                f"{len(self.e2e_s)})")


def at_once(vllm_server, *, prompt_tokens: int, output_tokens: int, n: int, rounds: int = 3) -> Timing:
    """TTFT and end-to-end time of ``n`` streamed chat requests sent together, ``rounds`` times after a warm-up
    round: prompts sized by the server's tokenizer, exactly ``output_tokens`` out, streamed as Envelope
    streams them (usage in every chunk)."""
    model = vllm_server.served_model_name
    headers = {"Authorization": f"Bearer {vllm_server.api_key.get()}"}
    with httpx.Client(base_url=vllm_server.base_url, timeout=120, headers=headers) as http:
        def post(path: str, body: dict) -> dict:
            resp = http.post(path, json=body)
            resp.raise_for_status()
            return resp.json()

        def one(body: dict) -> tuple[float, float]:
            t0 = time.perf_counter()
            first, tokens = None, 0
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    usage = json.loads(line[len("data: "):]).get("usage") or {}
                    tokens = usage.get("completion_tokens", tokens)
                    if first is None and tokens >= 1:
                        first = time.perf_counter() - t0
            assert tokens == output_tokens and first is not None
            return first, time.perf_counter() - t0

        factory = calibrate(TokenizerProbe(post, model))
        rng = random.Random(0)
        bodies = [{"model": model, "messages": factory.chat(prompt_tokens, rng).messages,
                   "max_tokens": output_tokens, "min_tokens": output_tokens,
                   "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                  for _ in range(n * (rounds + 1))]
        timing = Timing(at_once=n, output_tokens=output_tokens, ttft_s=[], e2e_s=[])
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, bodies[:n]))  # warm
            for r in range(1, rounds + 1):
                for ttft, e2e in pool.map(one, bodies[r * n:(r + 1) * n]):
                    timing.ttft_s.append(ttft)
                    timing.e2e_s.append(e2e)
        return timing
