"""Trace files read into sorted entries, replay offsets, and malformed files reported as ``file:line: message``."""

import json
from pathlib import Path

import pytest

from envelope import traces
from envelope.config import ConfigError
from envelope.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceEntry,
    detect_trace_format,
    read_trace,
    trace_mean_rate_per_s,
    trace_offsets_s,
)


def write(tmp_path: Path, name: str, lines: list[dict | str]) -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        read_trace(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def entry(t_s: float, index: int = 0) -> TraceEntry:
    return TraceEntry(index=index, line=index + 1, t_s=t_s, prompt_tokens=10, output_tokens=5)


def test_public_api():
    assert set(traces.__all__) == {
        "MOONCAKE_BLOCK_TOKENS",
        "TraceFormat",
        "TraceEntry",
        "detect_trace_format",
        "read_trace",
        "trace_offsets_s",
        "trace_mean_rate_per_s",
    }
    assert MOONCAKE_BLOCK_TOKENS == 512


def test_mooncake_sorted_by_time_keeping_file_positions(tmp_path):
    path = write(
        tmp_path,
        "m.jsonl",
        [
            {"timestamp": 1500, "input_length": 1024, "output_length": 20, "hash_ids": [7, 8]},
            "",
            {"timestamp": 0, "input_length": 513, "output_length": 10, "hash_ids": [7, 9]},
            {"timestamp": 1500.5, "input_length": 40, "output_length": 1},
            {"timestamp": 1500, "input_length": 1, "output_length": 3, "hash_ids": [5]},
            {"timestamp": 250, "input_length": 600, "output_length": 30, "hash_ids": []},
        ],
    )
    assert detect_trace_format(path) == "mooncake"
    assert read_trace(path) == [
        TraceEntry(index=1, line=3, t_s=0.0, prompt_tokens=513, output_tokens=10, hash_ids=(7, 9)),
        TraceEntry(index=4, line=6, t_s=0.25, prompt_tokens=600, output_tokens=30),
        # equal times keep their order in the file
        TraceEntry(index=0, line=1, t_s=1.5, prompt_tokens=1024, output_tokens=20, hash_ids=(7, 8)),
        TraceEntry(index=3, line=5, t_s=1.5, prompt_tokens=1, output_tokens=3, hash_ids=(5,)),
        TraceEntry(index=2, line=4, t_s=1.5005, prompt_tokens=40, output_tokens=1),
    ]


def test_plain_jsonl(tmp_path):
    path = write(
        tmp_path,
        "t.jsonl",
        [
            {"t_s": 2, "prompt_tokens": 100, "output_tokens": 16, "session_id": 42},
            {"t_s": 0.5, "prompt_tokens": 50, "output_tokens": 8, "session_id": "chat-1"},
            {"t_s": 1.25, "prompt_tokens": 75, "output_tokens": 9},
        ],
    )
    assert detect_trace_format(path) == "jsonl"
    assert read_trace(path) == [
        TraceEntry(index=1, line=2, t_s=0.5, prompt_tokens=50, output_tokens=8, session_id="chat-1"),
        TraceEntry(index=2, line=3, t_s=1.25, prompt_tokens=75, output_tokens=9),
        TraceEntry(index=0, line=1, t_s=2.0, prompt_tokens=100, output_tokens=16, session_id="42"),
    ]
    assert isinstance(read_trace(path)[-1].t_s, float)


def test_named_format_overrides_detection(tmp_path):
    # A plain-format file read as Mooncake: its first line lacks 'timestamp'.
    path = write(tmp_path, "t.jsonl", [{"t_s": 0, "prompt_tokens": 1, "output_tokens": 1}])
    assert error_of(path, format="mooncake") == f"{path}:1: missing 'timestamp'"
    assert error_of(path, format="csv") == f"{path}:1: unknown trace format 'csv'; expected mooncake|jsonl"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], ":1: no requests: the file is empty"),
        (["", "  "], ":1: no requests: the file is empty"),
        (["", "not json"], ":2: not JSON: "),
        (["[1]"], ":1: an array, expected a request object"),
        (
            [{"prompt_tokens": 1}],
            ":1: cannot tell the trace format: the first request has neither 'timestamp' (mooncake) nor 't_s' (jsonl); "
            "set format: mooncake|jsonl",
        ),
    ],
)
def test_detect_errors(tmp_path, lines, expected):
    path = write(tmp_path, "x.jsonl", lines)
    with pytest.raises(ConfigError) as info:
        detect_trace_format(path)
    assert str(info.value).startswith(f"{path}{expected}")
    assert error_of(path).startswith(f"{path}{expected}")


GOOD_MOONCAKE = {"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("not json", "not JSON: "),
        ('"text"', "a string, expected a request object"),
        ({"input_length": 10, "output_length": 5}, "missing 'timestamp'"),
        ({"timestamp": 1, "output_length": 5}, "missing 'input_length'"),
        ({"timestamp": 1, "input_length": 10}, "missing 'output_length'"),
        ({**GOOD_MOONCAKE, "timestamp": -1}, "'timestamp' is negative (-1); expected milliseconds >= 0"),
        ({**GOOD_MOONCAKE, "timestamp": "5"}, "'timestamp' is '5', expected a number of milliseconds"),
        ({**GOOD_MOONCAKE, "timestamp": True}, "'timestamp' is True, expected a number of milliseconds"),
        ({**GOOD_MOONCAKE, "input_length": 0}, "'input_length' is 0, expected a positive integer of tokens"),
        ({**GOOD_MOONCAKE, "input_length": 10.0}, "'input_length' is 10.0, expected a positive integer of tokens"),
        ({**GOOD_MOONCAKE, "output_length": False}, "'output_length' is False, expected a positive integer of tokens"),
        ({**GOOD_MOONCAKE, "hash_ids": "1,2"}, "'hash_ids' is '1,2', expected a list of integers"),
        ({**GOOD_MOONCAKE, "hash_ids": [1, True]}, "'hash_ids' is [1, True], expected a list of integers"),
        (
            {**GOOD_MOONCAKE, "input_length": 513},
            "'input_length' 513 does not fit 1 hash_ids of 512 tokens (expected 1..512)",
        ),
        (
            {**GOOD_MOONCAKE, "input_length": 1024, "hash_ids": [1, 2, 3]},
            "'input_length' 1024 does not fit 3 hash_ids of 512 tokens (expected 1025..1536)",
        ),
    ],
)
def test_mooncake_errors(tmp_path, bad, expected):
    path = write(tmp_path, "m.jsonl", [GOOD_MOONCAKE, "", bad, GOOD_MOONCAKE])
    message = error_of(path, format="mooncake")
    assert message.startswith(f"{path}:3: {expected}")
    if not expected.endswith(": "):
        assert message == f"{path}:3: {expected}"


