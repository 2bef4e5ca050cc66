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


# -- the block-splitting fast path against the plain line-by-line decoder ------------------------

class LineDecoder:
    """The SSE line rules applied one line at a time (the decoder before the fast path), as a reference."""

    def __init__(self):
        self._tail = b""
        self._data = []
        self._skip_lf = False

    def feed(self, data):
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._tail + data if self._tail else data
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._tail = buf
            return []
        self._tail = buf[cut + 1:]
        return self._lines(buf[:cut].split(b"\n"))

    def flush(self):
        lines = [self._tail, b""] if self._tail else [b""]
        self._tail = b""
        self._skip_lf = False
        return self._lines(lines)

    def _lines(self, lines):
        out = []
        for line in lines:
            if not line:
                if self._data:
                    payload = b"\n".join(self._data)
                    self._data.clear()
                    if payload:
                        out.append(payload)
                continue
            if line.startswith(b"data:"):
                self._data.append(line[5:].strip())
            elif line == b"data":
                self._data.append(b"")
        return out


def _both(pieces):
    fast, ref = SSEDecoder(), LineDecoder()
    got, want = [], []
    for piece in pieces:
        got.append(fast.feed(piece))
        want.append(ref.feed(piece))
    got.append(fast.flush())
    want.append(ref.flush())
    return got, want


TRICKY = [
    STREAM,
    STREAM.replace(b"\n", b"\r\n"),
    STREAM.replace(b"\n", b"\r"),
    b"\n\n\ndata: a\n\n\n\ndata: b\n\n",  # blank lines before and between events
    b": ping\n\ndata: a\ndata: b\n\nevent: x\ndata:c\nid: 1\n\n",
    b"data\n\ndata\ndata: x\n\n",  # 'data' without a colon is an empty data line
    b"data: a\n\ndata: b",  # last event without its blank line
    b"data: a\n\ndata: b\n",
    b"data:  \t{}\t \n\n",
    b"data: \xc3\xa9\xe4\xb8\xad\n\ndata: {\"t\":\"\\\"q\\\"\"}\n\n",
    b"\r\n\r\ndata: a\r\n\r\n\rdata: b\r\r",
    b"dat",
    b"",
]


@pytest.mark.parametrize("stream", TRICKY)
def test_fast_decoder_matches_line_decoder_at_every_split(stream):
    for cut in range(len(stream) + 1):
        got, want = _both([stream[:cut], stream[cut:]])
        assert got == want, cut


@pytest.mark.parametrize("stream", TRICKY)
def test_fast_decoder_matches_line_decoder_byte_by_byte(stream):
    got, want = _both([stream[i:i + 1] for i in range(len(stream))])
    assert got == want


def test_fast_decoder_matches_line_decoder_on_random_streams():
    import random

    rng = random.Random(7)
    atoms = [b"data: ", b"data:", b"data", b"\n", b"\r", b"\r\n", b"\n\n", b": c", b"event: e", b"x", b" ",
             b"{\"a\":1}", b"[DONE]", b"\xc3\xa9"]
    for _ in range(400):
        stream = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream) + 1, rng.randint(0, 6))))
        pieces, pos = [], 0
        for cut in cuts:
            pieces.append(stream[pos:cut])
            pos = cut
        pieces.append(stream[pos:])
        got, want = _both(pieces)
        assert got == want, (stream, cuts)


def test_feed_blocks_and_event_data():
    from envelope.sse import event_data

    d = SSEDecoder()
    assert d.feed_blocks(b"data: a\n\n: c\ndata: b\n\ndata: c") == [b"data: a", b": c\ndata: b"]
    assert [event_data(b) for b in (b"data: a", b": c\ndata: b", b"event: x", b"\ndata: y")] == [b"a", b"b", b"", b"y"]
    assert d.flush() == [b"c"]
