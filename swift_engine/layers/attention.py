"""Sink+window attention over the paged cache, PyTorch path (CPU reference speed, any device).

Per sequence and step, a chunk of C new tokens attends to the sinks and to
the window (old window tokens followed by the chunk's own window tokens).
Query j sees the sinks and exactly the W most recent tokens up to itself.

Positions (DESIGN.md "position shift"): sinks sit at 0..S-1 and the query at
S + (window tokens it sees) - 1. Window scores depend only on the distance
between query and key, so window keys and queries are rotated at their index
in the old+new window sequence (bounded by W + C), while for sink scores the
query is rotated a second time at its cache position. Both score sets share
one softmax, which is exactly attention over the cache as the reference
builds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.cache import AppendPlan, SinkWindowCache
from .rotary import RotaryTable


@dataclass
class SeqAttention:
    start: int
    end: int
    sink_slots: torch.Tensor
    window_slots: torch.Tensor
    sink_slot_pos: torch.Tensor
    window_slot_pos: torch.Tensor
    q_sink_pos: torch.Tensor
    q_window_pos: torch.Tensor
    sink_mask: torch.Tensor    # [C, n_sinks] True where visible
    window_mask: torch.Tensor  # [C, n_window]


def plan_sequence(plan: AppendPlan, start: int, window_tokens: int, device) -> SeqAttention:
    """Positions and masks of one sequence's chunk (shared by all layers)."""
    n = len(plan.write_slots)
    ns, nw = len(plan.sink_slots), len(plan.window_slots)
    i = torch.arange(n)
    is_sink = i < plan.new_sinks
    sink_index = ns - plan.new_sinks + i                 # for chunk tokens that are sinks
    u = plan.old_window + (i - plan.new_sinks)            # window index for the others
    seen = torch.clamp(u + 1, max=window_tokens)
    q_sink_pos = torch.where(is_sink, sink_index, ns + seen - 1)
    q_window_pos = torch.where(is_sink, 0, u)
    keys_s = torch.arange(ns)
    keys_w = torch.arange(nw)
    sink_mask = torch.where(is_sink[:, None], keys_s[None, :] <= sink_index[:, None], True)
    window_mask = (~is_sink[:, None]) & (keys_w[None, :] <= u[:, None]) \
        & (keys_w[None, :] > u[:, None] - window_tokens)
    to = dict(device=device)
    return SeqAttention(
        start, start + n,
        torch.tensor(plan.sink_slots, dtype=torch.long, **to),
        torch.tensor(plan.window_slots, dtype=torch.long, **to),
        keys_s.to(**to), keys_w.to(**to), q_sink_pos.to(**to), q_window_pos.to(**to),
        sink_mask.to(**to), window_mask.to(**to))


@dataclass
class DecodeBatch:
    """A step in which every sequence decodes one token: their keys gathered, rotated and attended as one
    batch (per sequence, each layer cost ~40 small ops; on the CPU that was most of a decode step).
    Key columns: the sinks (0..n_sink_cols-1, rotated at their index), then the window (rotated at their
    window index); shorter sequences are padded (with a key of their own) and masked."""
    slots: torch.Tensor        # [B * K] pool slots, row-major
    n_sink_cols: int
    mask: torch.Tensor         # [B, 1, 1, K] visible keys
    key_rot: tuple             # rotary factors of the K columns' positions
    q_sink_rot: tuple          # ... of each query at its cache position (sink scores)
    q_window_rot: tuple        # ... at its window index (window scores)


