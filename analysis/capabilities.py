"""The report's "Server capabilities" section: what the server did not do that Envelope's workloads ask
of vLLM, and how each number was obtained instead (from ``capabilities.json``, written by the probe
before load; see :mod:`envelope.capabilities`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from envelope.capabilities import EndpointCapabilities, ServerCapabilities

__all__ = ["OutputLengthRow", "capabilities_lines", "capability_table", "output_length_rows",
           "output_length_table"]

_USAGE = {"continuous": "in every chunk", "final": "only at the end of the stream", "none": "never"}


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputLengthRow:
    """One stage's output lengths, asked against given, for a server that did not honour a fixed length."""

    stage_name: str
    requests: int
    asked_tokens_p50: float | None
    given_tokens_p5: float | None
    given_tokens_p50: float | None
    given_tokens_p95: float | None
    short_of_asked_ratio: float | None  # requests that got fewer tokens than they asked for


def _engine_line(server: Mapping[str, Any]) -> str:
    engine = server.get("engine") or ("vllm" if server.get("vllm_version") else None)
    if engine == "transformers":
        cb = server.get("continuous_batching")
        mode = {True: "with continuous batching", False: "one request at a time (no continuous batching)"}.get(cb, "")
        version = server.get("engine_version")
        return f"Engine: transformers serve{f' {version}' if version else ''} {mode}".rstrip() + "."
    if engine == "vllm":
        version = server.get("engine_version") or server.get("vllm_version")
        return f"Engine: vLLM{f' {version}' if version else ''}."
    return "Engine: not launched by Envelope (a server at --host)."


def _usage_how(e: EndpointCapabilities, caps: ServerCapabilities) -> str:
    if caps.token_counting == "tokenizer":
        return (f"every request's tokens counted with the model's tokenizer ({caps.tokenizer_path})"
                + (", the server's own counts kept beside them in the records" if e.usage != "none" else ""))
    if e.usage == "continuous":
        return "tokens per chunk from the server's running count"
    if e.usage == "final":
        return ("output and prompt tokens from the server's final count; tokens per chunk are not known, "
                "so each chunk is taken as the same share of the answer")
    return "output tokens estimated as the number of token chunks (the server gives no count)"


def capability_table(caps: ServerCapabilities) -> list[tuple[str, ...]]:
    """Rows of (what the workload asks, what this server does, how the number was obtained instead)."""
    rows: list[tuple[str, ...]] = [("asked of the server", "this server", "how Envelope got the number")]
    rows.append(("GET /v1/models lists the model", "yes" if caps.models_listed else "no",
                 "-" if caps.models_listed else "the model name from the launcher or --model"))
    sizing = {"server": "prompts sized by the server's /tokenize (exact)",
              "tokenizer": f"prompts sized with the model's tokenizer ({caps.tokenizer_path}), exact",
              "estimate": "prompt lengths are estimates (no tokenizer on this machine): read the server's counts"}
    rows.append(("POST /tokenize", "yes" if caps.tokenize else "no", sizing[caps.prompt_sizing]))
    groups = caps.telemetry_groups
    have = [g for g, ok in groups.items() if ok]
    lack = [g for g, ok in groups.items() if not ok]
    if caps.metrics:
        rows.append(("GET /metrics", "yes: " + (", ".join(have) or "none of the families Envelope reads"),
                     "not exposed: " + ", ".join(lack) if lack else "-"))
    else:
        rows.append(("GET /metrics", "no", "no server-side view: queue, batch slots, KV cache, latency "
                                           "decomposition and token counters are not in this report"))
    for e in caps.endpoints:
        rows.append((f"{e.path}: usage in the stream", _USAGE[e.usage], _usage_how(e, caps)))
        rows.append((f"{e.path}: data: [DONE] at the end", "yes" if e.done_marker else "no",
                     "-" if e.done_marker else "a stream is complete when its finish_reason arrives"))
        forced = {"honoured": "honoured",
                  "ignored": f"accepted but not honoured (the probe asked 8 tokens, got {e.probe_output_tokens})",
                  "rejected": f"refused ({e.refused})" if e.refused else "refused"}[e.forced_output]
        rows.append((f"{e.path}: fixed output length (min_tokens, ignore_eos)", forced,
                     "-" if e.forced_output == "honoured" else (
                         "requests ask max_tokens only; the output lengths the server gave are below"
                         if e.forced_output == "rejected" else "the output lengths the server gave are below")))
        if not e.stream_options:
            rows.append((f"{e.path}: stream_options", "refused", "requests go without it"))
    return rows


def output_length_rows(frame: pd.DataFrame, stage_names: Mapping[int, str]) -> list[OutputLengthRow]:
    """Asked and given output tokens of the successful requests, stage by stage."""
    if frame is None or frame.empty or "requested_output_tokens" not in frame:
        return []
    ok = frame[frame["ok"].astype(bool)]
    out = []
    for index, group in ok.groupby("stage_index", sort=True):
        asked = group["requested_output_tokens"].dropna().to_numpy(dtype=float)
        given = group["output_tokens"].dropna().to_numpy(dtype=float)
        both = group[["requested_output_tokens", "output_tokens"]].dropna().to_numpy(dtype=float)
        pct = (lambda q: float(np.percentile(given, q))) if given.size else (lambda q: None)
        out.append(OutputLengthRow(
            stage_name=stage_names.get(int(index), str(index)), requests=len(group),
            asked_tokens_p50=float(np.median(asked)) if asked.size else None,
            given_tokens_p5=pct(5), given_tokens_p50=pct(50), given_tokens_p95=pct(95),
            short_of_asked_ratio=float(np.mean(both[:, 1] < both[:, 0])) if len(both) else None))
    return out


def output_length_table(rows: Sequence[OutputLengthRow]) -> list[tuple[str, ...]]:
    def n(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    table: list[tuple[str, ...]] = [("stage", "requests", "asked (p50)", "given p5", "given p50", "given p95",
                                     "short of asked")]
    for r in rows:
        table.append((r.stage_name, f"{r.requests:,}", n(r.asked_tokens_p50), n(r.given_tokens_p5),
                      n(r.given_tokens_p50), n(r.given_tokens_p95),
                      "-" if r.short_of_asked_ratio is None else f"{r.short_of_asked_ratio:.0%}"))
    return table


def capabilities_lines(caps: ServerCapabilities | None, frame: pd.DataFrame | None) -> list[str]:
    """The sentences above the table: what differs from vLLM in one line, and how tokens were counted."""
    if caps is None:
        return ["This run has no capabilities.json (made before the probe existed): its requests assumed a vLLM "
                "server (fixed output lengths, usage in every chunk, /tokenize, [DONE])."]
    lines = []
    gaps = caps.gaps
    lines.append("The server did everything the workloads ask of vLLM." if not gaps else
                 "Probed before any load, the server differs from vLLM in: " + "; ".join(gaps) + ".")
    if frame is not None and not frame.empty and "output_tokens_estimated" in frame:
        estimated = int(frame["output_tokens_estimated"].astype(bool).sum())
        n = len(frame)
        source = {"server": "the server's usage", "tokenizer": "the model's tokenizer on this machine",
                  "chunks": "the number of token chunks (an estimate)"}[caps.token_counting]
        line = f"Token counts of the {n:,} requests: {source}"
        if caps.token_counting == "server" and estimated:
            line += f", except {estimated:,} request(s) without usage, estimated from their chunks"
        lines.append(line + ".")
    return lines
