import orjson
import pytest

from envelope.records import RequestRecord
from envelope.stream import StreamObserver


def chat_chunk(content=None, *, role=False, completion_tokens=None, prompt_tokens=12, finish=None, choices=True):
    """A vLLM-shaped chat.completion.chunk as JSON bytes."""
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if choices:
        delta = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        obj["choices"] = []
    if completion_tokens is not None:
        obj["usage"] = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
    return orjson.dumps(obj)


def completion_chunk(text, completion_tokens=None):
    obj = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}],
    }
    if completion_tokens is not None:
        obj["usage"] = {"prompt_tokens": 5, "total_tokens": 5 + completion_tokens, "completion_tokens": completion_tokens}
    return orjson.dumps(obj)


T0 = 100.0

# continuous usage: role-only chunk, then " the" (1 token), " quick brown" (2), " fox" (1),
# a finish chunk with empty content, the usage-only chunk, [DONE]
CONTINUOUS = [
    (100.50, chat_chunk("", role=True, completion_tokens=0)),
    (100.52, chat_chunk(" the", completion_tokens=1)),
    (100.60, chat_chunk(" quick brown", completion_tokens=3)),
    (100.65, chat_chunk(" fox", completion_tokens=4)),
    (100.66, chat_chunk("", completion_tokens=4, finish="length")),
    (100.67, chat_chunk(None, choices=False, completion_tokens=4)),
    (100.68, b"[DONE]"),
]


def by_bytes(events, *, t_finish=101.0, split=None, keep_text=False):
    obs = StreamObserver(T0, keep_text=keep_text)
    for t, payload in events:
        raw = b"data: " + payload + b"\n\n"
        if split is None:
            obs.on_bytes(raw, t)
        else:  # one event split over two reads at the same time
            obs.on_bytes(raw[:split], t)
            obs.on_bytes(raw[split:], t)
    return obs, obs.finish(t_finish, http_status=200)


def by_events(events, *, t_finish=101.0, parsed=False):
    obs = StreamObserver(T0)
    for t, payload in events:
        if parsed and payload != b"[DONE]":
            obs.on_event(orjson.loads(payload), t)
        else:
            obs.on_event(payload, t)
    return obs, obs.finish(t_finish, http_status=200)


def test_continuous_usage_stream():
    obs, f = by_bytes(CONTINUOUS)
    assert obs.usage_seen
    assert f["t_first_event_s"] == 100.50  # the role-only chunk
    assert f["t_first_token_s"] == 100.52  # the first token (the role chunk has completion_tokens 0)
    assert f["t_last_token_s"] == 100.65  # the last token, not the finish chunk (no new token) or [DONE]
    assert f["t_done_s"] == 101.0
    assert f["chunk_offsets_s"] == pytest.approx((0.52, 0.60, 0.65))
    assert f["chunk_tokens"] == (1, 2, 1)  # 1-0, 3-1, 4-3
    assert f["prompt_tokens"] == 12
    assert f["output_tokens"] == 4
    assert f["output_tokens_estimated"] is False
    assert f["output_tokens_client_estimate"] == 3
    assert f["error_category"] is None and f["error_detail"] is None
    assert f["http_status"] == 200
    assert "completion_text" not in f


def test_fields_build_a_record():
    _, f = by_bytes(CONTINUOUS)
    rec = RequestRecord(
        run_id="r", request_id="1", worker_id="h:1", client="c", endpoint="chat",
        pass_name="p", stage_index=0, stage_name="s", wall_start_unix_s=0.0, t_start_s=T0, **f,
    )
    assert rec.ok and rec.output_tokens == 4


@pytest.mark.parametrize("split", [None, 1, 3, 5, 6, 40, -2, -1])
def test_bytes_events_and_dicts_agree(split):
    _, from_bytes = by_bytes(CONTINUOUS, split=split)
    _, from_events = by_events(CONTINUOUS)
    _, from_dicts = by_events(CONTINUOUS, parsed=True)
    assert from_bytes == from_events == from_dicts


def test_all_events_in_one_read_with_crlf():
    raw = b"".join(b"data: " + p + b"\r\n\r\n" for _, p in CONTINUOUS)
    obs = StreamObserver(T0)
    obs.on_bytes(raw[:7], 100.7)
    obs.on_bytes(raw[7:], 100.8)
    f = obs.finish(101.0)
    # every event finished by the second read gets its time
    assert f["t_first_event_s"] == 100.8 and f["t_first_token_s"] == 100.8 and f["t_last_token_s"] == 100.8
    assert f["chunk_tokens"] == (1, 2, 1)
    assert f["error_category"] is None


