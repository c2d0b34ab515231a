"""The GPU forward of models/llama.py: the model's own arithmetic with fewer launches.

q/k/v and gate/up projections are fused into one GEMM each (the model's parameters
become views of the fused tensors, so the torch path and state_dict still work);
residual add + RMSNorm and SiLU * up are single Triton kernels; decode steps (few
rows) may stream weights through the Triton GEMV instead of cuBLAS. Attention is a
callable the runner passes in (engine/gpu_runner.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..layers import triton_ops as ops


def _fuse(linears, attr: str = "weight") -> torch.Tensor | None:
    """One tensor holding the linears' `attr` rows back to back; each linear's parameter becomes
    a view of it (no extra memory; a second engine over the same model reuses it)."""
    params = [getattr(m, attr) for m in linears]
    if params[0] is None:
        return None
    key = f"_swift_fused_{attr}"
    fused = getattr(linears[0], key, None)
    if fused is not None:
        off, ok = 0, True
        for p in params:
            ok &= p.data_ptr() == fused[off:off + p.shape[0]].data_ptr() and p.is_contiguous()
            off += p.shape[0]
        if ok and off == fused.shape[0]:
            return fused
    fused = torch.cat([p.data for p in params]).contiguous()
    off = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[off:off + n]
        off += n
    setattr(linears[0], key, fused)
    return fused


class FusedDecoder:
    def __init__(self, model):
        a = model.args
        self.model, self.a = model, a
        self.nq, self.nk = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.layers = []
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(SimpleNamespace(
                wqkv=_fuse([at.q_proj, at.k_proj, at.v_proj]),
                bqkv=_fuse([at.q_proj, at.k_proj, at.v_proj], "bias"),
                wo=at.o_proj.weight, wgu=_fuse([mlp.gate_proj, mlp.up_proj]), wdown=mlp.down_proj.weight,
                in_w=layer.input_layernorm.weight, in_eps=layer.input_layernorm.eps,
                post_w=layer.post_attention_layernorm.weight, post_eps=layer.post_attention_layernorm.eps,
                q_norm=getattr(at, "q_norm", None), k_norm=getattr(at, "k_norm", None)))
        self.norm = model.model.norm
        group = getattr(model, "tp_group", None)  # tensor parallel: o and down are row-parallel
        self.reduce = group.all_reduce if group is not None else (lambda x: x)
        self.gemv_cfg: dict = {}

    def _lin(self, x, w, b=None, gemv: bool = False):
        if gemv:
            return ops.gemv(x, w, bias=b, **self.gemv_cfg)
        return F.linear(x, w, b)

    def forward(self, ids: torch.Tensor, attn, gemv: bool = False) -> torch.Tensor:
        """gemv: few rows (decode) -> weight-streaming Triton GEMV instead of cuBLAS (measured faster
        in a CUDA graph at M <= 32, and no split-K reduce kernels; NOTES-gpu.md)."""
        a, L = self.a, self.layers
        x = self.model.model.embed_tokens(ids)  # a module call: tensor-parallel vocab shards all-reduce
        t = x.shape[0]
        gemv = gemv and t <= ops.GEMV_MAX_M
        res, h = ops.add_rmsnorm(x, None, L[0].in_w, L[0].in_eps)
        for i, ly in enumerate(L):
            qkv = self._lin(h, ly.wqkv, ly.bqkv, gemv)
            q = qkv[:, :self.nq].view(t, a.num_heads, a.head_dim)
            k = qkv[:, self.nq:self.nq + self.nk].view(t, a.num_kv_heads, a.head_dim)
            v = qkv[:, self.nq + self.nk:].view(t, a.num_kv_heads, a.head_dim)
            if ly.q_norm is not None:
                q, k = ly.q_norm(q), ly.k_norm(k)
            o = attn(i, q, k, v)
            o = self.reduce(self._lin(o.view(t, self.nq), ly.wo, None, gemv))
            res, h = ops.add_rmsnorm(res, o, ly.post_w, ly.post_eps, residual_out=res)
            m = self.reduce(self._lin(ops.silu_mul(self._lin(h, ly.wgu, None, gemv)), ly.wdown, None, gemv))
            nxt = L[i + 1] if i + 1 < len(L) else None
            res, h = ops.add_rmsnorm(res, m, nxt.in_w if nxt else self.norm.weight,
                                    nxt.in_eps if nxt else self.norm.eps, residual_out=res)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()  # tensor parallel: the vocab shards' logits gathered
