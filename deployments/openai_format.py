"""OpenAI response objects and the SSE stream built from ChatChunks."""
import json
import time
from collections.abc import AsyncIterator

from .protocol import ChatChunk, ErrorInfo


def error_body(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object: `code` is a machine-readable string or null (never the HTTP status),
    `param` the offending field or null."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_from(info: ErrorInfo) -> dict:
    """A replica's error as OpenAI shapes it: the broad type by status, our kind as the code."""
    broad = "invalid_request_error" if info.status < 500 else "server_error"
    return error_body(info.status, info.message, broad, None if info.type == broad else info.type)


class Shaper:
    """Turns ChatChunks into OpenAI response objects."""

    def __init__(self, kind: str, rid: str, model: str, logprobs: bool, first: ChatChunk):
        self.kind, self.rid, self.model, self.logprobs = kind, rid, model, logprobs
        # the turn's re-prefill, reported again on its final chunk (the first chunk carried it from the replica)
        self.reprefill = None if first.reprefill_s is None else {
            "ms": round(1000 * first.reprefill_s, 1), "cause": first.reprefill_cause}
        self.created = int(time.time())
        self.offset = 0  # characters of completion text before the next token (completions' text_offset)

    def _obj(self, choices: list, object_: str, usage: dict | None = None) -> dict:
        out = {"id": self.rid, "object": object_, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _lp(self, chunks: list[ChatChunk]) -> dict | None:
        """The tokens' logprobs in the endpoint's shape: chat's `content` list, or completions' parallel lists
        (whose `top_logprobs` maps always hold the chosen token too, as OpenAI's do)."""
        if not self.logprobs:
            return None
        entries = [e for c in chunks for e in c.logprobs or []]
        if self.kind == "chat.completion":
            return {"content": [e.model_dump() for e in entries], "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{t.token: t.logprob for t in e.top_logprobs}, e.token: e.logprob}
                                 for e in entries], "text_offset": offsets}

    def piece(self, c: ChatChunk, first: bool) -> dict:
        if self.kind == "chat.completion":
            delta = ({"role": "assistant", "content": c.text} if first else {"content": c.text})
            choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason, "logprobs": self._lp([c])}
            return self._final(self._obj([choice], "chat.completion.chunk"), c)
        return self._final(self._obj([{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                       "logprobs": self._lp([c])}], "text_completion"), c)

    def whole(self, chunks: list[ChatChunk]) -> dict:
        text, last = "".join(c.text for c in chunks), chunks[-1]
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason, "logprobs": self._lp(chunks)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": self._lp(chunks)}
        return self._final(self._obj([choice], self.kind, usage(last)), last)

    def _final(self, obj: dict, c: ChatChunk) -> dict:
        """The final chunk (or whole response) says whether the turn is in the store yet (`durability:
        relaxed`) and, when the turn rebuilt its cache, how long that took and why (`reprefill`)."""
        if c.finish_reason is not None:
            obj["durable"] = c.durable
            if self.reprefill is not None:
                obj["reprefill"] = self.reprefill
        return obj


def usage(c: ChatChunk) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


async def sse_stream(shape: Shaper, first: ChatChunk, rest: AsyncIterator[ChatChunk], include_usage: bool):
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    chunk, is_first = first, True
    while True:
        if chunk.error is not None:  # after tokens were streamed: an error event, and the turn is not committed
            yield data(error_from(chunk.error))
            return
        yield data(shape.piece(chunk, is_first))
        is_first = False
        if chunk.finish_reason is not None:
            break
        try:
            chunk = await rest.__anext__()
        except StopAsyncIteration:
            break
        except Exception as exc:  # the replica died mid-turn
            yield data(error_body(503, f"the replica serving this turn failed: {type(exc).__name__}",
                                  "server_error", "replica_failed"))
            return
    if include_usage:
        obj = shape._obj([], "chat.completion.chunk" if shape.kind == "chat.completion" else "text_completion",
                         usage(chunk))
        yield data(obj)
    yield "data: [DONE]\n\n"
