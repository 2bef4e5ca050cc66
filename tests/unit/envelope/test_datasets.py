"""Dataset files read into entries, and every malformed file reported as ``file:line: message``."""

import json
from pathlib import Path

import pytest

from envelope import datasets
from envelope.config import ConfigError
from envelope.datasets import DatasetEntry, detect_dataset_format, read_dataset


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        read_dataset(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_public_api():
    assert set(datasets.__all__) == {"DatasetFormat", "DatasetEntry", "detect_dataset_format", "read_dataset"}


@pytest.mark.parametrize(
    ("name", "expected"), [("a.json", "sharegpt"), ("a.JSONL", "jsonl"), ("dir/prompts.txt", "text")]
)
def test_format_from_suffix(name, expected):
    assert detect_dataset_format(name) == expected


def test_unknown_suffix_asks_for_a_format():
    with pytest.raises(ConfigError) as info:
        detect_dataset_format("data/prompts.csv")
    assert str(info.value) == "data/prompts.csv:1: cannot tell the format from the name; set format: sharegpt|jsonl|text"


# --- ShareGPT ---------------------------------------------------------------------------------------------

SHAREGPT = """[
  {"id": "a", "conversations": [
    {"from": "human", "value": "What is a river?"},
    {"from": "gpt", "value": "Water that flows."}
  ]},
  {"id": "b", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Name a color."},
    {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "Another?"},
    {"from": "gpt", "value": "Red."}
  ]},
  {"conversations": [{"from": "user", "value": "Aliases?"}, {"from": "assistant", "value": "Yes."}]},
  {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Hi."}]}
]
"""


def test_sharegpt_array(tmp_path):
    entries = read_dataset(write(tmp_path, "d.json", SHAREGPT))
    assert entries == [
        DatasetEntry(index=0, line=2, messages=(("user", "What is a river?"),), answer="Water that flows."),
        DatasetEntry(
            index=1, line=6, messages=(("system", "Be brief."), ("user", "Name a color.")), answer="Blue."
        ),
        DatasetEntry(index=2, line=13, messages=(("user", "Aliases?"),), answer="Yes."),
        # a gpt turn before the first human one is skipped; no answer follows the prompt
        DatasetEntry(index=3, line=14, messages=(("user", "Hi."),), answer=None),
    ]


def test_sharegpt_limit_stops_early(tmp_path):
    # Everything after the second entry is broken: with a limit it is never read.
    path = write(tmp_path, "d.json", SHAREGPT.rsplit("\n  {", 2)[0] + "\n  {not json at all")
    entries = read_dataset(path, limit=2)
    assert [e.index for e in entries] == [0, 1]
    assert error_of(path).startswith(f"{path}:13: not JSON: ")


def test_sharegpt_elements_longer_than_a_read_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_CHUNK_BYTES", 16)
    conversations = [
        {"conversations": [{"from": "human", "value": f"question {i} " + "word " * 50}, {"from": "gpt", "value": "ok"}]}
        for i in range(5)
    ]
    text = "[\n" + ",\n\n".join(json.dumps(c) for c in conversations) + "\n]\n"
    entries = read_dataset(write(tmp_path, "d.json", text))
    assert [e.line for e in entries] == [2, 4, 6, 8, 10]
    assert [e.messages[0][1].split()[:2] for e in entries] == [["question", str(i)] for i in range(5)]


def test_sharegpt_json_lines(tmp_path):
    text = (
        '\n{"conversations": [{"from": "human", "value": "One?"}, {"from": "gpt", "value": "1"}]}\n'
        '\n{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Two?"}]}\n'
    )
    entries = read_dataset(write(tmp_path, "d.json", text))
    assert entries == [
        DatasetEntry(index=0, line=2, messages=(("user", "One?"),), answer="1"),
        DatasetEntry(index=1, line=4, messages=(("system", "S"), ("user", "Two?"))),
    ]


def test_sharegpt_format_named_for_any_suffix(tmp_path):
    path = write(tmp_path, "d.data", '[{"conversations": [{"from": "human", "value": "Q"}]}]')
    assert read_dataset(path, format="sharegpt") == [DatasetEntry(index=0, line=1, messages=(("user", "Q"),))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[\n  {"conversations": [\n    {"from": "human", "value": "Q"}\n  ]\n', ":5: not JSON: Expecting ',' delimiter"),
        ('[\n  {"conversations": [{"from": "human", "value": "Q"}]}\n', ":3: the array is not closed (missing ']')"),
        ('[\n  {"conversations": []},\n  {"conversations": [\n  }\n]', ":2: entry 0 has no human turn"),
        ('[\n  {"conversations": [{"from": "human", "value": "Q"}]},\n  {"conversations": [\n}]', ":4: not JSON: "),
        ('{"a": 1}', ":1: entry 0 has no 'conversations'"),
        ('"text"', ":1: expected a JSON array of conversations"),
        ('[\n 1,\n 2]', ":2: entry 0 is a number, expected an object with 'conversations'"),
        ('[{"conversations": {"from": "human"}}]', ":1: entry 0: 'conversations' is an object, expected a list"),
        ('[{"conversations": [{"from": "human", "value": "Q"}]},\n{"x": 1}]', ":2: entry 1 has no 'conversations'"),
        ('[{"conversations": [{"from": "human"}]}]', ":1: entry 0: turn 0 (human) has no text in 'value'"),
        ('[{"conversations": [{"from": "human", "value": " "}]}]', ":1: entry 0: turn 0 (human) has no text"),
        ('[{"conversations": [{"from": "human", "value": 3}]}]', ":1: entry 0: turn 0 (human) has no text"),
        (
            '[{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}]',
            ":1: entry 0: turn 1 (gpt) has no text in 'value'",
        ),
        ('[{"conversations": [{"from": "bing", "value": "Q"}]}]', ":1: entry 0: turn 0 has 'from' 'bing', expected "),
        ('[{"conversations": ["Q"]}]', ":1: entry 0: turn 0 is a string, expected an object"),
        ('[{"conversations": [{"from": "human", "value": "Q"}]} {}]', ":1: not JSON: expected ',' or ']'"),
        ('[{"conversations": [{"from": "human", "value": "Q"}]},]', ":1: not JSON: Expecting value"),
        ('[{"conversations": [{"from": "human", "value": "Q"}]}]\n[]', ":2: not JSON: extra text after the array"),
        ('{"conversations": []}\nnope\n', ":1: entry 0 has no human turn"),
        ('{"conversations": [{"from": "human", "value": "Q"}]}\nnope\n', ":2: not JSON: "),
        ("[]", ":1: no entries"),
        ("  \n\n", ":1: no entries"),
    ],
)
def test_sharegpt_errors(tmp_path, text, expected):
    path = write(tmp_path, "d.json", text)
    assert error_of(path).startswith(f"{path}{expected}")


# --- JSON lines -------------------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    lines = [
        {"prompt": "Plain question", "output_tokens": 32, "id": "ignored"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
        {
            "messages": [
                {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"},
            ],
            "output_tokens": 7,
        },
    ]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n  \n" + json.dumps(lines[2]))
    assert read_dataset(path) == [
        DatasetEntry(index=0, line=1, prompt="Plain question", output_tokens=32),
        DatasetEntry(index=1, line=2, messages=(("system", "S"), ("user", "U"))),
        DatasetEntry(index=2, line=5, messages=(("user", "U1"), ("assistant", "A1"), ("user", "U2")), output_tokens=7),
    ]
    assert [e.index for e in read_dataset(path, limit=1)] == [0]


def test_jsonl_limit_reads_no_further(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\nnot json\n')
    assert [e.prompt for e in read_dataset(path, limit=2)] == ["a", "b"]
    assert error_of(path).startswith(f"{path}:3: not JSON: ")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{prompt: 1}", "not JSON: "),
        ("[1, 2]", "an array, expected an object with 'prompt' or 'messages'"),
        ('{"output_tokens": 3}', "neither of 'prompt' and 'messages'; give exactly one"),
        ('{"prompt": "p", "messages": []}', "both of 'prompt' and 'messages'; give exactly one"),
        ('{"prompt": ""}', "'prompt' has no text"),
        ('{"prompt": ["p"]}', "'prompt' has no text"),
        ('{"messages": []}', "'messages' is not a non-empty list"),
        ('{"messages": ["hi"]}', "message 0 is a string, expected {role, content}"),
        ('{"messages": [{"role": "user", "content": ""}]}', "message 0 (user) has no text in 'content'"),
        ('{"messages": [{"role": "user"}]}', "message 0 (user) has no text in 'content'"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "message 0 has role 'tool', expected system|user|assistant"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "the last message is from assistant; it must be from user",
        ),
        ('{"prompt": "p", "output_tokens": 0}', "'output_tokens' is 0, expected a positive integer"),
        ('{"prompt": "p", "output_tokens": true}', "'output_tokens' is True, expected a positive integer"),
        ('{"prompt": "p", "output_tokens": 12.5}', "'output_tokens' is 12.5, expected a positive integer"),
        ('{"prompt": "p", "output_tokens": "12"}', "'output_tokens' is '12', expected a positive integer"),
    ],
)
def test_jsonl_errors(tmp_path, line, expected):
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}\n\n' + line + "\n")
    assert error_of(path).startswith(f"{path}:3: {expected}")


# --- text -------------------------------------------------------------------------------------------------


def test_text(tmp_path):
    path = write(tmp_path, "p.txt", "First prompt  \n\n   \t\nSecond\r\n  third, indented\n")
    assert read_dataset(path) == [
        DatasetEntry(index=0, line=1, prompt="First prompt  "),
        DatasetEntry(index=1, line=4, prompt="Second"),
        DatasetEntry(index=2, line=5, prompt="  third, indented"),
    ]
    assert read_dataset(path, limit=2)[-1].prompt == "Second"


def test_text_format_overrides_suffix(tmp_path):
    path = write(tmp_path, "p.json", "[not, json]\n")
    assert read_dataset(path, format="text") == [DatasetEntry(index=0, line=1, prompt="[not, json]")]


def test_text_byte_order_mark_is_not_part_of_the_prompt(tmp_path):
    path = write(tmp_path, "p.txt", "\ufeffhello\n".encode())
    assert read_dataset(path)[0].prompt == "hello"


# --- any format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e.json", "e.jsonl", "e.txt"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path, name, "")
    assert error_of(path).startswith(f"{path}:1: no entries")


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("bad.txt", b"ok\nalso ok\n\xff\xfe\n", 3),
        ("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": "\xe9"}\n', 2),
        ("bad.json", b'[\n{"conversations": [{"from": "human", "value": "\xe9"}]}]', 2),
    ],
)
def test_not_utf8_names_its_line(tmp_path, name, data, line):
    path = write(tmp_path, name, data)
    assert error_of(path).startswith(f"{path}:{line}: not UTF-8 text")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    assert error_of(path) == f"{path}:1: file not found"


def test_directory_cannot_be_read(tmp_path):
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    assert error_of(path).startswith(f"{path}:1: cannot read: ")


def test_unknown_format(tmp_path):
    path = write(tmp_path, "p.txt", "hi\n")
    assert error_of(path, format="csv") == f"{path}:1: unknown dataset format 'csv'; expected sharegpt|jsonl|text"


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_bad_limit(tmp_path, limit):
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        read_dataset(write(tmp_path, "p.txt", "hi\n"), limit=limit)


def test_path_is_reported_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "rel.jsonl", "{}\n")
    assert error_of("rel.jsonl") == "rel.jsonl:1: neither of 'prompt' and 'messages'; give exactly one"