def test_final_usage_only_chunk_without_continuous_usage():
    events = [
        (100.5, chat_chunk("", role=True)),
        (100.6, chat_chunk("a")),
        (100.7, chat_chunk("b")),
        (100.8, chat_chunk(None, choices=False, completion_tokens=2, prompt_tokens=30)),
        (100.9, b"[DONE]"),
    ]
    for _, f in (by_bytes(events), by_events(events), by_events(events, parsed=True)):
        assert f["chunk_tokens"] is None  # content chunks carried no usage
        assert f["output_tokens"] == 2 and f["output_tokens_estimated"] is False
        assert f["prompt_tokens"] == 30
        assert f["t_last_token_s"] == 100.7
        assert f["error_category"] is None


def test_no_usage_falls_back_to_client_estimate():
    """A server that never gives usage (not expected): a success counted by the client."""
    events = [(100.5, chat_chunk("", role=True)), (100.6, chat_chunk("a")), (100.7, chat_chunk("b")), (100.8, b"[DONE]")]
    obs, f = by_bytes(events)
    assert not obs.usage_seen
    assert f["output_tokens"] == 2 and f["output_tokens_estimated"] is True
    assert f["output_tokens_client_estimate"] == 2
    assert f["prompt_tokens"] is None
    assert f["error_category"] is None  # usage_expected defaults to False: not a failure
    assert f == by_events(events)[1]


def _finish_with(events, **kwargs):
    obs = StreamObserver(T0)
    for t, payload in events:
        obs.on_bytes(b"data: " + payload + b"\n\n", t)
    return obs.finish(101.0, http_status=200, **kwargs)


def test_missing_usage_only_when_expected():
    no_usage = [(100.5, chat_chunk("", role=True)), (100.6, chat_chunk("a")), (100.7, chat_chunk("b")), (100.8, b"[DONE]")]
    f = _finish_with(no_usage, usage_expected=True)
    assert f["error_category"] == "missing_usage"
    assert "include_usage" in f["error_detail"]
    # what was observed is kept: the client estimate, the token chunks
    assert f["output_tokens"] == 2 and f["output_tokens_estimated"] is True
    assert f["t_first_token_s"] == 100.6 and f["t_last_token_s"] == 100.7
    # not expected (not asked for, or this server has not given usage yet): a success
    assert _finish_with(no_usage, usage_expected=False)["error_category"] is None
    # expected and given, even only in the final usage-only chunk: a success
    assert _finish_with(CONTINUOUS, usage_expected=True)["error_category"] is None
    final_only = no_usage[:3] + [(100.75, chat_chunk(None, choices=False, completion_tokens=2)), no_usage[3]]
    assert _finish_with(final_only, usage_expected=True)["error_category"] is None
    # a stream that failed otherwise keeps its own category
    assert _finish_with(no_usage[:3], usage_expected=True)["error_category"] == "incomplete_stream"
    assert _finish_with(no_usage, usage_expected=True, error_category="timeout_total")["error_category"] == "timeout_total"


def test_partial_usage_gives_no_chunk_tokens():
    events = [
        (100.6, chat_chunk("a", completion_tokens=1)),
        (100.7, chat_chunk("b")),  # this one lacks usage
        (100.8, chat_chunk("c", completion_tokens=3)),
        (100.9, b"[DONE]"),
    ]
    _, f = by_bytes(events)
    assert f["chunk_tokens"] is None
    assert f["output_tokens"] == 3


def test_first_chunk_with_two_tokens_and_no_role_chunk():
    events = [(100.6, chat_chunk("ab", completion_tokens=2)), (100.7, chat_chunk("c", completion_tokens=3)), (100.8, b"[DONE]")]
    _, f = by_bytes(events)
    assert f["chunk_tokens"] == (2, 1)  # 2-0, 3-2


def test_a_token_whose_text_is_held_back_is_a_token_chunk():
    # a token whose text is held back (half a UTF-8 character) arrives with no content
    events = [
        (100.6, chat_chunk("a", completion_tokens=1)),
        (100.7, chat_chunk("", completion_tokens=2)),
        (100.8, chat_chunk("\u00e9", completion_tokens=3)),
        (100.9, b"[DONE]"),
    ]
    _, f = by_bytes(events)
    assert f["chunk_tokens"] == (1, 1, 1)
    assert f["chunk_offsets_s"] == pytest.approx((0.6, 0.7, 0.8))
    assert f["output_tokens_client_estimate"] == 3


