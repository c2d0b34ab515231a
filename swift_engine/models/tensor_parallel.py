"""Tensor parallelism (Megatron-style) of models/llama.py: each rank holds 1/N of every layer.

Attention heads and the MLP's intermediate columns are split across ranks (q/k/v and
gate/up column-parallel, o and down row-parallel: one all-reduce after attention and one
after the MLP). GQA with fewer KV heads than ranks replicates KV heads: rank r holds KV head
r // (N / kv_heads), the one its query heads read. The embedding and the LM head are split
by vocabulary rows (padded to a multiple of N); the embedding all-reduces, the head gathers
the logits, so every rank sees the whole vocabulary's logits. A rank's model is an ordinary
CausalLM of its local shape (args with its share of heads), so the torch path, the fused GPU
forward and the KV cache (num_kv_heads of the rank) need no other change.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .families import ModelArgs
from .llama import CausalLM


def check_tensor_parallel(a: ModelArgs, tp: int) -> None:
    """Refuse, naming the field, a split the model's shape does not allow."""
    bad = []
    if a.num_heads % tp:
        bad.append(f"num_attention_heads {a.num_heads}")
    if a.intermediate_size % tp:
        bad.append(f"intermediate_size {a.intermediate_size}")
    if a.num_kv_heads % tp and tp % a.num_kv_heads:
        bad.append(f"num_key_value_heads {a.num_kv_heads} (nor does {tp} divide by it)")
    if bad:
        raise UnsupportedModelError(f"tensor_parallel_size: {tp} does not divide the model's {', '.join(bad)}")


def local_args(a: ModelArgs, tp: int) -> ModelArgs:
    """The shape of one rank's share (vocab_size stays whole: logits are gathered)."""
    return replace(a, num_heads=a.num_heads // tp, num_kv_heads=max(a.num_kv_heads // tp, 1),
                   intermediate_size=a.intermediate_size // tp)


def vocab_shard(vocab: int, tp: int) -> int:
    return -(-vocab // tp)


class RowParallelLinear(nn.Linear):
    """x holds this rank's input columns: partial products summed over ranks, then the bias once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding; ids outside them give zeros, summed over ranks."""

    def __init__(self, vocab: int, hidden: int, group):
        super().__init__()
        self.shard = vocab_shard(vocab, group.size)
        self.start, self.group = group.rank * self.shard, group
        self.weight = nn.Parameter(torch.empty(self.shard, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = ((local >= 0) & (local < self.shard)).unsqueeze(-1)
        x = F.embedding(local.clamp(0, self.shard - 1), self.weight)
        return self.group.all_reduce(torch.where(inside, x, torch.zeros_like(x)))


class VocabParallelHead(nn.Module):
    """This rank's vocabulary rows of the LM head; the logits are gathered, padding cut off."""

    def __init__(self, vocab: int, hidden: int, group):
        super().__init__()
        self.vocab, self.group = vocab, group
        self.weight = nn.Parameter(torch.empty(vocab_shard(vocab, group.size), hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(F.linear(hidden, self.weight))[..., :self.vocab]


def split_model(a: ModelArgs, group) -> CausalLM:
    """One rank's model (build it on the meta device; the loader fills it)."""
    check_tensor_parallel(a, group.size)
    model = CausalLM(local_args(a, group.size))
    for layer in model.model.layers:
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        layer.self_attn.o_proj = RowParallelLinear(o.in_features, o.out_features, o.bias is not None, group)
        layer.mlp.down_proj = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, group)
    model.model.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, group)
    model.lm_head = VocabParallelHead(a.vocab_size, a.hidden_size, group)
    model.tie_weights()
    model.tp_group = group
    return model


def shard_tensor(name: str, t: torch.Tensor, a: ModelArgs, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s part of the full checkpoint tensor `name` (our parameter names)."""
    module = name.rsplit(".", 2)[-2]
    if module in ("q_proj", "gate_proj", "up_proj"):
        return t.chunk(tp, 0)[rank]
    if module in ("k_proj", "v_proj"):
        if a.num_kv_heads >= tp:
            return t.chunk(tp, 0)[rank]
        return t.unflatten(0, (a.num_kv_heads, -1))[rank // (tp // a.num_kv_heads)]
    if module in ("o_proj", "down_proj") and name.endswith("weight"):
        return t.chunk(tp, 1)[rank]
    if module in ("embed_tokens", "lm_head"):
        shard = vocab_shard(a.vocab_size, tp)
        return F.pad(t, (0, 0, 0, shard * tp - t.shape[0]))[rank * shard:(rank + 1) * shard]
    return t  # norms, o/down biases (added once, after the all-reduce)
