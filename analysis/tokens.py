"""Token-count audit: the server's ``usage`` counts against what the client saw, per request.

Over the successful requests of a run (failed ones are cut short, so their
counts say nothing about counting), exact integer sums:

* output tokens: the server's ``usage.completion_tokens`` against the client's
  estimate, the number of token chunks it received
  (``output_tokens_client_estimate``); requests whose output tokens *are* the
  estimate (the server reported no usage) are counted apart;
* prompt tokens: the server's ``usage.prompt_tokens`` against the prompt length
  the client asked for (``requested_prompt_tokens``, calibrated with ``/tokenize``);
* chunks: how many content chunks carried more than one token, or none, and how
  many output tokens came after the last content chunk (tokens that decode to no
  visible text; all of them in a request with no content chunk). These come from
  the per-chunk counts of continuous usage (``chunk_tokens``), so only requests
  that have them (or have no content chunk) are described. The observer now
  tells token chunks by the usage count, not by visible text (see
  :class:`envelope.stream.StreamObserver`), so in new records no chunk carries
  zero tokens and none come after the last chunk; records written before
  counted content chunks only, and these two counts describe them.

For a request with per-chunk counts the difference between the two output
counts is exactly explained::

    server - client = (tokens in multi-token chunks - multi-token chunks)
                      - chunks with no new token + tokens after the last chunk
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["TokenAudit", "TokenAuditBuilder", "CountComparison", "token_audit", "audit_lines"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CountComparison:
    """One count, server versus client, over the requests that have both."""

    requests: int = 0
    server_tokens: int = 0
    client_tokens: int = 0
    equal: int = 0  # requests where the two agree
    server_more: int = 0  # requests where the server counted more
    server_fewer: int = 0
    abs_difference_tokens: int = 0  # sum over requests of |server - client|
    max_abs_difference_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAudit:
    """The audit of one run's successful requests (see the module docstring)."""

    requests: int = 0  # successful requests
    without_usage: int = 0  # of which the server reported no usage: output tokens are the client estimate
    estimated_output_tokens: int = 0  # the estimated output tokens of those requests
    output: CountComparison = CountComparison()  # usage.completion_tokens vs content chunks
    prompt: CountComparison = CountComparison()  # usage.prompt_tokens vs requested prompt tokens
    content_chunks: int = 0  # content chunks of every successful request
    requests_with_chunk_tokens: int = 0  # requests whose every content chunk (if any) carried a usage count
    chunks_with_tokens: int = 0  # content chunks of those requests
    multi_token_chunks: int = 0  # chunks that carried more than one token
    tokens_in_multi_token_chunks: int = 0
    max_chunk_tokens: int = 0  # the most tokens one chunk carried
    zero_token_chunks: int = 0  # content chunks whose usage count did not move
    tokens_after_last_chunk: int = 0  # output tokens minus the per-chunk counts (no visible text)
    difference_in_chunked_requests: int = 0  # sum of server - client over requests with per-chunk counts


class _Comparison:
    __slots__ = ("requests", "server", "client", "equal", "more", "fewer", "abs_sum", "abs_max")

    def __init__(self) -> None:
        self.requests = self.server = self.client = self.equal = self.more = self.fewer = 0
        self.abs_sum = self.abs_max = 0

    def add(self, server: int, client: int) -> None:
        self.requests += 1
        self.server += server
        self.client += client
        d = server - client
        if d == 0:
            self.equal += 1
        elif d > 0:
            self.more += 1
        else:
            self.fewer += 1
        d = abs(d)
        self.abs_sum += d
        if d > self.abs_max:
            self.abs_max = d

    def add_many(self, server: np.ndarray, client: np.ndarray) -> None:
        """:meth:`add` for each pair of two integer arrays."""
        if not server.size:
            return
        d = server - client
        self.requests += int(server.size)
        self.server += int(server.sum())
        self.client += int(client.sum())
        self.equal += int((d == 0).sum())
        self.more += int((d > 0).sum())
        self.fewer += int((d < 0).sum())
        d = np.abs(d)
        self.abs_sum += int(d.sum())
        self.abs_max = max(self.abs_max, int(d.max()))

    def result(self) -> CountComparison:
        return CountComparison(requests=self.requests, server_tokens=self.server, client_tokens=self.client,
                               equal=self.equal, server_more=self.more, server_fewer=self.fewer,
                               abs_difference_tokens=self.abs_sum, max_abs_difference_tokens=self.abs_max)