# Tokens that arrive with empty content but rising continuous usage, as a real vLLM sent them: the role
# chunk, two tokens without text, one with text, three more without, a finish chunk with no new token.
SILENT_TOKENS = [
    (100.50, chat_chunk("", role=True, completion_tokens=0)),
    (100.52, chat_chunk("", completion_tokens=1)),
    (100.54, chat_chunk("", completion_tokens=2)),
    (100.56, chat_chunk("hi", completion_tokens=3)),
    (100.58, chat_chunk("", completion_tokens=4)),
    (100.60, chat_chunk("", completion_tokens=6)),
    (100.62, chat_chunk("", completion_tokens=7)),
    (100.63, chat_chunk("", completion_tokens=7, finish="length")),
    (100.64, chat_chunk(None, choices=False, completion_tokens=7)),
    (100.65, b"[DONE]"),
]


def test_tokens_with_empty_content_and_rising_usage_keep_ttft_and_e2e():
    _, f = by_bytes(SILENT_TOKENS)
    assert f["t_first_event_s"] == 100.50
    assert f["t_first_token_s"] == 100.52  # the first token, not the first text (100.56)
    assert f["t_last_token_s"] == 100.62  # the last token, not the last text (100.56) nor the finish chunk
    assert f["chunk_offsets_s"] == pytest.approx((0.52, 0.54, 0.56, 0.58, 0.60, 0.62))
    assert f["chunk_tokens"] == (1, 1, 1, 1, 2, 1) and sum(f["chunk_tokens"]) == f["output_tokens"] == 7
    assert f["output_tokens_client_estimate"] == 6
    assert f["error_category"] is None
    assert by_events(SILENT_TOKENS)[1] == by_events(SILENT_TOKENS, parsed=True)[1] == f
    assert_same([sse(p) for _, p in SILENT_TOKENS], keep_text=True)  # the fast path agrees (defined below)


def test_a_stream_with_no_visible_text_at_all_has_ttft_and_e2e():
    events = [(100.5, chat_chunk("", role=True, completion_tokens=0))]
    events += [(100.6 + i / 100, chat_chunk("", completion_tokens=i + 1)) for i in range(5)]
    events += [(100.7, chat_chunk("", completion_tokens=5, finish="length")), (100.8, b"[DONE]")]
    for _, f in (by_bytes(events), by_events(events), by_events(events, parsed=True)):
        assert f["t_first_token_s"] == 100.6 and f["t_last_token_s"] == 100.64
        assert f["chunk_tokens"] == (1,) * 5 and f["output_tokens"] == 5


def tool_call_chunk(arguments, *, completion_tokens=None, first=False):
    call = {"index": 0, "function": {"arguments": arguments}}
    if first:
        call.update(id="call_1", type="function", function={"name": "get_weather", "arguments": arguments})
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}]}
    if completion_tokens is not None:
        obj["usage"] = {"prompt_tokens": 12, "total_tokens": 12 + completion_tokens,
                        "completion_tokens": completion_tokens}
    return orjson.dumps(obj)


@pytest.mark.parametrize("usage", [False, True])
def test_tool_call_deltas_give_ttft_and_e2e(usage):
    def tokens(n):
        return n if usage else None

    events = [
        (100.5, chat_chunk("", role=True, completion_tokens=tokens(0))),
        (100.6, tool_call_chunk("", first=True, completion_tokens=tokens(2))),
        (100.7, tool_call_chunk('{"city": ', completion_tokens=tokens(4))),
        (100.8, tool_call_chunk('"Paris"}', completion_tokens=tokens(6))),
        (100.85, chat_chunk(None, finish="tool_calls", completion_tokens=tokens(6))),
        (100.9, b"[DONE]"),
    ]
    results = [by_bytes(events)[1], by_events(events)[1], by_events(events, parsed=True)[1]]
    assert results[0] == results[1] == results[2]
    assert_same([sse(p) for _, p in events])
    f = results[0]
    assert f["t_first_token_s"] == 100.6 and f["t_last_token_s"] == 100.8
    assert f["output_tokens_client_estimate"] == 3
    assert f["chunk_tokens"] == ((2, 2, 2) if usage else None)
    assert f["output_tokens"] == (6 if usage else 3)


