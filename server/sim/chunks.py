"""Pre-encoded, vLLM-shaped SSE events for one streamed request.

The bytes match what vLLM 0.32 sends (``model_dump_json(exclude_unset=True)``
of its pydantic chunks), built from templates so that the hot path does no
JSON encoding. Each event is framed as one HTTP chunk.
"""

from __future__ import annotations

import orjson

from server.sim.http import frame_chunk

__all__ = ["ChunkFormat", "error_body", "TOKEN_TEXT"]

TOKEN_TEXT = " tok"  # the text of every generated token
_TOKEN_BYTES = TOKEN_TEXT.encode()
_DONE = frame_chunk(b"data: [DONE]\n\n")


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    """vLLM's ``ErrorResponse`` JSON."""
    return orjson.dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}})


class ChunkFormat:
    """Builds the framed events of one stream: role, content, final, usage, error, done."""

    __slots__ = ("chat", "prompt_tokens", "_head", "_content_pre", "_content_post", "_usage",
                 "_final_post", "_text_cache", "done")

    def __init__(self, *, chat: bool, response_id: str, model: str, created_unix_s: int,
                 prompt_tokens: int, finish_reason: str) -> None:
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = b'{"id":%b,"object":"%b","created":%d,"model":%b,"choices":' % (
            orjson.dumps(response_id), obj, created_unix_s, orjson.dumps(model))
        fin = orjson.dumps(finish_reason)
        if chat:
            self._content_pre = b'data: ' + self._head + b'[{"index":0,"delta":{"content":"'
            self._content_post = b'"},"logprobs":null,"finish_reason":null,"token_ids":null}]'
            self._final_post = (b'"},"logprobs":null,"finish_reason":%b,"stop_reason":null,'
                                b'"token_ids":null}]' % fin)
            self._usage = (b',"usage":{"prompt_tokens":%d,"total_tokens":%%d,"completion_tokens":%%d,'
                           b'"completion_tokens_details":null}' % prompt_tokens)
        else:
            self._content_pre = b'data: ' + self._head + b'[{"index":0,"text":"'
            self._content_post = (b'","logprobs":null,"finish_reason":null,"stop_reason":null,'
                                  b'"prompt_token_ids":null,"token_ids":null}]')
            self._final_post = (b'","logprobs":null,"finish_reason":%b,"stop_reason":null,'
                                b'"prompt_token_ids":null,"token_ids":null}]' % fin)
            self._usage = b',"usage":{"prompt_tokens":%d,"total_tokens":%%d,"completion_tokens":%%d}' % (
                prompt_tokens)
        self._text_cache: dict[int, bytes] = {}
        self.done = _DONE

    def _text(self, tokens: int) -> bytes:
        t = self._text_cache.get(tokens)
        if t is None:
            t = self._text_cache[tokens] = _TOKEN_BYTES * tokens
        return t

    def role(self, *, usage: bool) -> bytes:
        """The chat stream's first event: role only, empty content, 0 completion tokens."""
        ev = b'data: ' + self._head + (b'[{"index":0,"delta":{"role":"assistant","content":""},'
                                       b'"logprobs":null,"finish_reason":null}]')
        if usage:
            ev += self._usage % (self.prompt_tokens, 0)
        return frame_chunk(ev + b',"prompt_token_ids":null,"prompt_text":null}\n\n')

    def content(self, tokens: int, completion_tokens: int, *, usage: bool, final: bool) -> bytes:
        """A content event carrying ``tokens`` tokens; ``completion_tokens`` is the running total."""
        ev = self._content_pre + self._text(tokens) + (self._final_post if final else self._content_post)
        if usage:
            ev += self._usage % (self.prompt_tokens + completion_tokens, completion_tokens)
        ev += b"}\n\n"
        return b"%x\r\n%b\r\n" % (len(ev), ev)

    def malformed(self, tokens: int) -> bytes:
        """A content event whose JSON is cut off mid-object."""
        return frame_chunk(self._content_pre + self._text(tokens) + b'"},"logprobs":nul\n\n')

    def usage_only(self, completion_tokens: int) -> bytes:
        """The final ``choices: []`` event that carries the request's usage."""
        ev = b'data: ' + self._head + b'[],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n' % (
            self.prompt_tokens, self.prompt_tokens + completion_tokens, completion_tokens)
        return frame_chunk(ev)

    @staticmethod
    def error_event(message: str, err_type: str = "InternalServerError", code: int = 500) -> bytes:
        """An in-stream error event, as vLLM sends when generation fails."""
        return frame_chunk(b"data: " + error_body(message, err_type, code) + b"\n\n")
