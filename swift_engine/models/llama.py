"""Decoder for the Llama-shaped families: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, GLM / GLM-4, Gemma 2, Phi-3.

One block with the switches the families differ by (biases, activation, q/k
norms, sandwich norms, Gemma's (1 + w) norms and embedding scale); what each
family's config switches on is decided in families.py. Parameter names match
Hugging Face checkpoints (fused ones are split by the loader). Attention
(cache, positions, masks, scale, soft-capping) is delegated to an attention
backend, so the same weights run under the fast path and the slow reference.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN

from .families import ModelArgs


class Attention(Protocol):
    """What the model needs from an attention backend (see layers/attention.py)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale by (offset + w) in float32, then cast (HF's order)
            return (normed * (self.offset + self.weight.float())).to(dtype)
        return self.weight * normed.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.a = layer, a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def forward(self, x: torch.Tensor, attn: Attention) -> torch.Tensor:
        t, a = x.shape[0], self.a
        q = self.q_proj(x).view(t, a.num_heads, a.head_dim)
        k = self.k_proj(x).view(t, a.num_kv_heads, a.head_dim)
        v = self.v_proj(x).view(t, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attn(self.layer, q, k, v)  # q and k are pre-RoPE: the backend rotates
        return self.o_proj(out.reshape(t, a.num_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.act = ACT2FN[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block; GLM-4 and Gemma 2 also normalise the attention and MLP outputs ("sandwich")."""

    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = SelfAttention(a, layer)
        self.mlp = MLP(a)
        self.norm_names = a.norms  # attention in, MLP in, attention out, MLP out
        for name in filter(None, a.norms):
            setattr(self, name, RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_offset))

    def _norm(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names[slot]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: torch.Tensor, attn: Attention) -> torch.Tensor:
        x = x + self._norm(2, self.self_attn(self._norm(0, x), attn))
        return x + self._norm(3, self.mlp(self._norm(1, x)))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_offset)


class CausalLM(nn.Module):
    """Flattened-token forward: all sessions' tokens of a step in one [T] tensor."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head; call again after `to_empty` (it unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attn: Attention) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.args.embed_scale is not None:  # Gemma; HF rounds the scale to the weights' dtype first
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        for layer in self.model.layers:
            x = layer(x, attn)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.args.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