def test_a_chunk_with_text_but_no_new_token_is_not_a_token_chunk():
    events = [(100.6, chat_chunk("a", completion_tokens=1)), (100.7, chat_chunk("b", completion_tokens=1)),
              (100.8, b"[DONE]")]
    obs = StreamObserver(T0, keep_text=True)
    for t, p in events:
        obs.on_event(p, t)
    f = obs.finish(101.0)
    assert f["t_last_token_s"] == 100.6 and f["chunk_tokens"] == (1,)
    assert f["completion_text"] == "ab"  # its text is still kept


def test_reasoning_content_counts_as_content():
    reasoning = orjson.dumps({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]})
    reasoning2 = orjson.dumps({"choices": [{"index": 0, "delta": {"reasoning": "so"}}]})
    events = [(100.6, reasoning), (100.7, reasoning2), (100.8, chat_chunk("x")), (100.9, b"[DONE]")]
    _, f = by_bytes(events)
    assert f["t_first_token_s"] == 100.6
    assert f["output_tokens_client_estimate"] == 3


def test_completions_text_chunks_and_keep_text():
    events = [(100.6, completion_chunk("Hello", 1)), (100.7, completion_chunk(" world", 2)), (100.8, b"[DONE]")]
    obs, f = by_bytes(events, keep_text=True)
    assert f["chunk_offsets_s"] == pytest.approx((0.6, 0.7))
    assert f["chunk_tokens"] == (1, 1)
    assert f["completion_text"] == "Hello world" == obs.text
    assert f["prompt_tokens"] == 5


def test_chat_keep_text_skips_role_and_reasoning():
    events = CONTINUOUS[:1] + [(100.51, orjson.dumps({"choices": [{"delta": {"reasoning_content": "r"}}]}))] + CONTINUOUS[1:]
    _, f = by_bytes(events, keep_text=True)
    assert f["completion_text"] == " the quick brown fox"


def test_no_done_is_incomplete_stream():
    _, f = by_bytes(CONTINUOUS[:4])
    assert f["error_category"] == "incomplete_stream"
    assert f["output_tokens"] == 4  # what was observed is kept
    _, f = by_events(CONTINUOUS[:4])
    assert f["error_category"] == "incomplete_stream"


def test_final_done_without_blank_line_is_flushed_at_last_read_time():
    obs = StreamObserver(T0)
    obs.on_bytes(b"data: " + chat_chunk("a", completion_tokens=1) + b"\n\n", 100.5)
    obs.on_bytes(b"data: " + chat_chunk("b", completion_tokens=2) + b"\n\ndata: [DONE]", 100.6)
    f = obs.finish(101.0)
    assert obs.done
    assert f["error_category"] is None
    assert f["t_last_token_s"] == 100.6


def test_last_event_without_blank_line_keeps_its_read_time():
    obs = StreamObserver(T0)
    obs.on_bytes(b"data: " + chat_chunk("a", completion_tokens=1), 100.5)
    f = obs.finish(101.0)
    assert f["t_last_token_s"] == 100.5  # the bytes arrived at 100.5, not at finish
    assert f["error_category"] == "incomplete_stream"


ERROR_NESTED = orjson.dumps({"error": {"object": "error", "message": "boom " * 100, "type": "InternalServerError", "code": 500}})
ERROR_FLAT = orjson.dumps({"object": "error", "message": "engine died", "type": "BadRequestError", "code": 400})


def test_error_event_nested():
    events = CONTINUOUS[:3] + [(100.7, ERROR_NESTED), (100.8, b"[DONE]")]
    _, f = by_bytes(events)
    assert f["error_category"] == "stream_error_event"
    assert len(f["error_detail"]) == 200
    assert f["error_detail"].startswith("boom boom")
    assert f["t_last_token_s"] == 100.60


def test_error_event_flat_and_first_error_wins():
    events = [(100.6, chat_chunk("a")), (100.7, ERROR_FLAT), (100.75, b"{bad"), (100.8, b"[DONE]")]
    for _, f in (by_bytes(events), by_events(events)):
        assert f["error_category"] == "stream_error_event"
        assert f["error_detail"] == "engine died"


