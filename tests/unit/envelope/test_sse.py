import pytest

from envelope.sse import SSEDecoder

CHUNK_1 = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":{"prompt_tokens":12,"total_tokens":12,"completion_tokens":0}}'
)
CHUNK_2 = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null}],'
    b'"usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1}}'
)
USAGE_ONLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1}}'
)
STREAM = b"data: " + CHUNK_1 + b"\n\ndata: " + CHUNK_2 + b"\n\ndata: " + USAGE_ONLY + b"\n\ndata: [DONE]\n\n"
PAYLOADS = [CHUNK_1, CHUNK_2, USAGE_ONLY, b"[DONE]"]


def feed_all(pieces, decoder=None):
    decoder = decoder or SSEDecoder()
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    out.extend(decoder.flush())
    return out


def test_whole_stream_in_one_read():
    d = SSEDecoder()
    assert d.feed(STREAM) == PAYLOADS
    assert d.flush() == []


def test_every_split_point_gives_the_same_payloads():
    # splits inside "data:", inside the JSON, and between the two "\n" of a boundary
    for cut in range(1, len(STREAM)):
        assert feed_all([STREAM[:cut], STREAM[cut:]]) == PAYLOADS, cut


def test_one_byte_at_a_time():
    assert feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == PAYLOADS


def test_payload_returned_by_the_feed_that_finishes_it():
    d = SSEDecoder()
    assert d.feed(b"data: " + CHUNK_2[:10]) == []
    assert d.feed(CHUNK_2[10:] + b"\n") == []  # the event is not over before the blank line
    assert d.feed(b"\n") == [CHUNK_2]


def test_crlf_line_endings_split_everywhere():
    crlf = STREAM.replace(b"\n", b"\r\n")
    for cut in range(1, len(crlf)):
        assert feed_all([crlf[:cut], crlf[cut:]]) == PAYLOADS, cut


def test_crlf_split_between_cr_and_lf_is_one_line_ending():
    # "data: a\r" | "\ndata: b\r\n\r\n" is one event with two data lines, not two events
    assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [b"a\nb"]


def test_cr_only_line_endings():
    assert feed_all([b"data: 1\r\rdata: 2\r\r"]) == [b"1", b"2"]


def test_comments_blank_lines_and_other_fields_are_ignored():
    stream = b": ping\n\n\n\nevent: message\nid: 7\nretry: 10\ndata: " + CHUNK_2 + b"\n\n: ping\n\ndata: [DONE]\n\n"
    assert feed_all([stream]) == [CHUNK_2, b"[DONE]"]


def test_multi_line_data_joined_with_newline():
    assert feed_all([b"data: {\"a\":\ndata:  1}\n\n"]) == [b'{"a":\n1}']


def test_data_without_space_and_surrounding_whitespace():
    assert feed_all([b"data:[DONE]  \n\n", b"data:\t{}\n\n"]) == [b"[DONE]", b"{}"]


def test_malformed_payload_is_still_returned():
    # the decoder splits; deciding what a payload means is the observer's job
    assert feed_all([b"data: {not json\n\ndata: [DONE]\n\n"]) == [b"{not json", b"[DONE]"]


def test_flush_returns_final_event_without_blank_line():
    d = SSEDecoder()
    assert d.feed(b"data: " + CHUNK_2 + b"\n\ndata: [DONE]") == [CHUNK_2]
    assert d.flush() == [b"[DONE]"]
    assert d.flush() == []


def test_flush_after_single_newline():
    d = SSEDecoder()
    assert d.feed(b"data: [DONE]\n") == []
    assert d.flush() == [b"[DONE]"]


def test_flush_after_trailing_cr():
    d = SSEDecoder()
    assert d.feed(b"data: x\r") == []
    assert d.flush() == [b"x"]


def test_empty_feed_and_empty_data_events():
    d = SSEDecoder()
    assert d.feed(b"") == []
    assert d.feed(b"data:\n\ndata\n\n") == []  # events whose data is empty are dropped
    assert d.flush() == []


@pytest.mark.parametrize("pieces", [[b"data: 1\n\ndata: 2\n\ndata: 3\n\n"], [b"data: 1\n\ndata: 2\n", b"\ndata: 3\n\n"]])
def test_several_events_per_read(pieces):
    assert feed_all(pieces) == [b"1", b"2", b"3"]
