"""FP8 (e4m3) KV cache storage: one float32 scale per token and KV head.

Why per token and head (not per page or per head): a decode step writes one token into a
page that already holds others, so a per-page scale would have to be fixed before the
page's later tokens are known (clipping them) or rewritten when they grow (a read-modify-
write racing the readers of that page). A per-head scale needs calibration data we don't
have. A per-token scale is chosen from the token's own values when it is written, never
changes after, and so stays exact under eviction, sharing of pinned pages and copies.
Keys are cached before RoPE, where a few channels carry outliers; e4m3 is floating point
(relative step 2^-3 over 2^15 of range from 448 down to its smallest normal), so with the
token's largest |value| mapped to 448 the small channels stay normal, with the same relative
error as the outlier: no per-channel scale is needed. Cost: 4 bytes per 128-wide head,
3% of the fp8 bytes (K and V: 264 bytes per token and head against 512 in bf16).
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_DTYPE = torch.float32


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values [..., D], float32 scales [...]) with x ~= values * scale."""
    x = x.float()
    scale = x.abs().amax(-1) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def bytes_per_element(kv_cache_dtype: str, dtype: torch.dtype, head_dim: int) -> float:
    """Cache bytes per stored K or V element, scales included."""
    if kv_cache_dtype == "fp8":
        return 1 + torch.finfo(SCALE_DTYPE).bits / 8 / head_dim
    return torch.finfo(dtype).bits / 8