def test_malformed_event_is_recorded_and_consumption_continues():
    events = [(100.6, chat_chunk("a", completion_tokens=1)), (100.65, b'{"choices": [tru'), (100.7, chat_chunk("b", completion_tokens=2)), (100.8, b"[DONE]")]
    obs, f = by_bytes(events)
    assert f["error_category"] == "malformed_sse"
    assert f["error_detail"] == '{"choices": [tru'
    assert f["chunk_tokens"] == (1, 1)
    assert obs.done


def test_non_object_json_is_malformed():
    _, f = by_events([(100.6, b"42"), (100.8, b"[DONE]")])
    assert f["error_category"] == "malformed_sse"


def test_explicit_error_wins():
    obs = StreamObserver(T0)
    obs.on_event(ERROR_FLAT, 100.5)
    f = obs.finish(101.0, error_category="timeout_total", error_detail="deadline 1 s", http_status=200)
    assert f["error_category"] == "timeout_total" and f["error_detail"] == "deadline 1 s"
    assert f["t_first_event_s"] == 100.5


def test_nothing_received():
    f = StreamObserver(T0).finish(101.0, error_category="http_503", http_status=503)
    assert f["t_first_event_s"] is None and f["t_first_token_s"] is None and f["t_last_token_s"] is None
    assert f["chunk_offsets_s"] == () and f["chunk_tokens"] is None
    assert f["output_tokens"] == 0 and f["output_tokens_estimated"] is True
    assert f["error_category"] == "http_503" and f["http_status"] == 503


def test_openai_sdk_chunk_dumps_agree_with_bytes():
    # the openai client feeds ChatCompletionChunk.model_dump(): every field present, unset ones None
    chunk_type = pytest.importorskip("openai.types.chat").ChatCompletionChunk
    obs = StreamObserver(T0)
    for t, payload in CONTINUOUS:
        if payload == b"[DONE]":
            obs.on_event(payload, t)
        else:
            obs.on_event(chunk_type.model_validate_json(payload).model_dump(), t)
    assert obs.finish(101.0, http_status=200) == by_bytes(CONTINUOUS)[1]


# -- the fast path (ChunkLayout) against full parsing ---------------------------------------------

import random  # noqa: E402

import envelope.chunk_layout as layout_module  # noqa: E402
import envelope.stream as stream_module  # noqa: E402
from envelope.chunk_layout import ChunkLayout  # noqa: E402
from envelope.stream import summarize_chunk  # noqa: E402
from server.sim.chunks import ChunkFormat  # noqa: E402


def sim_events(n, *, chat=True, usage=True, tokens=None, prompt_tokens=37, request_id="r1"):
    """A vLLM-shaped stream from the simulator's chunk builder, as SSE bytes per event (HTTP framing removed)."""
    fmt = ChunkFormat(chat=chat, response_id=("chatcmpl-" if chat else "cmpl-") + request_id, model="sim-model",
                      created_unix_s=1_700_000_000, prompt_tokens=prompt_tokens, finish_reason="length")

    def unframe(framed):
        return framed[framed.index(b"\r\n") + 2:-2]

    events = [unframe(fmt.role(usage=usage))] if chat else []
    sent = 0
    for i in range(n):
        k = tokens[i] if tokens else 1
        sent += k
        events.append(unframe(fmt.content(k, sent, usage=usage, final=i == n - 1)))
    if usage:
        events.append(unframe(fmt.usage_only(sent)))
    events.append(b"data: [DONE]\n\n")
    return events


def sse(payload):
    return b"data: " + payload + b"\n\n"


def observe(pieces, *, fast, keep_text=False, t_finish=500.0):
    """Feed byte pieces (one read each, read i at time 100 + i) and finish."""
    obs = StreamObserver(T0, keep_text=keep_text, fast=fast)
    for i, piece in enumerate(pieces):
        obs.on_bytes(piece, 100.0 + i)
    return obs, obs.finish(t_finish, http_status=200)


def assert_same(pieces, *, keep_text=False):
    fast_obs, fast = observe(pieces, fast=True, keep_text=keep_text)
    _, full = observe(pieces, fast=False, keep_text=keep_text)
    assert fast == full
    return fast_obs, fast


class CountingParser:
    """Stands in for orjson in envelope.stream and envelope.chunk_layout: counts full parses."""

    JSONDecodeError = orjson.JSONDecodeError

    def __init__(self):
        self.calls = 0

    def loads(self, data):
        self.calls += 1
        return orjson.loads(data)


