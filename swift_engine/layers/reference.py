"""The slow StreamingLLM reference, written for clarity rather than speed.

One session, one token at a time. Per layer the cache is a list of sink
(key, value) pairs and a window queue of at most W pairs, keys kept before
RoPE. For each token: put it in the cache (evicting the oldest window token if
the window is full), number the cached keys 0..n-1 in cache order, rotate them
at those numbers, rotate the query at n-1, and attend to everything cached.
"""
from __future__ import annotations

from collections import deque

import torch

from .attention import soft_cap
from .rotary import RotaryTable, model_rotary


class ReferenceSinkWindowAttention:
    def __init__(self, num_layers: int, sink_tokens: int, window_tokens: int, rope: RotaryTable,
                 scale: float, softcap: float | None):
        self.S, self.rope, self.scale, self.softcap = sink_tokens, rope, scale, softcap
        self.sinks: list[list[tuple]] = [[] for _ in range(num_layers)]
        self.window: list[deque] = [deque(maxlen=window_tokens) for _ in range(num_layers)]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for t in range(q.shape[0]):
            if len(self.sinks[layer]) < self.S:
                self.sinks[layer].append((k[t], v[t]))
            else:
                self.window[layer].append((k[t], v[t]))  # deque(maxlen=W) evicts the oldest
            cached = self.sinks[layer] + list(self.window[layer])
            keys = torch.stack([kv[0] for kv in cached])
            values = torch.stack([kv[1] for kv in cached])
            n = len(cached)
            keys = self.rope.rotate(keys, torch.arange(n))
            query = self.rope.rotate(q[t:t + 1], torch.tensor([n - 1]))[0]
            outs.append(self._attend(query, keys, values))
        return torch.stack(outs)

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [Hq, D]; keys, values [n, Hkv, D] -> [Hq, D] (grouped-query heads share kv heads)."""
        group = query.shape[0] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = soft_cap(torch.einsum("hd,nhd->hn", query.float(), keys.float()) * self.scale, self.softcap)
        return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values.float()).to(query.dtype)


@torch.no_grad()
def reference_logits(model, token_ids: list[int], sink_tokens: int, window_tokens: int) -> torch.Tensor:
    """Logits [len(token_ids), V] of a StreamingLLM pass over token_ids, token by token."""
    a = model.args
    device = model.lm_head.weight.device
    rope = model_rotary(a, sink_tokens + window_tokens, device, torch.float32)
    attn = ReferenceSinkWindowAttention(a.num_layers, sink_tokens, window_tokens, rope, a.attn_scale, a.attn_softcap)
    ids = torch.tensor(token_ids, device=device)
    return torch.cat([model.logits(model(ids[i:i + 1], attn)) for i in range(len(token_ids))])
