"""Triton sink+window attention over the paged cache (decode and chunked prefill).

Semantics are those of layers/attention.py (DESIGN.md "StreamingLLM semantics"):
keys sit in the cache before RoPE and are rotated inside the kernels.

Decode (one query per session): the keys a query sees are numbered 0..n-1 in cache
order (sinks, then the visible window tokens); key i is rotated at cache position
i and the query at n-1, exactly as the slow reference does. n <= S + W, so a small
float32 cos/sin table covers every position. One launch handles every session of
the step (different lengths, paged, grouped-query heads); long caches are split
over several programs (flash-decoding) and merged by a second, tiny kernel. The
new token's key/value are written into the cache by the same kernel.

Chunked prefill (C queries per session): as attention.py, the window part uses
window indices (query j at u, key k at k: only u - k matters) and the sink part
rotates the query a second time at its cache position; both parts share one
online softmax. Query j sees the sinks and window keys (u - W, u].

Imports without Triton (see triton_ops.py); `supported` says why a shape can't run.
"""
from __future__ import annotations

import math

import torch

from .rotary import RotaryTable
from .triton_ops import HAVE_TRITON, pow2, tl, triton

LOG2E = 1.4426950408889634
# int32 fields of one decode row, in the order _decode_kernel reads them (mrow + index)
DECODE_FIELDS = ("n_vis", "n_sinks", "sink_pages", "window_offset", "slot", "row")
META_W = 8  # decode row width (fields, then padding)
# int32 fields of one prefill sequence, in the order _prefill_kernel reads them
PREFILL_FIELDS = ("start", "C", "n_sinks", "new_sinks", "old_window", "sink_pages", "window_start")
SEQ_W = 8   # prefill row width (fields, then padding)