def test_fast_path_skips_the_full_parse_and_gives_the_same_record(monkeypatch):
    events = sim_events(200)
    parser = CountingParser()
    monkeypatch.setattr(stream_module, "orjson", parser)
    monkeypatch.setattr(layout_module, "orjson", parser)
    obs, fast = observe(events, fast=True, keep_text=True)
    fast_parses = parser.calls
    _, full = observe(events, fast=False, keep_text=True)
    assert fast == full
    assert fast["chunk_tokens"] == (1,) * 200 and fast["output_tokens"] == 200 and fast["prompt_tokens"] == 37
    assert fast["completion_text"] == " tok" * 200
    # role chunk, first content chunk (learned), the last chunk (finish_reason), the usage chunk,
    # plus the layout's own proof: a handful, not one per chunk
    assert fast_parses <= 8 < 200
    assert isinstance(obs._layout, ChunkLayout)


@pytest.mark.parametrize("cut_every", [1, 7, 64, 333, 4096])
def test_fast_path_with_events_split_across_reads(cut_every):
    blob = b"".join(sim_events(40, tokens=[1, 2, 3, 1] * 10))
    pieces = [blob[i:i + cut_every] for i in range(0, len(blob), cut_every)]
    _, f = assert_same(pieces, keep_text=True)
    assert f["chunk_tokens"] == (1, 2, 3, 1) * 10 and f["output_tokens"] == 70


def test_fast_path_completions_and_no_usage_streams():
    _, f = assert_same(sim_events(30, chat=False), keep_text=True)
    assert f["completion_text"] == " tok" * 30 and f["chunk_tokens"] == (1,) * 30
    _, f = assert_same(sim_events(30, usage=False))
    assert f["chunk_tokens"] is None and f["output_tokens_estimated"] is True and f["output_tokens"] == 30


def chunk(text, completion, *, prompt=12, key="content", extra=b""):
    """A raw vLLM-shaped chat chunk with ``text`` and ``completion`` spliced in as given (JSON bytes)."""
    total = b"%d" % (prompt + int(float(completion)))
    return (b'{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
            b'"delta":{"' + key.encode() + b'":"' + text + b'"},"logprobs":null,"finish_reason":null}],"usage":'
            b'{"prompt_tokens":' + b"%d" % prompt + b',"total_tokens":' + total + b',"completion_tokens":'
            + completion + b"}" + extra + b"}")


def learned(*more):
    """Two ordinary chunks (the layout is learned from the first) followed by ``more`` and [DONE]."""
    return [sse(chunk(b" a", b"1")), sse(chunk(b" b", b"2")), *more, b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("event", "category"),
    [
        (sse(chunk(b"\\\"quoted\\\" \\n", b"3")), None),  # escapes: parsed in full
        (sse(chunk("é中文 🙂".encode(), b"3")), None),  # UTF-8 text: the unicode pattern
        (sse(chunk(b"\xff\xfe", b"3")), "malformed_sse"),  # not UTF-8
        (sse(chunk(b"\xed\xa0\x80", b"3")), "malformed_sse"),  # a UTF-8-encoded surrogate
        (sse(chunk(b"tab\there", b"3")), "malformed_sse"),  # a raw control character
        (sse(chunk(b"x", b"03")), "malformed_sse"),  # a number with a leading zero
        (sse(chunk(b"x", b"-3")), None),  # odd but valid JSON: parsed in full
        (sse(chunk(b"x", b"3.0")), None),
        (sse(chunk(b"x", b"3", extra=b',"extra":true')), None),  # another field: parsed in full
        (sse(chunk(b"x", b"3", prompt=99)), None),  # usage.prompt_tokens changes mid-stream
        (sse(chunk(b"", b"3")), None),  # no text, but a new token: a token chunk
        (sse(chunk(b"x", b"2")), None),  # text, but no new token: not a token chunk
        (sse(chunk(b"x", b"3")[:-9]), "malformed_sse"),  # cut short
        (sse(chunk(b"x", b"3") + b" trailing"), "malformed_sse"),
        (sse(b'{"error":{"message":"engine died","type":"InternalServerError","code":500}}'), "stream_error_event"),
        (sse(b'{"object":"error","message":"bad","type":"BadRequestError","code":400}'), "stream_error_event"),
        (b"data: " + chunk(b"x", b"3") + b"\ndata: \n\n", None),  # two data lines: joined
        (b"data:" + chunk(b"x", b"3") + b"  \n\n", None),  # no space, trailing spaces
        (b": keep-alive\n\n", None),
        (sse(chunk(b"think", b"3", key="reasoning_content")), None),
    ],
)
def test_unusual_events_after_the_layout_is_learned(event, category):
    _, f = assert_same(learned(event, sse(chunk(b" z", b"9"))), keep_text=True)
    assert f["error_category"] == category


