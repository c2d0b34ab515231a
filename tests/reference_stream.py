"""The StreamingLLM reference (swift_engine.layers.reference) fed one token at a time and kept between calls.

`reference_logits` recomputes a whole stream per call; a state machine checks many turns of one
session, so this keeps the reference's sink and window caches and feeds only the new ids. Same
arithmetic: the same attention class, rotary table and model calls, token by token.
"""
from __future__ import annotations

import torch

from swift_engine.layers.reference import ReferenceSinkWindowAttention
from swift_engine.layers.rotary import model_rotary


class ReferenceStream:
    """One session's stream through the reference with `sinks` sink and `window` window tokens."""

    def __init__(self, model, sinks: int, window: int, ids: list[int] = ()):
        a = model.args
        self.model, self.sinks = model, sinks
        rope = model_rotary(a, sinks + window, model.lm_head.weight.device, torch.float32)
        self.attn = ReferenceSinkWindowAttention(a.num_layers, sinks, window, rope, a.attn_scale, a.attn_softcap)
        self.last: torch.Tensor | None = None  # log-probs of the next token (None: nothing fed yet)
        self.feed(list(ids))

    @torch.no_grad()
    def feed(self, ids: list[int]) -> list[float | None]:
        """Feed ids; returns log p(id | everything before it) for each, None for a stream's first id."""
        out = []
        for t in ids:
            out.append(None if self.last is None else self.last[t].item())
            hidden = self.model(torch.tensor([t], device=self.model.lm_head.weight.device), self.attn)
            self.last = torch.log_softmax(self.model.logits(hidden)[-1].float(), dim=-1)
        return out