def supported(head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the kernels handle this shape, else why not."""
    if not HAVE_TRITON:
        return "triton is not installed"
    half = head_dim // 2
    if head_dim % 2 or half < 16 or half & (half - 1):
        return f"head_dim {head_dim} (kernels need head_dim/2 a power of two >= 16)"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype}"
    return None


def fp8_unsupported(device) -> str | None:
    """None if the kernels can read and write an e4m3 cache on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "kv_cache_dtype fp8 (Triton's e4m3 needs compute capability 8.9+)"
    return None


if HAVE_TRITON:

    @triton.jit
    def _rotate(x1, x2, c, s):
        return x1 * c - x2 * s, x2 * c + x1 * s

    # fp8 (engine/kv_fp8.py): a token's largest |value| maps to 448, the largest finite e4m3
    @triton.jit
    def _fp8_scale(amax):
        return amax / 448.0

    @triton.jit
    def _fp8_quant(x, scale):
        safe = tl.where(scale > 0, scale, 1.0)
        return tl.clamp(tl.math.div_rn(x, safe), -448.0, 448.0).to(tl.float8e4nv)  # rounded as torch divides

    # lengths and split counts change from step to step: not specialized on (Triton would compile a
    # variant for values of 1 and multiples of 16, mid-serving, on the engine thread)
    @triton.jit(do_not_specialize=["split_size", "num_splits"])
    def _decode_kernel(
        Q, KN, VN, KC, VC, KS, VS, BT, META, COS, SIN, OUT, OPART, LSE,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ct, stride_sh, stride_bt, stride_meta, stride_ot, stride_oh,
        split_size, num_splits, num_q_heads, sm_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
        P: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
        ROPE_DELTA: tl.constexpr, PREC: tl.constexpr, ELEMENTWISE: tl.constexpr, FP8: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        DT = Q.dtype.element_ty  # compute dtype (the cache's, unless it holds fp8)
        mrow = META + b * stride_meta
        n_vis = tl.load(mrow + 0)
        ns = tl.load(mrow + 1)
        nsp = tl.load(mrow + 2)
        woff = tl.load(mrow + 3)
        slot = tl.load(mrow + 4).to(tl.int64)
        row = tl.load(mrow + 5).to(tl.int64)
        last = n_vis - 1
        start = sp * split_size
        end = tl.minimum(start + split_size, n_vis)
        has_new = (last >= start) & (last < end)

        g = tl.arange(0, BLOCK_G)
        gm = g < G
        heads = h * G + g
        dh = tl.arange(0, HALF)
        dv = tl.arange(0, D)
        qp = Q + row * stride_qt + heads[:, None] * stride_qh
        q1 = tl.load(qp + dh[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qp + HALF + dh[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        lpos = tl.maximum(last, 0)
        c = tl.load(COS + lpos * HALF + dh)
        s = tl.load(SIN + lpos * HALF + dh)
        qr1, qr2 = _rotate(q1, q2, c[None, :], s[None, :])
        qr1 = qr1 * sm_scale
        qr2 = qr2 * sm_scale

        # the step's own token: its key/value come from registers and go into the cache
        knp = KN + row * stride_kt + h * stride_kh
        kn1r = tl.load(knp + dh)
        kn2r = tl.load(knp + HALF + dh)
        vnr = tl.load(VN + row * stride_vt + h * stride_vh + dv)
        kn1, kn2, vn = kn1r.to(tl.float32), kn2r.to(tl.float32), vnr.to(tl.float32)
        CT = KC.dtype.element_ty
        if FP8:  # fp8: store e4m3 + scale; the token attends to itself as stored (as the torch path)
            ksc = _fp8_scale(tl.maximum(tl.max(tl.abs(kn1), 0), tl.max(tl.abs(kn2), 0)))
            vsc = _fp8_scale(tl.max(tl.abs(vn), 0))
            kq1, kq2, vq = _fp8_quant(kn1, ksc), _fp8_quant(kn2, ksc), _fp8_quant(vn, vsc)
            kn1, kn2, vn = kq1.to(tl.float32) * ksc, kq2.to(tl.float32) * ksc, vq.to(tl.float32) * vsc
            tl.store(KS + h * stride_sh + slot, ksc, mask=has_new)
            tl.store(VS + h * stride_sh + slot, vsc, mask=has_new)
        else:
            kq1, kq2, vq = kn1r.to(CT), kn2r.to(CT), vnr.to(CT)
        kr1, kr2 = _rotate(kn1, kn2, c, s)
        s_new = tl.sum(qr1 * kr1[None, :] + qr2 * kr2[None, :], axis=1)
        take = tl.where(has_new, 1.0, 0.0)
        m_i = tl.where(has_new, s_new, float("-inf"))
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32) + take
        acc = tl.zeros([BLOCK_G, D], dtype=tl.float32) + take * vn[None, :]
        cp = KC + slot * stride_ct + h * D
        tl.store(cp + dh, kq1, mask=has_new & (dh < HALF))
        tl.store(cp + HALF + dh, kq2, mask=has_new & (dh < HALF))
        tl.store(VC + slot * stride_ct + h * D + dv, vq, mask=has_new & (dv < D))

        if ROPE_DELTA:  # cos/sin of block offsets 0..BLOCK_N-1, kept in registers
            jn = tl.arange(0, BLOCK_N)
            dc = tl.load(COS + jn[:, None] * HALF + dh[None, :])
            ds = tl.load(SIN + jn[:, None] * HALF + dh[None, :])

        hi = tl.minimum(end, last)
        off_w = nsp * P + woff - ns
        for i0 in range(start, hi, BLOCK_N):
            i = i0 + tl.arange(0, BLOCK_N)
            km = i < hi
            logical = tl.where(i < ns, i, i + off_w)
            page = tl.load(BT + b * stride_bt + logical // P, mask=km, other=0)
            slots = page.to(tl.int64) * P + (logical % P)
            kp = KC + slots[:, None] * stride_ct + h * D
            k1 = tl.load(kp + dh[None, :], mask=km[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(kp + HALF + dh[None, :], mask=km[:, None], other=0.0).to(tl.float32)
            v = tl.load(VC + slots[:, None] * stride_ct + h * D + dv[None, :], mask=km[:, None], other=0.0)
            if FP8:  # fp8: each slot's scales multiply its scores and probabilities (rotation is linear)
                ks = tl.load(KS + h * stride_sh + slots, mask=km, other=0.0)
                vs = tl.load(VS + h * stride_sh + slots, mask=km, other=0.0)
            if ROPE_DELTA:
                cb = tl.load(COS + i0 * HALF + dh)[None, :]
                sb = tl.load(SIN + i0 * HALF + dh)[None, :]
                ci = cb * dc - sb * ds
                si = sb * dc + cb * ds
            else:
                ci = tl.load(COS + i[:, None] * HALF + dh[None, :], mask=km[:, None], other=0.0)
                si = tl.load(SIN + i[:, None] * HALF + dh[None, :], mask=km[:, None], other=0.0)
            a1, a2 = _rotate(k1, k2, ci, si)
            if ELEMENTWISE:  # one query head per KV head: float32 dot products, no MMA padding
                sc = tl.sum(qr1[:, None, :] * a1[None, :, :], 2) + tl.sum(qr2[:, None, :] * a2[None, :, :], 2)
            else:
                sc = tl.dot(qr1.to(DT), tl.trans(a1.to(DT)), input_precision=PREC)
                sc += tl.dot(qr2.to(DT), tl.trans(a2.to(DT)), input_precision=PREC)
            sc = sc * ks[None, :] if FP8 else sc
            sc = tl.where(km[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pw = p * vs[None, :] if FP8 else p
            if ELEMENTWISE:
                pv = tl.sum(pw[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            else:
                pv = tl.dot(pw.to(DT), v.to(DT), input_precision=PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        if DIRECT:
            op = OUT + row * stride_ot + heads[:, None] * stride_oh + dv[None, :]
            tl.store(op, o.to(OUT.dtype.element_ty), mask=gm[:, None])
        else:
            base = (b * num_q_heads + heads) * num_splits + sp
            tl.store(OPART + base[:, None] * D + dv[None, :], o, mask=gm[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(LSE + base, lse, mask=gm)

    @triton.jit(do_not_specialize=["num_splits"])
    def _combine_kernel(OPART, LSE, META, OUT, stride_meta, stride_ot, stride_oh, num_splits, num_q_heads,
                        D: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        row = tl.load(META + b * stride_meta + 5).to(tl.int64)
        si = tl.arange(0, BLOCK_S)
        sm = si < num_splits
        dv = tl.arange(0, D)
        base = (b * num_q_heads + hq) * num_splits
        lse = tl.load(LSE + base + si, mask=sm, other=float("-inf"))
        mx = tl.max(lse, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(lse - mx)
        o = tl.load(OPART + (base + si)[:, None] * D + dv[None, :], mask=sm[:, None], other=0.0)
        tot = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(tot > 0, tot, 1.0)
        tl.store(OUT + row * stride_ot + hq * stride_oh + dv, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _attend_block(a1, a2, m_i, l_i, acc, KC, VC, KS, VS, slots, pos, km, vis, COS, SIN, stride_ct, stride_sh,
                      hk, DT: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr,
                      FP8: tl.constexpr):
        dh = tl.arange(0, HALF)
        dv = tl.arange(0, D)
        kp = KC + slots[:, None] * stride_ct + hk * D
        k1 = tl.load(kp + dh[None, :], mask=km[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF + dh[None, :], mask=km[:, None], other=0.0).to(tl.float32)
        ci = tl.load(COS + pos[:, None] * HALF + dh[None, :], mask=km[:, None], other=0.0)
        si = tl.load(SIN + pos[:, None] * HALF + dh[None, :], mask=km[:, None], other=0.0)
        r1, r2 = _rotate(k1, k2, ci, si)
        sc = tl.dot(a1.to(DT), tl.trans(r1.to(DT)), input_precision=PREC)
        sc += tl.dot(a2.to(DT), tl.trans(r2.to(DT)), input_precision=PREC)
        if FP8:  # fp8: each slot's scales multiply its scores and probabilities (rotation is linear)
            sc = sc * tl.load(KS + hk * stride_sh + slots, mask=km, other=0.0)[None, :]
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + slots[:, None] * stride_ct + hk * D + dv[None, :], mask=km[:, None], other=0.0)
        if FP8:
            p = p * tl.load(VS + hk * stride_sh + slots, mask=km, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT), input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_kernel(
        Q, KC, VC, KS, VS, BT, SEQ, QB, COS, SIN, OUT,
        stride_qt, stride_qh, stride_ct, stride_sh, stride_bt, stride_ot, stride_oh,
        sm_scale, W,
        G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_W: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr,
    ):
        qb = tl.program_id(0)
        hq = tl.program_id(1)
        hk = hq // G
        sq = tl.load(QB + qb * 2)
        j0 = tl.load(QB + qb * 2 + 1)
        mrow = SEQ + sq * SEQ_W
        start = tl.load(mrow + 0)
        C = tl.load(mrow + 1)
        ns = tl.load(mrow + 2)
        new_sinks = tl.load(mrow + 3)
        old_window = tl.load(mrow + 4)
        nsp = tl.load(mrow + 5)
        ws = tl.load(mrow + 6)
        btr = BT + sq.to(tl.int64) * stride_bt

        j = j0 + tl.arange(0, BLOCK_M)
        rm = j < C
        is_sink = j < new_sinks
        sink_index = ns - new_sinks + j
        u = old_window + j - new_sinks
        seen = tl.minimum(u + 1, W)
        q_sink_pos = tl.where(is_sink, sink_index, ns + seen - 1)
        q_sink_pos = tl.where(rm, q_sink_pos, 0)
        q_win_pos = tl.where(is_sink | (~rm), 0, u)

        dh = tl.arange(0, HALF)
        dv = tl.arange(0, D)
        rows = (start + j).to(tl.int64)
        qp = Q + rows[:, None] * stride_qt + hq * stride_qh
        q1 = tl.load(qp + dh[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qp + HALF + dh[None, :], mask=rm[:, None], other=0.0).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

        # sinks: the query rotated at its cache position
        c = tl.load(COS + q_sink_pos[:, None] * HALF + dh[None, :])
        s = tl.load(SIN + q_sink_pos[:, None] * HALF + dh[None, :])
        a1, a2 = _rotate(q1, q2, c, s)
        a1 = a1 * sm_scale
        a2 = a2 * sm_scale
        for s0 in range(0, ns, BLOCK_N):
            kk = s0 + tl.arange(0, BLOCK_N)
            km = kk < ns
            page = tl.load(btr + kk // P, mask=km, other=0)
            slots = page.to(tl.int64) * P + kk % P
            vis = rm[:, None] & km[None, :] & ((~is_sink[:, None]) | (kk[None, :] <= sink_index[:, None]))
            m_i, l_i, acc = _attend_block(a1, a2, m_i, l_i, acc, KC, VC, KS, VS, slots, kk, km, vis, COS, SIN,
                                          stride_ct, stride_sh, hk, Q.dtype.element_ty, D, HALF, PREC, FP8)

        # window: query and keys at their window index (only the distance matters)
        c = tl.load(COS + q_win_pos[:, None] * HALF + dh[None, :])
        s = tl.load(SIN + q_win_pos[:, None] * HALF + dh[None, :])
        a1, a2 = _rotate(q1, q2, c, s)
        a1 = a1 * sm_scale
        a2 = a2 * sm_scale
        first = tl.maximum(j0, new_sinks)
        lastj = tl.minimum(j0 + BLOCK_M, C) - 1
        u_lo = old_window + first - new_sinks
        u_hi = old_window + lastj - new_sinks
        k_lo = tl.maximum(u_lo - W + 1, 0)
        k_hi = tl.where(first <= lastj, u_hi + 1, 0)
        wbase = nsp * P + ws
        for k0 in range(k_lo, k_hi, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            km = kk < k_hi
            logical = wbase + kk
            page = tl.load(btr + logical // P, mask=km, other=0)
            slots = page.to(tl.int64) * P + logical % P
            vis = (rm & (~is_sink))[:, None] & km[None, :] \
                & (kk[None, :] <= u[:, None]) & (kk[None, :] > u[:, None] - W)
            m_i, l_i, acc = _attend_block(a1, a2, m_i, l_i, acc, KC, VC, KS, VS, slots, kk, km, vis, COS, SIN,
                                          stride_ct, stride_sh, hk, Q.dtype.element_ty, D, HALF, PREC, FP8)

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        op = OUT + rows[:, None] * stride_ot + hq * stride_oh + dv[None, :]
        tl.store(op, o.to(OUT.dtype.element_ty), mask=rm[:, None])

    @triton.jit
    def _kv_write_kernel(K, V, KC, VC, KS, VS, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                         stride_sh, D: tl.constexpr, FP8: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(SLOTS + t).to(tl.int64)
        d = tl.arange(0, D)
        m = (d < D) & (slot >= 0)
        k = tl.load(K + t * stride_kt + h * stride_kh + d)
        v = tl.load(V + t * stride_vt + h * stride_vh + d)
        if FP8:  # fp8: quantize with the token's own scale
            k, v = k.to(tl.float32), v.to(tl.float32)
            ksc, vsc = _fp8_scale(tl.max(tl.abs(k), 0)), _fp8_scale(tl.max(tl.abs(v), 0))
            k, v = _fp8_quant(k, ksc), _fp8_quant(v, vsc)
            tl.store(KS + h * stride_sh + slot, ksc, mask=slot >= 0)
            tl.store(VS + h * stride_sh + slot, vsc, mask=slot >= 0)
        tl.store(KC + slot * stride_ct + h * D + d, k.to(KC.dtype.element_ty), mask=m)
        tl.store(VC + slot * stride_ct + h * D + d, v.to(VC.dtype.element_ty), mask=m)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device) -> int:
    if torch.device(device).type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


class DecodeParams:
    """Launch shape of the decode kernel for a batch size (fixed per CUDA-graph bucket)."""

    def __init__(self, batch: int, kv_heads: int, max_keys: int, sms: int, block_n: int = 32,
                 num_warps: int = 4, num_stages: int = 2, rope_delta: bool = False, max_splits: int = 64,
                 programs_per_sm: int = 4, elementwise: bool = False):
        want = max(1, math.ceil(programs_per_sm * sms / max(1, batch * kv_heads)))
        blocks = max(1, math.ceil(max_keys / block_n))
        splits = min(want, blocks, max_splits)
        self.max_splits = max_splits  # sizes the combine kernel: one compiled variant for every split count
        self.split_size = math.ceil(blocks / splits) * block_n
        self.num_splits = math.ceil(max_keys / self.split_size) if max_keys > 0 else 1
        self.block_n, self.num_warps, self.num_stages, self.rope_delta = block_n, num_warps, num_stages, rope_delta
        # float32 elementwise dot products instead of tl.dot (G <= 8); measured 1.9x slower on H100 for
        # MHA at 4096 (NOTES-gpu.md), kept as an option
        self.elementwise = elementwise


def decode_attention(q, k, v, kc, vc, block_table, meta, rope: RotaryTable, out, params: DecodeParams,
                     page_size: int, scales=None):
    """Attention of B single-token queries (rows given by their "row" field); writes `out` rows and the cache.
    `scales`: the layer's (k_scale, v_scale) [kv_heads, slots] when kc/vc hold fp8."""
    B, hkv = meta.shape[0], kc.shape[1]
    hq, d = q.shape[1], q.shape[2]
    g = hq // hkv
    ns = params.num_splits
    direct = ns == 1
    ew = params.elementwise
    if direct:
        opart = lse = out
    else:
        opart = torch.empty(B * hq * ns * d, device=q.device, dtype=torch.float32)
        lse = torch.empty(B * hq * ns, device=q.device, dtype=torch.float32)
    ks, vs = scales or (kc, vc)  # unread without fp8
    _decode_kernel[(B, hkv, ns)](
        q, k, v, kc, vc, ks, vs, block_table, meta, rope.cos, rope.sin, out, opart, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), ks.stride(0), block_table.stride(0), meta.stride(0), out.stride(0), out.stride(1),
        params.split_size, ns, hq, d ** -0.5 * LOG2E,
        G=g, BLOCK_G=pow2(g) if ew else max(16, pow2(g)), D=d, HALF=d // 2, P=page_size,
        BLOCK_N=params.block_n, DIRECT=direct, ROPE_DELTA=params.rope_delta, PREC=_prec(q.dtype), ELEMENTWISE=ew,
        FP8=scales is not None,
        num_warps=params.num_warps, num_stages=params.num_stages)
    if not direct:
        _combine_kernel[(B, hq)](opart, lse, meta, out, meta.stride(0), out.stride(0), out.stride(1), ns, hq,
                                 D=d, BLOCK_S=max(2, pow2(params.max_splits)), num_warps=4)


def prefill_attention(q, kc, vc, block_table, seq_meta, qblocks, n_qblocks: int, rope: RotaryTable, out,
                      window: int, page_size: int, block_m: int = 64, block_n: int = 64,
                      num_warps: int = 4, num_stages: int = 2, scales=None):
    hq, d = q.shape[1], q.shape[2]
    g = hq // kc.shape[1]
    if n_qblocks == 0:
        return
    ks, vs = scales or (kc, vc)  # unread without fp8
    _prefill_kernel[(n_qblocks, hq)](
        q, kc, vc, ks, vs, block_table, seq_meta, qblocks, rope.cos, rope.sin, out,
        q.stride(0), q.stride(1), kc.stride(0), ks.stride(0), block_table.stride(0), out.stride(0), out.stride(1),
        d ** -0.5 * LOG2E, window,
        G=g, D=d, HALF=d // 2, P=page_size, BLOCK_M=block_m, BLOCK_N=block_n, SEQ_W=SEQ_W,
        PREC=_prec(q.dtype), FP8=scales is not None, num_warps=num_warps, num_stages=num_stages)


def kv_write(k, v, kc, vc, slots, scales=None):
    """Rows with slot < 0 are skipped. `scales` as in decode_attention."""
    t, hkv, d = k.shape
    ks, vs = scales or (kc, vc)  # unread without fp8
    if t:
        _kv_write_kernel[(t, hkv)](k, v, kc, vc, ks, vs, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   kc.stride(0), ks.stride(0), D=d, FP8=scales is not None, num_warps=1)