def test_fast_path_counts_tokens_by_usage_not_by_text():
    # after the layout is learned: a matching chunk with no new token, tokens with no text, a matching
    # chunk with several tokens
    events = learned(sse(chunk(b" c", b"2")), sse(chunk(b"", b"3")), sse(chunk(b"", b"4")), sse(chunk(b" d", b"6")))
    obs, f = assert_same(events, keep_text=True)
    assert obs._layout is not None
    assert f["chunk_tokens"] == (1, 1, 1, 1, 2) and f["output_tokens"] == 6
    assert f["chunk_offsets_s"] == pytest.approx((0.0, 1.0, 3.0, 4.0, 5.0))  # not the read at 102 (" c")
    assert f["completion_text"] == " a b c d"


def test_tricky_events_split_at_every_byte():
    pieces = learned(sse(chunk("é \\\"x\\\"".encode(), b"4")), sse(chunk(b"x", b"5")[:-3]), sse(chunk(b" c", b"6")))
    blob = b"".join(pieces)
    for cut in range(0, len(blob) + 1, 3):
        assert_same([blob[:cut], blob[cut:]], keep_text=True)


def test_reasoning_then_content_stream():
    events = [sse(chunk(b"r%d" % i, b"%d" % (i + 1), key="reasoning_content")) for i in range(10)]
    events += [sse(chunk(b"c%d" % i, b"%d" % (i + 11))) for i in range(10)] + [b"data: [DONE]\n\n"]
    _, f = assert_same(events, keep_text=True)
    assert f["completion_text"] == "".join(f"c{i}" for i in range(10))
    assert f["output_tokens_client_estimate"] == 20 and f["chunk_tokens"] == (1,) * 20


def test_random_streams_fast_equals_full():
    rng = random.Random(11)
    texts = [b" tok", b"\\n", "é".encode(), b"\\\"", b"", b"x" * 40, "🙂".encode(), b"\x01", b"\xc3"]
    for _ in range(150):
        n, events, tokens = rng.randint(1, 25), [], 0
        for _ in range(n):
            r = rng.random()
            tokens += rng.choice([0, 1, 1, 1, 2, 5])
            if r < 0.75:
                events.append(sse(chunk(rng.choice(texts[:3]) if rng.random() < 0.8 else rng.choice(texts),
                                        b"%d" % tokens, prompt=rng.choice([12, 12, 12, 7]))))
            elif r < 0.8:
                events.append(sse(b'{"id":"chatcmpl-7","choices":[],"usage":{"prompt_tokens":12,'
                                  b'"completion_tokens":%d}}' % tokens))
            elif r < 0.85:
                events.append(sse(chunk(b"x", b"%d" % tokens)[: rng.randint(1, 60)]))
            elif r < 0.9:
                events.append(sse(b'{"error":{"message":"boom"}}'))
            else:
                events.append(sse(chunk(b"y", b"%d" % tokens, key=rng.choice(["reasoning", "text"]))))
        if rng.random() < 0.8:
            events.append(b"data: [DONE]\n\n")
        blob = b"".join(events)
        cuts = sorted(rng.sample(range(len(blob) + 1), k=min(len(blob) + 1, rng.randint(0, 8))))
        pieces, pos = [], 0
        for cut in cuts:
            pieces.append(blob[pos:cut])
            pos = cut
        pieces.append(blob[pos:])
        assert_same(pieces, keep_text=rng.random() < 0.5)


def test_layout_refuses_what_it_cannot_prove():
    def learn(payload):
        obj = orjson.loads(payload)
        return ChunkLayout.learn(payload, obj, summarize_chunk)

    assert learn(chunk(b" a", b"1")) is not None
    assert learn(chunk(b"\\\"", b"1")) is None  # escaped text cannot be cut out of the raw bytes
    two = b'{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}'
    assert learn(two) is None  # several choices
    dup = b'{"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1},"usage":{"completion_tokens":2}}'
    assert learn(dup) is None  # the key appears twice: which one counts is not provable from the bytes
    nested = (b'{"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1,'
              b'"details":{"completion_tokens":1}}}')
    assert learn(nested) is None
    assert learn(b'{"choices":[{"delta":{"content":"a"}}]}') is not None  # no usage: text only


