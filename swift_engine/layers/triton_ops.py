"""Small Triton ops of the GPU forward (models/fused.py): residual add + RMSNorm, SiLU * up,
and a weight-streaming GEMV for decode steps (few rows), which keep a decode step to nine
launches per layer. Also the shared Triton set-up: everything here imports without Triton
(CPU CI): `HAVE_TRITON` says whether the kernels exist; with TRITON_INTERPRET=1 they also
run (slowly) on CPU tensors.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the CPU path never needs it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _add_rmsnorm_kernel(X, Y, WT, R, O, stride_x, stride_y, stride_r, stride_o, N, eps,
                            HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        """R = X + Y (rounded to the activation dtype, like torch's add); O = RMSNorm(R) * weight."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_Y:
            y = tl.load(Y + row * stride_y + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(R.dtype.element_ty)
            tl.store(R + row * stride_r + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        n = (xf * tl.rsqrt(var + eps)).to(O.dtype.element_ty).to(tl.float32)
        w = tl.load(WT + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(O + row * stride_o + cols, (n * w).to(O.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, O, stride_gu, stride_o, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        g = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + N + cols, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(O.dtype.element_ty).to(tl.float32)
        tl.store(O + row * stride_o + cols, (a * u).to(O.dtype.element_ty), mask=m)


    @triton.jit(do_not_specialize=["M"])  # rows change with the batch: one variant per BLOCK_M, not per M
    def _gemv_kernel(X, W, B, NW, RES, Y, M, N, K, stride_x, stride_res, stride_y, eps,
                     PRO: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Y[m, n] = sum_k x[m, k] W[n, k] for few rows m (decode), with fused neighbours:
        PRO 0: x = X; 1: x = RMSNorm(X) * NW (rounded as models/llama.py rounds); 2: x = SiLU(g) * u
        with X = [g | u] (K columns each). EPI 0: Y = bf16(acc) (+ bias); 1: RES += bf16(acc), in place."""
        pid = tl.program_id(0)
        DT = W.dtype.element_ty
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        m = tl.arange(0, BLOCK_M)
        mm = m < M
        kk = tl.arange(0, BLOCK_K)
        xrow = X + m.to(tl.int64)[:, None] * stride_x
        if PRO == 1:
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(xrow + (k0 + kk)[None, :], mask=mm[:, None] & ((k0 + kk) < K)[None, :],
                             other=0.0).to(tl.float32)
                ss += tl.sum(xk * xk, 1)
            rstd = tl.rsqrt(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        wrow = W + n.to(tl.int64)[:, None] * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            km = k < K
            xm = mm[:, None] & km[None, :]
            if PRO == 2:
                g = tl.load(xrow + k[None, :], mask=xm, other=0.0).to(tl.float32)
                u = tl.load(xrow + K + k[None, :], mask=xm, other=0.0).to(tl.float32)
                a = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
                x = (a * u).to(DT)
            else:
                x = tl.load(xrow + k[None, :], mask=xm, other=0.0)
            if PRO == 1:
                nw = tl.load(NW + k, mask=km, other=0.0).to(tl.float32)
                x = ((x.to(tl.float32) * rstd[:, None]).to(DT).to(tl.float32) * nw[None, :]).to(DT)
            w = tl.load(wrow + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(x.to(DT), tl.trans(w))
        om = mm[:, None] & nm[None, :]
        if EPI == 1:
            rp = RES + m.to(tl.int64)[:, None] * stride_res + n[None, :]
            r = tl.load(rp, mask=om, other=0.0).to(tl.float32)
            y = acc.to(DT).to(tl.float32)
            tl.store(rp, (r + y).to(RES.dtype.element_ty), mask=om)
        else:
            if HAS_BIAS:
                acc += tl.load(B + n, mask=nm, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + m.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(Y.dtype.element_ty), mask=om)


def add_rmsnorm(x, y, weight, eps: float, residual_out=None, out=None):
    """(x + y, rmsnorm(x + y) * weight); with y None: (x, rmsnorm(x) * weight). 2-D [T, N] rows."""
    t, n = x.shape
    out = torch.empty_like(x) if out is None else out
    if y is None:
        r = x
    else:
        r = torch.empty_like(x) if residual_out is None else residual_out
    block = pow2(n)
    if t:
        _add_rmsnorm_kernel[(t,)](x, y if y is not None else x, weight, r, out,
                                  x.stride(0), (y if y is not None else x).stride(0), r.stride(0), out.stride(0),
                                  n, eps, HAS_Y=y is not None, BLOCK=block,
                                  num_warps=8 if block >= 4096 else 4)
    return r, out


def silu_mul(gu):
    t, two_n = gu.shape
    n = two_n // 2
    out = torch.empty(t, n, device=gu.device, dtype=gu.dtype)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gu, out, gu.stride(0), out.stride(0), n, BLOCK=block,
                                                       num_warps=4)
    return out


GEMV_MAX_M = 32


def gemv_block_n(n: int, sms: int) -> int:
    b = 16
    while b < 64 and n // (2 * b) >= 2 * sms:
        b *= 2
    return b


def gemv(x, w, *, bias=None, norm_weight=None, eps: float = 0.0, silu: bool = False, residual=None,
         block_n: int | None = None, block_k: int = 256, num_warps: int = 4, num_stages: int = 4, sms: int = 132):
    """x [M, K] (or [M, 2K] with silu) times w [N, K]^T for M <= GEMV_MAX_M, one launch.

    norm_weight: x is RMSNorm'ed first; silu: x = silu(x[:, :K]) * x[:, K:]; residual: residual += result
    (in place, returned) instead of a new output."""
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    assert m <= GEMV_MAX_M and w.is_contiguous() and x.stride(1) == 1
    bn = block_n or gemv_block_n(n, sms)
    y = residual if residual is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    pro = 1 if norm_weight is not None else 2 if silu else 0
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, bias if bias is not None else w, norm_weight if norm_weight is not None else w, y, y,
        m, n, k, x.stride(0), y.stride(0), y.stride(0), eps,
        PRO=pro, EPI=1 if residual is not None else 0, HAS_BIAS=bias is not None,
        BLOCK_M=max(16, pow2(m)), BLOCK_N=bn, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y