def plan_decode(seqs: list[SeqAttention], rope: RotaryTable) -> DecodeBatch | None:
    """The batch of a decode-only step (None if any sequence feeds more than one token)."""
    if any(s.end - s.start != 1 for s in seqs):
        return None
    ns, nw = max(len(s.sink_slots) for s in seqs), max(len(s.window_slots) for s in seqs)
    device = seqs[0].sink_slots.device
    slots = torch.zeros(len(seqs), ns + nw, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), ns + nw, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        a, b = len(s.sink_slots), len(s.window_slots)
        # padding reads the sequence's own newest key (written this step), never slot 0: a masked column still
        # multiplies its value by 0, and a never-written slot may hold NaN (0 * NaN is NaN for the whole row)
        slots[i] = (s.window_slots if b else s.sink_slots)[-1]
        slots[i, :a], slots[i, ns:ns + b] = s.sink_slots, s.window_slots
        mask[i, :a], mask[i, ns:ns + b] = s.sink_mask[0], s.window_mask[0]
    keys = torch.cat([torch.arange(ns, device=device), torch.arange(nw, device=device)])
    return DecodeBatch(slots.view(-1), ns, mask[:, None, None, :], rope.factors(keys),
                       rope.factors(torch.cat([s.q_sink_pos for s in seqs])),
                       rope.factors(torch.cat([s.q_window_pos for s in seqs])))


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping: cap * tanh(scores / cap), before the mask."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


class TorchSinkWindowAttention:
    """Callable the model uses as its attention for one step."""

    def __init__(self, cache: SinkWindowCache, rope: RotaryTable, seqs: list[SeqAttention],
                 write_slots: torch.Tensor, scale: float, softcap: float | None):
        self.cache, self.rope, self.seqs, self.write_slots = cache, rope, seqs, write_slots
        self.scale, self.softcap = scale, softcap  # the model's score scale and Gemma's tanh soft-capping
        self.decode = plan_decode(seqs, rope) if seqs else None  # shared by every layer of the step

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.write_slots, k, v)
        if self.decode is not None:
            return self._decode(q, layer, self.decode)
        out = torch.empty_like(q)
        for s in self.seqs:
            out[s.start:s.end] = self._one(q[s.start:s.end], layer, s)
        return out

    def _decode(self, q, layer: int, b: DecodeBatch) -> torch.Tensor:
        """As `_one` for every sequence at once (one query each)."""
        n, hq, d = q.shape
        keys, values = self.cache.read(layer, b.slots)
        hkv = keys.shape[1]
        keys = self.rope.apply(keys.view(n, -1, hkv, d), b.key_rot)
        qs = self.rope.apply(q, b.q_sink_rot).view(n, hkv, hq // hkv, d)
        qw = self.rope.apply(q, b.q_window_rot).view(n, hkv, hq // hkv, d)
        ns = b.n_sink_cols
        scores = torch.cat([torch.einsum("bhgd,bkhd->bhgk", qs, keys[:, :ns]),
                            torch.einsum("bhgd,bkhd->bhgk", qw, keys[:, ns:])], dim=-1).float()
        scores = soft_cap(scores * self.scale, self.softcap).masked_fill(~b.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.einsum("bhgk,bkhd->bhgd", probs, values.view(n, -1, hkv, d)).reshape(n, hq, d)

    def _one(self, q, layer: int, s: SeqAttention) -> torch.Tensor:
        c, hq, d = q.shape
        ks, vs = self.cache.read(layer, s.sink_slots)
        kw, vw = self.cache.read(layer, s.window_slots)
        hkv = ks.shape[1]
        rot = self.rope.rotate
        qs = rot(q, s.q_sink_pos).view(c, hkv, hq // hkv, d)
        qw = rot(q, s.q_window_pos).view(c, hkv, hq // hkv, d)
        ks = rot(ks, s.sink_slot_pos)
        kw = rot(kw, s.window_slot_pos)
        scores = torch.cat([torch.einsum("chgd,khd->hgck", qs, ks),
                            torch.einsum("chgd,khd->hgck", qw, kw)], dim=-1).float()
        mask = torch.cat([s.sink_mask, s.window_mask], dim=-1)
        scores = soft_cap(scores * self.scale, self.softcap).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        values = torch.cat([vs, vw], dim=0)
        return torch.einsum("hgck,khd->chgd", probs, values).reshape(c, hq, d)
