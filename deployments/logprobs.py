"""Token log-probabilities as OpenAI reports them: each token's text, log-probability, bytes, alternatives."""
from __future__ import annotations

from swift_engine import GenerationEvent

from .protocol import TokenLogprob, TopLogprob


def token_logprobs(tokenizer, event: GenerationEvent) -> list[TokenLogprob]:
    """The event's token (none for an event without one) with its top alternatives, when asked."""
    if event.token_id is None:
        return []
    top = [_entry(tokenizer, t, lp) for t, lp in event.top_logprobs or []]
    return [TokenLogprob(**_entry(tokenizer, event.token_id, event.logprob).model_dump(), top_logprobs=top)]


def _entry(tokenizer, token_id: int, logprob: float) -> TopLogprob:
    raw = tokenizer.token_bytes(token_id)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # a piece of a multi-byte character: spelt as OpenAI does, "bytes:\xe4\xb8"
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return TopLogprob(token=text, logprob=logprob, bytes=list(raw))
