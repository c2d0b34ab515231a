"""Rotary position embedding: frequencies (default, linear and llama3 scaling) and rotation.

Partial rotary (GLM, Phi-4-mini) rotates the leading dims of each head and
passes the rest through; GLM pairs dims (2i, 2i+1), the others pair halves.

Angles are computed in float64: a fast path may rotate at absolute positions
that reach millions, where float32 angles lose whole radians.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedModelError


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2], float64, as Hugging Face defines them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv, scaling)
    raise UnsupportedModelError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin [positions, head_dim/2] for positions 0..max_positions-1 (cache positions stay small
    by design), angles in float64. The torch path keeps them in the activation dtype; the Triton
    kernels read float32 ones."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, device, dtype, interleaved: bool = False):
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq.double())
        self.cos = angles.cos().to(device=device, dtype=dtype).contiguous()
        self.sin = angles.sin().to(device=device, dtype=dtype).contiguous()
        self.positions = max_positions
        self.interleaved = interleaved

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, H, D] rotated at positions [N] (HF's layouts); dims past the table's pass through."""
        return self.apply(x, self.factors(positions))

    def factors(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, D/2] of positions [N]: gathered once, applied to many (`apply`)."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    def apply(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [..., N, H, D] rotated by `factors` of N positions."""
        cos, sin = factors
        r = 2 * cos.shape[-1]
        if self.interleaved:  # GLM: pairs (2i, 2i+1)
            x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:
            x1, x2 = x[..., :r // 2], x[..., r // 2:r]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


def model_rotary(a, max_positions: int, device, dtype) -> RotaryTable:
    """The rotary table of a model (its ModelArgs): rotated dims, frequencies, pair layout."""
    return RotaryTable(inv_frequencies(a.rotary_dim, a.rope_theta, a.rope_scaling), max_positions, device, dtype,
                       interleaved=a.rope_interleaved)
