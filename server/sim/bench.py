"""``python -m server.sim.bench``: how many SSE chunks per second the simulated server sustains.

Starts the server in a child process (so client and server do not share a
GIL), opens ``--streams`` keep-alive connections from a raw-socket asyncio
client and keeps a streamed chat request running on each for ``--duration-s``.
Informational only: the client's own cost is part of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import time

__all__ = ["run_bench"]

_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%b"
)


async def _stream_forever(host: str, port: int, max_tokens: int, stop_at: float, counts: list[int]) -> None:
    body = (b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"stream":true,'
            b'"max_tokens":%d,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}' % max_tokens)
    request = _REQUEST % (len(body), body)
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            tail = b""
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return
                buf = tail + data
                counts[0] += buf.count(b"data: ") - tail.count(b"data: ")
                if buf.endswith(b"\r\n0\r\n\r\n"):
                    break
                tail = buf[-16:]
    finally:
        writer.close()


async def _client(host: str, port: int, streams: int, max_tokens: int, duration_s: float) -> tuple[int, float]:
    counts = [0]
    t0 = time.perf_counter()
    stop_at = t0 + duration_s
    await asyncio.gather(*(_stream_forever(host, port, max_tokens, stop_at, counts) for _ in range(streams)))
    return counts[0], time.perf_counter() - t0


def run_bench(*, streams: int = 256, itl_ms: float = 2.0, max_tokens: int = 256, duration_s: float = 5.0) -> dict:
    """Run the benchmark; return chunks, seconds and chunks per second."""
    from server.sim.config import SimConfig
    from server.sim.server import SimServer, new_event_loop

    config = SimConfig(ttft_s=0.0, itl_s=itl_ms / 1000.0)
    with SimServer(config).start_in_subprocess() as proc:
        host, port = proc.base_url.removeprefix("http://").rsplit(":", 1)
        loop = new_event_loop()
        try:
            chunks, elapsed_s = loop.run_until_complete(_client(host, int(port), streams, max_tokens, duration_s))
        finally:
            loop.close()
    return {"streams": streams, "itl_ms": itl_ms, "chunks": chunks, "duration_s": elapsed_s,
            "chunks_per_s": chunks / elapsed_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.sim.bench")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--itl-ms", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--duration-s", type=float, default=5.0)
    a = p.parse_args(argv)
    r = run_bench(streams=a.streams, itl_ms=a.itl_ms, max_tokens=a.max_tokens, duration_s=a.duration_s)
    print(f"{r['chunks']} chunks in {r['duration_s']:.2f} s over {r['streams']} streams: "
          f"{r['chunks_per_s']:,.0f} chunks/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
