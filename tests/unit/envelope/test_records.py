import csv
import io
import json

import orjson
import pytest

from envelope.records import ErrorCategory, RecordWriter, RequestRecord, read_records


def record(**overrides) -> RequestRecord:
    """A successful request: first token 0.25 s after the start, last token 1.25 s after, 5 tokens."""
    fields = dict(
        run_id="run", request_id="r1", worker_id="h:1", client="chat", endpoint="chat", pass_name="p",
        stage_index=0, stage_name="s", wall_start_unix_s=1_700_000_000.0, t_start_s=10.0,
        t_first_byte_s=10.1, t_first_event_s=10.2, t_first_token_s=10.25, t_end_s=11.25, t_done_s=11.3,
        chunk_offsets_s=(0.25, 0.5, 0.75, 1.0, 1.25), chunk_tokens=(1, 1, 1, 1, 1), prompt_tokens=12,
        output_tokens=5, output_tokens_client_estimate=5, http_status=200,
    )
    fields.update(overrides)
    return RequestRecord(**fields)


# -- ErrorCategory ------------------------------------------------------------------------------

# Every category as records on disk spell it: the enum must not change one.
CATEGORY_VALUES = {
    "HTTP_400": "http_400", "HTTP_401": "http_401", "HTTP_403": "http_403", "HTTP_404": "http_404",
    "HTTP_429": "http_429", "HTTP_4XX": "http_4xx", "HTTP_500": "http_500", "HTTP_503": "http_503",
    "HTTP_5XX": "http_5xx", "CONNECT_ERROR": "connect_error", "CONNECTION_RESET": "connection_reset",
    "CONNECTION_CLOSED": "connection_closed", "TIMEOUT_CONNECT": "timeout_connect",
    "TIMEOUT_FIRST_TOKEN": "timeout_first_token", "TIMEOUT_TOTAL": "timeout_total", "MALFORMED_SSE": "malformed_sse",
    "STREAM_ERROR_EVENT": "stream_error_event", "INCOMPLETE_STREAM": "incomplete_stream",
    "MISSING_USAGE": "missing_usage", "CLIENT_ERROR": "client_error", "CANCELLED": "cancelled",
}


def test_error_categories_are_their_strings():
    assert {m.name: m.value for m in ErrorCategory} == CATEGORY_VALUES
    for member in ErrorCategory:
        assert member == member.value and hash(member) == hash(member.value)
        assert str(member) == f"{member}" == member.value
    # what the integration tests use to list the known categories
    assert {v for k, v in vars(ErrorCategory).items() if k.isupper()} == set(CATEGORY_VALUES.values())
    assert ErrorCategory("cancelled") is ErrorCategory.CANCELLED


def test_error_category_serialises_as_the_plain_string():
    member = ErrorCategory.TIMEOUT_FIRST_TOKEN
    assert orjson.dumps(member) == b'"timeout_first_token"'
    assert orjson.dumps({"error_category": member}) == b'{"error_category":"timeout_first_token"}'
    assert json.dumps({"error_category": member}) == '{"error_category": "timeout_first_token"}'
    line = record(error_category=member, error_detail="d", t_end_s=None).to_json_line()
    assert b'"error_category":"timeout_first_token"' in line
    assert orjson.loads(line)["error_category"] == "timeout_first_token"
    sink = io.StringIO()
    csv.writer(sink).writerow([member, ErrorCategory.HTTP_5XX])
    assert sink.getvalue() == "timeout_first_token,http_5xx\r\n"
    sink = io.StringIO()
    writer = csv.DictWriter(sink, fieldnames=["category"])
    writer.writerow({"category": member})
    assert sink.getvalue() == "timeout_first_token\r\n"


def test_record_writer_writes_the_plain_string(tmp_path):
    with RecordWriter(tmp_path / "r.jsonl") as writer:
        writer.write(record(error_category=ErrorCategory.CANCELLED, t_end_s=None))
    rec, = read_records(tmp_path / "r.jsonl")
    assert type(rec["error_category"]) is str and rec["error_category"] == ErrorCategory.CANCELLED


@pytest.mark.parametrize(
    ("status", "category"),
    [(400, "http_400"), (401, "http_401"), (403, "http_403"), (404, "http_404"), (429, "http_429"),
     (402, "http_4xx"), (418, "http_4xx"), (499, "http_4xx"), (500, "http_500"), (503, "http_503"),
     (502, "http_5xx"), (504, "http_5xx"), (599, "http_5xx"), (302, "http_5xx"), (600, "http_5xx")],
)
def test_for_status(status, category):
    result = ErrorCategory.for_status(status)
    assert result == category and isinstance(result, ErrorCategory)
