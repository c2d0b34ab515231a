"""The GPU step: fused forward (models/fused.py), Triton sink+window attention, CUDA graphs for decode.

`GpuRunner.run` has ModelRunner.run's contract. A step whose sequences all feed one
token (pure decode) replays a CUDA graph captured for the smallest batch-size
bucket that holds it; its metadata (token ids, per-session lengths/slots, page
tables) lives in one static int32 device buffer, refreshed by a single host->device
copy per step. Other steps (prefill chunks, mixed) run eagerly: single-token
sequences through the decode kernel, longer chunks through the prefill kernel.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import EngineConfig
from ..layers import triton_attention as ta
from ..layers.rotary import RotaryTable
from ..models.fused import FusedDecoder
from .cache import AppendPlan, SinkWindowCache, span_pages

# measured on H100 (benchmarks/NOTES-gpu.md): 4096-token chunk 1.06 vs 1.28 ms/layer for 64x64x4 warps
PREFILL_CFG = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128)
MAX_GRAPH_BATCH = 128
# one row of the static decode buffer: [token id | decode fields (ta.DECODE_FIELDS, padded to META_W) | pages]
META_COL = 1
PAGES_COL = META_COL + ta.META_W
N_FIELDS = len(ta.DECODE_FIELDS)
ROW_COL = META_COL + ta.DECODE_FIELDS.index("row")


# ---- plans -> page-level metadata ------------------------------------------------
def decode_row(plan: AppendPlan, window: int, row: int):
    """Decode metadata (ta.DECODE_FIELDS, in order) and the page list."""
    ns, nw = plan.sink_len, plan.window_len
    if plan.new_sinks:  # the token itself became a sink: it sees the sinks only
        n_vis, woff = ns, 0
    else:
        nwv = min(nw, window)
        n_vis, woff = ns + nwv, plan.window_start + nw - nwv
    return (n_vis, ns, len(plan.sink_pages), woff, plan.write_slots[0], row), plan.sink_pages + plan.window_pages


def prefill_row(plan: AppendPlan, start: int, n: int):
    """Prefill metadata (ta.PREFILL_FIELDS, in order, padded to SEQ_W) and the page list."""
    return ((start, n, plan.sink_len, plan.new_sinks, plan.old_window, len(plan.sink_pages), plan.window_start, 0),
            plan.sink_pages + plan.window_pages)


# ---- attention backends (callables the fused forward calls per layer) --------------
class DecodeAttention:
    def __init__(self, runner: GpuRunner, meta, block_table, params: ta.DecodeParams):
        self.r, self.meta, self.bt, self.params = runner, meta, block_table, params

    def __call__(self, layer, q, k, v):
        r = self.r
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        ta.decode_attention(q, k, v, r.cache.k[layer], r.cache.v[layer], self.bt, self.meta, r.rope, out,
                            self.params, r.cache.P, r.scales(layer))
        return out


class MixedAttention:
    """Prefill chunks through the prefill kernel, single-token sequences through the decode kernel."""

    def __init__(self, runner, write_slots, pre, dec):
        self.r, self.write_slots, self.pre, self.dec = runner, write_slots, pre, dec

    def __call__(self, layer, q, k, v):
        r = self.r
        kc, vc, scales = r.cache.k[layer], r.cache.v[layer], r.scales(layer)
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        if self.pre is not None:
            seq, qb, nqb, bt = self.pre
            ta.kv_write(k, v, kc, vc, self.write_slots, scales)
            ta.prefill_attention(q, kc, vc, bt, seq, qb, nqb, r.rope, out, r.cache.W, r.cache.P, **r.prefill_cfg,
                                 scales=scales)
        if self.dec is not None:
            meta, bt, params = self.dec
            ta.decode_attention(q, k, v, kc, vc, bt, meta, r.rope, out, params, r.cache.P, scales)
        return out


# ---- the runner ---------------------------------------------------------------------
class GpuRunner:
    def __init__(self, model, cache: SinkWindowCache, config: EngineConfig, rope: RotaryTable,
                 decode_cfg: dict | None = None, prefill_cfg: dict | None = None):
        a = model.args
        self.a, self.cache, self.rope = a, cache, rope  # rope: float32 tables, S + W + max_batch_tokens + 1
        self.device = model.lm_head.weight.device
        self.fused = FusedDecoder(model)
        self.sms = ta.num_sms(self.device)
        self.decode_cfg = dict(decode_cfg or {})
        self.prefill_cfg = dict(PREFILL_CFG, **(prefill_cfg or {}))
        # graphs for batches of S-sink sessions keep S + W keys; "wide" ones hold pinned regions (up to max_sinks)
        self.max_keys, self.wide_keys = cache.S + cache.W, cache.max_sinks + cache.W
        self.maxp = span_pages(cache.max_sinks, cache.W + 1, cache.P)  # pages a decoding session's plan lists
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        fits = [b for b in GRAPH_BUCKETS if b <= min(MAX_GRAPH_BATCH, config.max_batch_tokens)] or [1]
        # up to the first bucket that holds max_running sessions: larger ones would never replay
        self.buckets = fits[:next((i + 1 for i, b in enumerate(fits) if b >= config.max_running), len(fits))]
        self.width = PAGES_COL + self.maxp
        self.host = np.zeros((self.buckets[-1], self.width), dtype=np.int32)
        self.dev = torch.zeros(self.buckets[-1], self.width, dtype=torch.int32, device=self.device) \
            if self.use_graphs else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # by bucket
        self.wide_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # batches with pinned regions
        self.pool = None
        self.stats = dict(graph_steps=0, eager_decode_steps=0, mixed_steps=0, captures=0)
        # decode steps (graph or eager) through the Triton GEMV, or cuBLAS (config.triton_gemv)
        self.use_gemv = config.triton_gemv and self.device.type == "cuda" \
            and model.lm_head.weight.dtype != torch.float32
        self.fused.gemv_cfg["sms"] = self.sms
        # every graph at start, as vLLM does: a bucket's first use mid-serving stalled every session
        for wide in (False, True) if cache.max_sinks > cache.S else (False,):
            for bucket in self.buckets if self.use_graphs else ():
                self._capture(bucket, wide)

    def scales(self, layer: int):
        """The layer's (k_scale, v_scale) for an fp8 cache, else None."""
        c = self.cache
        return (c.k_scale[layer], c.v_scale[layer]) if c.fp8 else None

    def params_for(self, batch: int, max_keys: int) -> ta.DecodeParams:
        return ta.DecodeParams(batch, self.a.num_kv_heads, max_keys, self.sms, **self.decode_cfg)

    # -- public
    @torch.no_grad()
    def run(self, chunks: list[list[int]], plans: list[AppendPlan], logit_rows: list[list[int]]):
        if all(len(c) == 1 for c in chunks):
            logits = self._decode(chunks, plans)
            return [logits[i:i + 1] if rows else logits[i:i] for i, rows in enumerate(logit_rows)]
        return self._mixed(chunks, plans, logit_rows)

    # -- decode: one token per session
    def _fill(self, chunks, plans, rows: int) -> bool:
        """Write ids + metadata of the step into self.host[:rows] (padding after). False if it won't fit."""
        h, W = self.host, self.cache.W
        for i, (chunk, plan) in enumerate(zip(chunks, plans)):
            meta, pages = decode_row(plan, W, i)
            if len(pages) > self.maxp:
                return False
            h[i, 0] = chunk[0]
            h[i, META_COL:META_COL + N_FIELDS] = meta
            h[i, PAGES_COL:PAGES_COL + len(pages)] = pages
        n = len(chunks)
        if rows > n:
            h[n:rows, :PAGES_COL] = 0
            h[n:rows, ROW_COL] = np.arange(n, rows)
        return True

    def _decode(self, chunks, plans) -> torch.Tensor:
        B = len(chunks)
        bucket = next((b for b in self.buckets if b >= B), None) if self.use_graphs else None
        wide = any(p.sink_len > self.cache.S for p in plans)
        graphs = self.wide_graphs if wide else self.graphs
        if bucket is not None and self._fill(chunks, plans, bucket):
            graph, out = graphs[bucket]
            self.dev[:bucket].copy_(torch.from_numpy(self.host[:bucket]))
            graph.replay()
            self.stats["graph_steps"] += 1
            return out[:B].clone()
        self.stats["eager_decode_steps"] += 1
        rows, pages = zip(*(decode_row(p, self.cache.W, i) for i, p in enumerate(plans)))
        meta = np.zeros((B, ta.META_W), dtype=np.int32)
        meta[:, :N_FIELDS] = rows
        bt = np.zeros((B, max(1, max(len(p) for p in pages))), dtype=np.int32)
        for i, p in enumerate(pages):
            bt[i, :len(p)] = p
        ids = torch.tensor([c[0] for c in chunks], dtype=torch.long, device=self.device)
        meta_t, bt_t = torch.from_numpy(meta).to(self.device), torch.from_numpy(bt).to(self.device)
        attn = DecodeAttention(self, meta_t, bt_t, self.params_for(B, int(meta[:, 0].max())))
        return self.fused.logits(self.fused.forward(ids, attn, gemv=self.use_gemv))

    def _capture(self, bucket: int, wide: bool = False):
        view = self.dev[:bucket]
        params = self.params_for(bucket, self.wide_keys if wide else self.max_keys)
        self.host[:bucket] = 0
        self.host[:bucket, ROW_COL] = np.arange(bucket)
        view.copy_(torch.from_numpy(self.host[:bucket]))

        def forward():
            attn = DecodeAttention(self, view[:, META_COL:PAGES_COL], view[:, PAGES_COL:], params)
            return self.fused.logits(self.fused.forward(view[:, 0], attn, gemv=self.use_gemv))

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward()  # compiles kernels, creates cuBLAS handles/workspaces outside capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward()
        if self.pool is None:
            self.pool = graph.pool()
        (self.wide_graphs if wide else self.graphs)[bucket] = (graph, out)
        self.stats["captures"] += 1
        return graph, out

    # -- prefill chunks (and any single-token sequences in the same step)
    def _mixed(self, chunks, plans, logit_rows):
        self.stats["mixed_steps"] += 1
        W = self.cache.W
        bm = self.prefill_cfg["block_m"]
        T = sum(len(c) for c in chunks)
        slots = np.full(T, -1, dtype=np.int32)
        pre_rows, pre_pages, qblocks, dec_rows, dec_pages, starts = [], [], [], [], [], []
        start = 0
        limit = self.rope.positions - self.cache.max_sinks - self.cache.W - 1
        for chunk, plan in zip(chunks, plans):
            n = len(chunk)
            if n > limit:
                raise ValueError(f"chunk of {n} tokens exceeds max_batch_tokens={limit}")
            starts.append(start)
            if n == 1:
                meta, pages = decode_row(plan, W, start)
                dec_rows.append(meta)
                dec_pages.append(pages)
            else:
                meta, pages = prefill_row(plan, start, n)
                slots[start:start + n] = plan.write_slots
                qblocks += [(len(pre_rows), j0) for j0 in range(0, n, bm)]
                pre_rows.append(meta)
                pre_pages.append(pages)
            start += n
        dev = self.device

        def table(pages):
            bt = np.zeros((len(pages), max(1, max(len(p) for p in pages))), dtype=np.int32)
            for i, p in enumerate(pages):
                bt[i, :len(p)] = p
            return torch.from_numpy(bt).to(dev)

        pre = dec = None
        if pre_rows:
            pre = (torch.tensor(pre_rows, dtype=torch.int32, device=dev),
                   torch.tensor(qblocks, dtype=torch.int32, device=dev), len(qblocks), table(pre_pages))
        if dec_rows:
            meta = np.zeros((len(dec_rows), ta.META_W), dtype=np.int32)
            meta[:, :N_FIELDS] = dec_rows
            dec = (torch.from_numpy(meta).to(dev), table(dec_pages),
                   self.params_for(len(dec_rows), int(meta[:, 0].max())))
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)
        attn = MixedAttention(self, torch.from_numpy(slots).to(dev), pre, dec)
        hidden = self.fused.forward(ids, attn)
        rows = [s + r for s, rs in zip(starts, logit_rows) for r in rs]
        if rows:
            logits = self.fused.logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)])
        else:
            logits = hidden.new_empty(0, 0, dtype=torch.float32)
        return list(torch.split(logits, [len(r) for r in logit_rows]))