def test_summarize_chunk():
    assert summarize_chunk(orjson.loads(chunk(b" a", b"3"))) == (None, 12, 3, True, (" a",), True, False)
    assert summarize_chunk({"choices": [{"delta": {"reasoning": "r"}}]}) == (None, None, None, True, (), True, False)
    assert summarize_chunk({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]}) == (
        None, None, None, True, (), True, False)
    assert summarize_chunk({"choices": [{"delta": {"content": ""}}]}) == (None, None, None, False, (), True, False)
    assert summarize_chunk({"error": {"message": "m"}}).error == "m"
    assert summarize_chunk({"choices": [], "usage": {"completion_tokens": 4}}) == (None, None, 4, False, (), False,
                                                                                  False)
    assert summarize_chunk({"choices": [{"delta": {}, "finish_reason": "length"}]}).finished is True
    assert summarize_chunk({"choices": [{"delta": {"content": "a"}, "finish_reason": None}]}).finished is False


# transformers serve 5.19 as it streams: usage only in the finish chunk, and no data: [DONE] at the end
_TRANSFORMERS_STREAM = b"".join([
    b'data: {"id":"c","choices":[{"delta":{"role":"assistant"},"index":0}],"object":"chat.completion.chunk"}\n\n',
    *[b'data: {"id":"c","choices":[{"delta":{"content":" detail"},"index":0}],"object":"chat.completion.chunk"}\n\n']
    * 3,
    b'data: {"id":"c","choices":[{"delta":{},"index":0,"finish_reason":"length"}],"object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":3,"prompt_tokens":15,"total_tokens":18}}\n\n',
])


@pytest.mark.parametrize("fast", [True, False])
def test_a_server_without_done_ends_its_stream_with_the_finish_reason(fast):
    obs = StreamObserver(0.0, keep_text=True, fast=fast)
    obs.on_bytes(_TRANSFORMERS_STREAM, 0.5)
    fields = obs.finish(0.6, usage_expected=True, done_expected=False)
    assert fields["error_category"] is None
    assert (fields["output_tokens"], fields["prompt_tokens"], fields["output_tokens_estimated"]) == (3, 15, False)
    assert len(fields["chunk_offsets_s"]) == 3 and fields["completion_text"] == " detail" * 3
    # the same stream from a server that does send [DONE] is cut short
    obs = StreamObserver(0.0, fast=fast)
    obs.on_bytes(_TRANSFORMERS_STREAM, 0.5)
    assert obs.finish(0.6)["error_category"] == "incomplete_stream"
    # without [DONE] and without a finish_reason, the stream was cut short either way
    cut = _TRANSFORMERS_STREAM.rsplit(b"data:", 1)[0]
    obs = StreamObserver(0.0, fast=fast)
    obs.on_bytes(cut, 0.5)
    fields = obs.finish(0.6, done_expected=False)
    assert (fields["error_category"], fields["error_detail"]) == ("incomplete_stream",
                                                                  "stream ended without a finish_reason")


def test_layout_proof_rejects_a_wrong_reading():
    payload = chunk(b" a", b"3")
    obj = orjson.loads(payload)
    good = ChunkLayout.learn(payload, obj, summarize_chunk)
    assert good is not None and good.completion_group == 4
    # the same cut, but reading total_tokens as completion_tokens: the substitution proof must refuse it
    head = payload[:payload.index(b'" a"') + 1]
    rest = payload[len(head) + 2:]
    p_at, t_at, c_at = (rest.index(k) + len(k) for k in (b'"prompt_tokens":', b'"total_tokens":',
                                                          b'"completion_tokens":'))
    literals = [rest[:p_at], rest[p_at + 2:t_at], rest[t_at + 2:c_at], rest[c_at + 1:]]
    slots = [layout_module._ANY_TEXT_SLOT] + [layout_module._NUMBER_SLOT] * 3
    wrong = ChunkLayout(head, literals, slots, ["text", "prompt", "completion", "ignored"], True)
    assert wrong._proven(head, literals, slots, payload, summarize_chunk(obj), summarize_chunk) is False
    right = ChunkLayout(head, literals, slots, ["text", "prompt", "ignored", "completion"], True)
    assert right._proven(head, literals, slots, payload, summarize_chunk(obj), summarize_chunk) is True
