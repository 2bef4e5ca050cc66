import csv
import io
import json
from pathlib import Path

import orjson
import pytest

from envelope import metrics
from envelope.records import (
    RECORD_FIELDS,
    ErrorCategory,
    RecordWriter,
    RequestRecord,
    read_records,
    record_from_dict,
    upgrade_record,
)

GOLDEN_RECORDS = Path(__file__).parents[2] / "fixtures" / "golden_run" / "records"


def record(**overrides) -> RequestRecord:
    """A successful request: first token 0.25 s after the start, last token 1.25 s after, 5 tokens."""
    fields = dict(
        run_id="run", request_id="r1", worker_id="h:1", client="chat", endpoint="chat", pass_name="p",
        stage_index=0, stage_name="s", wall_start_unix_s=1_700_000_000.0, t_start_s=10.0,
        t_first_byte_s=10.1, t_first_event_s=10.2, t_first_token_s=10.25, t_last_token_s=11.25, t_done_s=11.3,
        chunk_offsets_s=(0.25, 0.5, 0.75, 1.0, 1.25), chunk_tokens=(1, 1, 1, 1, 1), prompt_tokens=12,
        output_tokens=5, output_tokens_client_estimate=5, http_status=200,
    )
    fields.update(overrides)
    return RequestRecord(**fields)


def old_format_line(rec: RequestRecord) -> bytes:
    """``rec`` as a run written before the rename stored it: ``t_end_s`` in place of ``t_last_token_s``."""
    data = orjson.loads(rec.to_json_line())
    return orjson.dumps({("t_end_s" if k == "t_last_token_s" else k): v for k, v in data.items()}) + b"\n"


def test_writer_writes_the_new_name_only():
    data = orjson.loads(record().to_json_line())
    assert data["t_last_token_s"] == 11.25 and "t_end_s" not in data
    assert "t_last_token_s" in RECORD_FIELDS and "t_end_s" not in RECORD_FIELDS


def test_old_format_line_reads_with_the_same_metrics_as_the_new_one():
    rec = record()
    new = next(read_records(io.BytesIO(rec.to_json_line())))
    old = next(read_records(io.BytesIO(old_format_line(rec))))
    assert old == new and "t_end_s" not in old
    for metric in (metrics.ttft_s, metrics.e2e_s, metrics.tpot_s):
        assert metric(old) == metric(new) is not None
    assert (metrics.ttft_s(old), metrics.e2e_s(old), metrics.tpot_s(old)) == (0.25, 1.25, 0.25)
    frames = [metrics.per_request_frame([r]) for r in (old, new)]
    for column in ("ttft_ms", "e2e_ms", "tpot_ms"):
        assert frames[0][column].tolist() == frames[1][column].tolist()
    assert frames[0]["e2e_ms"].tolist() == [pytest.approx(1250.0)]


def test_old_format_file_reads_through_read_records(tmp_path):
    path = tmp_path / "records" / "h_1.jsonl"
    path.parent.mkdir()
    path.write_bytes(old_format_line(record(request_id="old")) + record(request_id="new").to_json_line())
    old, new = read_records([path])
    assert old["t_last_token_s"] == new["t_last_token_s"] == 11.25
    assert "t_end_s" not in old


def test_record_from_dict_reads_the_old_name_without_changing_its_input():
    data = orjson.loads(old_format_line(record()))
    assert record_from_dict(data) == record()
    assert data["t_end_s"] == 11.25 and "t_last_token_s" not in data


def test_upgrade_keeps_the_new_name_when_a_line_has_both():
    assert upgrade_record({"t_end_s": 1.0, "t_last_token_s": 2.0}) == {"t_last_token_s": 2.0}
    assert upgrade_record({"t_done_s": 3.0}) == {"t_done_s": 3.0}


def test_golden_run_records_are_old_format_and_still_read():
    path, = sorted(GOLDEN_RECORDS.glob("*.jsonl"))
    assert b'"t_end_s"' in path.read_bytes()  # written before the rename: the proof old runs still read
    records = list(read_records([path]))
    ok = [r for r in records if r["error_category"] is None]
    assert ok and all("t_end_s" not in r for r in records)
    assert all(metrics.e2e_s(r) is not None and metrics.e2e_s(r) >= metrics.ttft_s(r) for r in ok)


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
    line = record(error_category=member, error_detail="d", t_last_token_s=None).to_json_line()
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
        writer.write(record(error_category=ErrorCategory.CANCELLED, t_last_token_s=None))
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
