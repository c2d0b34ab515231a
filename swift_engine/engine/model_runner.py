"""Runs one batched model step: flattened tokens of all scheduled sessions."""
from __future__ import annotations

import torch

from ..layers.attention import TorchSinkWindowAttention, plan_sequence
from ..layers.rotary import RotaryTable, inv_frequencies
from ..models.llama import CausalLM
from .cache import AppendPlan, SinkWindowCache


class ModelRunner:
    def __init__(self, model: CausalLM, cache: SinkWindowCache, max_batch_tokens: int):
        a = model.args
        self.model, self.cache = model, cache
        self.device = model.lm_head.weight.device
        self.rope = RotaryTable(inv_frequencies(a.head_dim, a.rope_theta, a.rope_scaling),
                                cache.S + cache.W + max_batch_tokens + 1, self.device,
                                model.lm_head.weight.dtype)

    @torch.no_grad()
    def run(self, chunks: list[list[int]], plans: list[AppendPlan],
            logit_rows: list[list[int]]) -> list[torch.Tensor]:
        """chunks[i]: token ids of sequence i; logit_rows[i]: chunk rows whose logits are wanted.

        Returns float32 logits [len(logit_rows[i]), V] per sequence.
        """
        seqs, start = [], 0
        for chunk, plan in zip(chunks, plans):
            seqs.append(plan_sequence(plan, start, self.cache.W, self.device))
            start += len(chunk)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        write = torch.tensor([s for p in plans for s in p.write_slots], dtype=torch.long, device=self.device)
        hidden = self.model(ids, TorchSinkWindowAttention(self.cache, self.rope, seqs, write))
        rows = torch.tensor([s.start + r for s, rs in zip(seqs, logit_rows) for r in rs],
                            dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden[rows]) if len(rows) else hidden.new_empty(0, 0)
        return list(torch.split(logits, [len(r) for r in logit_rows]))
