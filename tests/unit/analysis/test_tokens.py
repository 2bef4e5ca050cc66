"""Token-count audit: server usage against the client's estimate, on hand-made records."""

from __future__ import annotations

from analysis.load import load_run
from analysis.tokens import CountComparison, TokenAudit, audit_lines, token_audit


def rec(*, out=None, chunks=None, estimate=None, estimated=False, error=None, prompt=None, asked=None,
        n_chunks=None) -> dict:
    """A record with only the fields the audit reads; ``chunks`` is the per-chunk token list."""
    n = n_chunks if n_chunks is not None else (len(chunks) if chunks is not None else 0)
    return {"error_category": error, "output_tokens": out, "output_tokens_estimated": estimated,
            "output_tokens_client_estimate": estimate if estimate is not None else n,
            "chunk_offsets_s": [0.1 * (i + 1) for i in range(n)], "chunk_tokens": chunks,
            "prompt_tokens": prompt, "requested_prompt_tokens": asked}


RECORDS = [
    rec(out=4, chunks=[1, 1, 1, 1], prompt=100, asked=100),  # exact
    rec(out=7, chunks=[1, 3, 0, 2], prompt=102, asked=100),  # multi-token chunks, an empty one, 1 token after
    rec(out=5, chunks=[1, 1, 1], prompt=99, asked=100),  # 2 tokens after the last content chunk
    rec(out=6, chunks=None, n_chunks=4),  # usage at the end only: no per-chunk counts
    rec(out=3, estimated=True, chunks=None, n_chunks=3),  # the server reported no usage
    rec(out=2, chunks=None, n_chunks=0),  # two tokens, neither with visible text: no content chunk
    rec(out=9, chunks=[9], error="connection_reset", prompt=1, asked=50),  # failed: not audited
]


def test_audit_of_hand_made_records():
    a = token_audit(RECORDS)
    assert a.requests == 6
    assert (a.without_usage, a.estimated_output_tokens) == (1, 3)
    # server 4+7+5+6+2 = 24 against chunks 4+4+3+4+0 = 15; differences 0, +3, +2, +2, +2
    assert a.output == CountComparison(requests=5, server_tokens=24, client_tokens=15, equal=1, server_more=4,
                                       server_fewer=0, abs_difference_tokens=9, max_abs_difference_tokens=3)
    assert a.prompt == CountComparison(requests=3, server_tokens=301, client_tokens=300, equal=1, server_more=1,
                                       server_fewer=1, abs_difference_tokens=3, max_abs_difference_tokens=2)
    assert a.content_chunks == 4 + 4 + 3 + 4 + 3
    assert (a.requests_with_chunk_tokens, a.chunks_with_tokens) == (4, 11)
    assert (a.multi_token_chunks, a.tokens_in_multi_token_chunks, a.max_chunk_tokens) == (2, 5, 3)
    assert a.zero_token_chunks == 1
    assert a.tokens_after_last_chunk == (7 - 6) + (5 - 3) + 2
    assert a.difference_in_chunked_requests == 0 + 3 + 2 + 2


def test_the_difference_is_explained_exactly():
    a = token_audit(RECORDS)
    explained = (a.tokens_in_multi_token_chunks - a.multi_token_chunks) - a.zero_token_chunks + a.tokens_after_last_chunk
    assert explained == a.difference_in_chunked_requests


def test_client_estimate_falls_back_to_the_chunk_count():
    r = rec(out=5, chunks=[2, 1, 2])
    del r["output_tokens_client_estimate"]
    a = token_audit([r])
    assert (a.output.client_tokens, a.output.server_more, a.multi_token_chunks) == (3, 1, 2)


def test_empty_and_all_failed():
    assert token_audit([]) == TokenAudit()
    assert token_audit([rec(out=1, chunks=[1], error="http_500")]).requests == 0


def test_audit_lines_state_the_numbers():
    rows, lines = audit_lines(token_audit(RECORDS))
    assert rows[0][0] == "count" and len(rows) == 3
    assert rows[1][1:] == ("5", "24", "15", "1", "4", "0", "9", "3")
    assert "for 1 it did not, so their 3 output tokens are the client's estimate" in lines[0]
    assert "known for 11 chunks of 4 requests" in lines[1]
    assert "2 chunks carried more than one token (5 tokens in all, at most 3 in one chunk), 1 carried no new token, " \
           "and 5 output tokens came after the last content chunk" in lines[1]
    assert "server minus client = +7 tokens = (5 - 2) extra tokens" in lines[2]


def test_loader_audits_every_record(builders, tmp_path):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 1, 1000.0, 1030.0)
    recs = [make_record(st, 1001.0 + i, 0.1, tokens=5) for i in range(7)]
    recs[2]["chunk_tokens"] = [1, 2, 1, 1, 1]  # the server counted 6 tokens in 5 chunks
    recs[2]["output_tokens"] = 6
    recs[3].update(output_tokens_estimated=True)  # as if the server sent no usage
    recs.append(make_record(st, 1020.0, 0.0, error="http_500"))
    run = load_run(write_run(tmp_path / "run", stages=[st], records=recs))
    assert run.token_audit == token_audit(recs)
    a = run.token_audit
    assert (a.requests, a.without_usage, a.output.requests, a.output.server_more, a.multi_token_chunks) == (7, 1, 6, 1, 1)
    assert a.prompt.requests == 0  # the builder's records name no requested prompt length