class TokenAuditBuilder:
    """Adds records one at a time (the run loader streams them); :meth:`result` gives the audit."""

    _COUNTS = tuple(k for k in TokenAudit.__dataclass_fields__ if k not in ("output", "prompt"))

    def __init__(self) -> None:
        self._output = _Comparison()
        self._prompt = _Comparison()
        self._n = dict.fromkeys(self._COUNTS, 0)

    def add(self, rec: Mapping[str, Any]) -> None:
        if rec.get("error_category") is not None:
            return
        n = self._n
        n["requests"] += 1
        offsets = rec.get("chunk_offsets_s") or ()
        client = rec.get("output_tokens_client_estimate")
        if client is None:
            client = len(offsets)
        n["content_chunks"] += len(offsets)
        out = rec.get("output_tokens")
        if rec.get("output_tokens_estimated") or out is None:
            n["without_usage"] += 1
            n["estimated_output_tokens"] += int(out or 0)
        else:
            out = int(out)
            self._output.add(out, int(client))
            tokens = rec.get("chunk_tokens")
            if not offsets:
                # no content chunk at all (every token decoded to no visible text): all after the "last" one
                n["requests_with_chunk_tokens"] += 1
                n["tokens_after_last_chunk"] += out
                n["difference_in_chunked_requests"] += out - int(client)
            elif tokens and len(tokens) == len(offsets) and min(tokens) >= 0:
                # list methods rather than a Python loop: a million records carry ~10^8 chunks
                ones, zeros, total = tokens.count(1), tokens.count(0), sum(tokens)
                n["requests_with_chunk_tokens"] += 1
                n["chunks_with_tokens"] += len(tokens)
                n["multi_token_chunks"] += len(tokens) - ones - zeros
                n["tokens_in_multi_token_chunks"] += total - ones
                n["zero_token_chunks"] += zeros
                n["max_chunk_tokens"] = max(n["max_chunk_tokens"], max(tokens))
                n["tokens_after_last_chunk"] += out - total
                n["difference_in_chunked_requests"] += out - int(client)
        prompt, asked = rec.get("prompt_tokens"), rec.get("requested_prompt_tokens")
        if prompt is not None and asked is not None:
            self._prompt.add(int(prompt), int(asked))

    def add_columns(self, *, ok: np.ndarray, n_chunks: np.ndarray, client_estimate: np.ndarray,
                    output_tokens: np.ndarray, output_tokens_missing: np.ndarray, estimated: np.ndarray,
                    chunk_tokens_known: np.ndarray, chunk_tokens_ones: np.ndarray, chunk_tokens_zeros: np.ndarray,
                    chunk_tokens_sum: np.ndarray, chunk_tokens_max: np.ndarray, prompt_tokens: np.ndarray,
                    prompt_tokens_missing: np.ndarray, requested_prompt_tokens: np.ndarray,
                    requested_prompt_tokens_missing: np.ndarray) -> None:
        """:meth:`add` for a batch of records given as per-record integer and boolean arrays.

        ``client_estimate``: ``output_tokens_client_estimate``, else the record's chunks;
        ``chunk_tokens_known``: its ``chunk_tokens`` has one count >= 0 per chunk; the other
        ``chunk_tokens_*`` describe those counts (ignored where not known). Integer sums, so the
        audit is the same as adding the records one by one.
        """
        n = self._n
        n["requests"] += int(ok.sum())
        n["content_chunks"] += int(n_chunks[ok].sum())
        without = ok & (estimated | output_tokens_missing)
        n["without_usage"] += int(without.sum())
        n["estimated_output_tokens"] += int(output_tokens[without & ~output_tokens_missing].sum())
        usage = ok & ~without
        out, client = output_tokens[usage], client_estimate[usage]
        self._output.add_many(out, client)
        chunks = n_chunks[usage]
        none = chunks == 0
        if none.any():
            n["requests_with_chunk_tokens"] += int(none.sum())
            n["tokens_after_last_chunk"] += int(out[none].sum())
            n["difference_in_chunked_requests"] += int((out[none] - client[none]).sum())
        known = ~none & chunk_tokens_known[usage]
        if known.any():
            ones, zeros = chunk_tokens_ones[usage][known], chunk_tokens_zeros[usage][known]
            total, k = chunk_tokens_sum[usage][known], chunks[known]
            n["requests_with_chunk_tokens"] += int(known.sum())
            n["chunks_with_tokens"] += int(k.sum())
            n["multi_token_chunks"] += int((k - ones - zeros).sum())
            n["tokens_in_multi_token_chunks"] += int((total - ones).sum())
            n["zero_token_chunks"] += int(zeros.sum())
            n["max_chunk_tokens"] = max(n["max_chunk_tokens"], int(chunk_tokens_max[usage][known].max()))
            n["tokens_after_last_chunk"] += int((out[known] - total).sum())
            n["difference_in_chunked_requests"] += int((out[known] - client[known]).sum())
        both = ok & ~prompt_tokens_missing & ~requested_prompt_tokens_missing
        self._prompt.add_many(prompt_tokens[both], requested_prompt_tokens[both])

    def result(self) -> TokenAudit:
        return TokenAudit(output=self._output.result(), prompt=self._prompt.result(), **self._n)


