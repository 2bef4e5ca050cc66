"""``envelope sim``: run the simulated vLLM server in the foreground.

Prints ``listening on http://HOST:PORT`` (flushed) once it accepts
connections; stops cleanly on SIGTERM or SIGINT. Flags override ``--config``.
``python -m server.sim`` is the same command (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence, TextIO

from envelope.usage import HELP_FORMAT, OneLineParser, examples, paragraph, parse_or_say

__all__ = ["main", "add_arguments", "run", "parse_fault", "HELP", "DESCRIPTION"]

HELP = "run the simulated vLLM server (a test instrument)"
DESCRIPTION = paragraph("Simulated vLLM server (a test instrument): the OpenAI completion endpoints with scheduled timings, "
               "server-side truth per request and injected faults. Prints 'listening on http://HOST:PORT' once it "
               "accepts connections; stops on SIGTERM or SIGINT. Flags override --config.")


def parse_fault(text: str):
    """``KIND[:key=value,...]``, e.g. ``reset:after_chunks=3,every_nth=2`` -> FaultSpec."""
    from server.sim.config import FaultSpec

    kind, _, rest = text.partition(":")
    kwargs: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"fault option {item!r} is not key=value")
        kwargs[key] = float(value) if key in ("probability", "stall_s") else int(value)
    return FaultSpec(**kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The simulator's options, and an example epilog, on ``p``."""
    p.formatter_class = HELP_FORMAT
    p.epilog = examples(f"{p.prog} --port 8000 --ttft-ms 50 --itl-ms 10 --fault http_500:every_nth=10")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed)")
    p.add_argument("--config", help="YAML or JSON file with SimConfig fields")
    p.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    p.add_argument("--model", help="served model name")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--ttft-ms", type=float, help="fixed time to first token")
    p.add_argument("--itl-ms", type=float, help="fixed inter-token latency")
    p.add_argument("--tokens-per-chunk", type=int)
    p.add_argument("--batch-limit", type=int)
    p.add_argument("--itl-batch-alpha", type=float)
    p.add_argument("--prefill-ms-per-token", type=float)
    p.add_argument("--kv-cache-tokens", type=int, help="KV-cache capacity in tokens")
    p.add_argument("--eos-after-tokens", type=int)
    p.add_argument("--truth-file", help="append one JSON line per finished request")
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:k=v,...]",
                   help="inject a fault (repeatable), e.g. http_500:every_nth=10")


def run(args: argparse.Namespace, *, prefix: str = "error", out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """Serve until SIGTERM or SIGINT; return the exit code (2 bad input, 1 cannot listen)."""
    err = err or sys.stderr
    from envelope.config import ConfigError
    from server.sim.config import SimConfig, load_sim_config
    from server.sim.server import serve

    changes: dict = {}
    for flag, field, scale in (
        ("model", "model", None), ("max_model_len", "max_model_len", None), ("seed", "seed", None),
        ("ttft_ms", "ttft_s", 1e-3), ("itl_ms", "itl_s", 1e-3), ("tokens_per_chunk", "tokens_per_chunk", None),
        ("batch_limit", "batch_limit", None), ("itl_batch_alpha", "itl_batch_alpha", None),
        ("prefill_ms_per_token", "prefill_s_per_token", 1e-3), ("kv_cache_tokens", "kv_cache_capacity_tokens", None),
        ("eos_after_tokens", "eos_after_tokens", None), ("truth_file", "truth_file", None),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value * scale if scale else value
    try:
        if args.fault:
            changes["faults"] = tuple(parse_fault(f) for f in args.fault)
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise ValueError(f"environment variable {args.api_key_env} is not set")
            changes["api_key"] = key
        config = load_sim_config(args.config, **changes) if args.config else SimConfig(**changes)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"{prefix}: {exc}", file=err)
        return 2
    try:
        serve(config, host=args.host, port=args.port, out=out)
    except OSError as exc:
        print(f"{prefix}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=err)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.sim``: parse ``argv`` and serve; return the exit code."""
    parser = OneLineParser(prog="python -m server.sim", description=DESCRIPTION + "\n(The same command as 'envelope sim'.)")
    add_arguments(parser)
    args = parse_or_say(parser, argv, prefix="error: ")
    return 2 if args is None else run(args)
