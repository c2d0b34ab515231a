"""Top-p on the GPU: the sampler's sort against sort-free cuts, on [batch, vocab] probabilities, same
run; every variant must keep exactly the sort's tokens. The cut is "keep every token at least as likely
as the least likely one kept": the probabilities' int32 bit patterns order as the floats do, so it can
be searched for exactly without a sort. H200, batch 32 (results/h200/top_p_cut.json): the sort won
(0.32 ms at vocabulary 49,152, 0.67 ms at 128,256; the search 0.43/0.83, radix 0.31/1.02).

    python benchmarks/top_p_cut.py [--batch 32] [--vocab 49152 128256]
"""
from __future__ import annotations

import argparse
import json

import common as C
import torch



def by_search(probs: torch.Tensor, bits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """16-way search, 8 passes of 15 masked sums; compiled, each pass is one fused read of [B, V]."""
    lo = torch.zeros_like(top_p, dtype=torch.int64)            # mass(p >= lo) is all of it
    hi = bits.amax(dim=-1).long() + 1                            # mass(p >= hi) is none
    fan = torch.arange(1, 16, device=probs.device)
    for _ in range(8):  # the span (< 2**31) shrinks 16-fold per pass
        step = (hi - lo + 15) // 16
        cuts = lo[:, None] + step[:, None] * fan[None, :]          # [B, 15], increasing
        mass = (probs[:, :, None] * (bits[:, :, None] >= cuts[:, None, :])).sum(dim=1)
        j = ((mass >= top_p[:, None]) & (cuts < hi[:, None])).sum(dim=1)  # a prefix of the cuts
        lo = torch.where(j > 0, lo + step * j, lo)
        hi = torch.minimum(hi, lo + step)
    return lo


def by_radix(probs: torch.Tensor, bits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same cut, a byte at a time: 4 histograms of mass (eager-friendly: no [B, V, 15] temporary;
    on a GPU the histogram's atomics contend, hence the search there)."""
    cut = torch.zeros_like(top_p, dtype=torch.int64)
    above = torch.zeros_like(top_p)                              # mass above the cut's prefix
    for shift in (24, 16, 8, 0):
        inside = (bits.long() >> (shift + 8)) == (cut[:, None] >> (shift + 8))
        digit = (bits.long() >> shift) & 255
        hist = torch.zeros(probs.shape[0], 256, dtype=probs.dtype, device=probs.device)
        hist.scatter_add_(1, digit, torch.where(inside, probs, 0.0))
        tail = hist.flip(-1).cumsum(-1).flip(-1)                 # tail[d]: mass of digits >= d
        d = ((above[:, None] + tail >= top_p[:, None]).sum(dim=1) - 1).clamp(min=0)
        above = above + torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1).gather(1, d[:, None])[:, 0]
        cut = cut | (d << shift)
    return cut


def by_sort(probs: torch.Tensor, bits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    ranked = probs.sort(dim=-1, descending=True).values
    kept = ((ranked.cumsum(dim=-1) - ranked) < top_p[:, None]).sum(dim=-1)
    return ranked.gather(1, (kept - 1)[:, None]).view(torch.int32)[:, 0].long()


def by_search_loop(probs: torch.Tensor, bits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """As _cut_by_search, with the 15 masked sums written as 15 reductions (no [B, V, 15] broadcast)."""
    lo = torch.zeros_like(top_p, dtype=torch.int64)
    hi = bits.amax(dim=-1).long() + 1
    for _ in range(8):
        step = (hi - lo + 15) // 16
        cuts = [lo + step * j for j in range(1, 16)]
        mass = torch.stack([torch.where(bits >= c[:, None], probs, 0.0).sum(dim=-1) for c in cuts], dim=1)
        j = ((mass >= top_p[:, None]) & (torch.stack(cuts, 1) < hi[:, None])).sum(dim=1)
        lo = torch.where(j > 0, lo + step * j, lo)
        hi = torch.minimum(hi, lo + step)
    return lo


VARIANTS = {"sort (sampler)": by_sort, "sort, compiled": by_sort, "16-way search": by_search, "16-way search, 15 reductions": by_search_loop,
            "radix histogram": by_radix}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for V in args.vocab:
        logits = torch.randn(args.batch, V, device=dev) * 3
        top_p = torch.full((args.batch,), 0.9, device=dev)
        probs = torch.softmax(logits, dim=-1)
        bits = probs.view(torch.int32)
        want = (bits >= by_sort(probs, bits, top_p)[:, None]).sum(-1)
        for name, fn in VARIANTS.items():
            f = fn if name == "sort (sampler)" else torch.compile(fn, dynamic=True)
            exact = bool(torch.equal((bits >= f(probs, bits, top_p)[:, None]).sum(-1), want))
            ms = C.cuda_time_ms(lambda: f(probs, bits, top_p), reps=50)
            rows.append(dict(vocab=V, batch=args.batch, variant=name, ms=ms, exact=exact))
            print(rows[-1], flush=True)
    out = C.results_dir() / "top_p_cut.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