def test_mooncake_block_rule_edges(tmp_path):
    path = write(
        tmp_path,
        "m.jsonl",
        [
            {**GOOD_MOONCAKE, "input_length": 512, "hash_ids": [1]},
            {**GOOD_MOONCAKE, "input_length": 1025, "hash_ids": [1, 2, 3]},
            {**GOOD_MOONCAKE, "input_length": 99999, "hash_ids": None},
        ],
    )
    assert [e.prompt_tokens for e in read_trace(path)] == [512, 1025, 99999]


GOOD_PLAIN = {"t_s": 0, "prompt_tokens": 10, "output_tokens": 5}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"prompt_tokens": 10, "output_tokens": 5}, "missing 't_s'"),
        ({"t_s": 1, "output_tokens": 5}, "missing 'prompt_tokens'"),
        ({"t_s": 1, "prompt_tokens": 5}, "missing 'output_tokens'"),
        ({**GOOD_PLAIN, "t_s": -0.5}, "'t_s' is negative (-0.5); expected seconds >= 0"),
        ({**GOOD_PLAIN, "t_s": None}, "'t_s' is None, expected a number of seconds"),
        ({**GOOD_PLAIN, "prompt_tokens": -3}, "'prompt_tokens' is -3, expected a positive integer of tokens"),
        ({**GOOD_PLAIN, "output_tokens": "8"}, "'output_tokens' is '8', expected a positive integer of tokens"),
        ({**GOOD_PLAIN, "session_id": True}, "'session_id' is True, expected a string or an integer"),
        ({**GOOD_PLAIN, "session_id": ["a"]}, "'session_id' is ['a'], expected a string or an integer"),
    ],
)
def test_plain_errors(tmp_path, bad, expected):
    path = write(tmp_path, "t.jsonl", [GOOD_PLAIN, bad])
    assert error_of(path) == f"{path}:2: {expected}"


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(GOOD_PLAIN).encode() + b'\n{"t_s": "\xff"}\n')
    assert error_of(path) == f"{path}:2: not UTF-8 text (byte 10 of the line)"
    missing = tmp_path / "none.jsonl"
    assert error_of(missing) == f"{missing}:1: file not found"


# --- replay -----------------------------------------------------------------------------------------------

TIMES_S = [10.0, 10.5, 12.0, 14.0]


def test_offsets_from_the_first_entry():
    entries = [entry(t, i) for i, t in enumerate(TIMES_S)]
    assert trace_offsets_s(entries) == [0.0, 0.5, 2.0, 4.0]
    assert trace_offsets_s(entries, speedup=4) == [0.0, 0.125, 0.5, 1.0]
    assert trace_offsets_s([]) == []
    assert trace_offsets_s([entry(3.0)]) == [0.0]


def test_offsets_scaled_to_a_rate():
    entries = [entry(t, i) for i, t in enumerate(TIMES_S)]
    assert trace_mean_rate_per_s(entries) == 3 / 4
    offsets = trace_offsets_s(entries, rate_per_s=3.0)
    assert offsets == pytest.approx([0.0, 0.125, 0.5, 1.0])
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(3.0)


def test_mean_rate_without_a_span():
    assert trace_mean_rate_per_s([]) is None
    assert trace_mean_rate_per_s([entry(1.0)]) is None
    assert trace_mean_rate_per_s([entry(1.0), entry(1.0, 1)]) is None


@pytest.mark.parametrize(
    ("entries", "kwargs", "match"),
    [
        ([entry(0.0), entry(1.0, 1)], {"speedup": 2.0, "rate_per_s": 1.0}, "not both"),
        ([entry(1.0), entry(1.0, 1)], {"rate_per_s": 1.0}, "span no time"),
        ([entry(1.0)], {"rate_per_s": 1.0}, "span no time"),
        ([entry(0.0)], {"speedup": 0.0}, "speedup must be a positive number"),
        ([entry(0.0)], {"rate_per_s": -1.0}, "rate_per_s must be a positive number"),
        ([entry(2.0), entry(1.0, 1)], {}, "not in time order"),
    ],
)
def test_offsets_reject(entries, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trace_offsets_s(entries, **kwargs)


def test_read_then_replay(tmp_path):
    path = write(
        tmp_path,
        "m.jsonl",
        [
            {"timestamp": 3000, "input_length": 5, "output_length": 5},
            {"timestamp": 1000, "input_length": 5, "output_length": 5},
            {"timestamp": 2000, "input_length": 5, "output_length": 5},
        ],
    )
    entries = read_trace(path)
    assert trace_offsets_s(entries, speedup=2) == [0.0, 0.5, 1.0]
    assert [e.line for e in entries] == [2, 3, 1]