def token_audit(records: Iterable[Mapping[str, Any]]) -> TokenAudit:
    """The audit of ``records`` (dicts as read from a run's record files)."""
    builder = TokenAuditBuilder()
    for rec in records:
        builder.add(rec)
    return builder.result()


def audit_lines(a: TokenAudit) -> tuple[list[tuple[str, ...]], list[str]]:
    """The audit as a table (header row first) and sentences, for the report."""
    header = ("count", "requests", "server tokens", "client tokens", "equal", "server more", "server fewer",
              "sum of |difference|", "largest |difference|")
    rows = [header]
    for label, c in (("output: usage.completion_tokens vs content chunks received", a.output),
                     ("prompt: usage.prompt_tokens vs requested prompt tokens", a.prompt)):
        rows.append((label, *(f"{v:,}" for v in (c.requests, c.server_tokens, c.client_tokens, c.equal,
                                                  c.server_more, c.server_fewer, c.abs_difference_tokens,
                                                  c.max_abs_difference_tokens))))
    lines = [
        f"Successful requests: {a.requests:,}. The server reported usage for {a.output.requests:,}; "
        f"for {a.without_usage:,} it did not, so their {a.estimated_output_tokens:,} output tokens are the "
        "client's estimate (one token per content chunk) and are left out of the comparison.",
        f"Content chunks received: {a.content_chunks:,}. Per-chunk token counts (continuous usage) are known for "
        f"{a.chunks_with_tokens:,} chunks of {a.requests_with_chunk_tokens:,} requests (a request with no content "
        f"chunk counts, with no chunk): {a.multi_token_chunks:,} chunks carried more than one token "
        f"({a.tokens_in_multi_token_chunks:,} tokens in all, at most {a.max_chunk_tokens:,} in one chunk), "
        f"{a.zero_token_chunks:,} carried no new token, and {a.tokens_after_last_chunk:,} output tokens came after "
        "the last content chunk or in a request without one (tokens with no visible text).",
        f"Over those {a.requests_with_chunk_tokens:,} requests, server minus client = "
        f"{a.difference_in_chunked_requests:+,} tokens = ({a.tokens_in_multi_token_chunks:,} - "
        f"{a.multi_token_chunks:,}) extra tokens in multi-token chunks - {a.zero_token_chunks:,} chunks with no "
        f"new token + {a.tokens_after_last_chunk:,} tokens after the last chunk.",
    ]
    return rows, lines
