"""Top-p on the GPU: the sampler's sort-free cut against a sort (the usual way) and other sort-free
variants, on [batch, vocab] logits, same run. Every variant must keep exactly the sort's tokens.

    python benchmarks/top_p_cut.py [--batch 32] [--vocab 49152 128256]
"""
from __future__ import annotations

import argparse
import json

import common as C
import torch

from swift_engine.sampling import _cut_by_radix, _cut_by_search


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


VARIANTS = {"sort": by_sort, "search (sampler)": _cut_by_search, "search, 15 reductions": by_search_loop,
            "radix histogram": _cut_by_radix}


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
            f = fn if name == "sort" else torch.compile(fn, dynamic=True)
            exact = bool(torch.equal((bits >= f(probs, bits, top_p)[:, None]).sum(-1), want))
            ms = C.cuda_time_ms(lambda: f(probs, bits, top_p), reps=50)
            rows.append(dict(vocab=V, batch=args.batch, variant=name, ms=ms, exact=exact))
            print(rows[-1], flush=True)
    out = C.results_dir() / "top_p_cut.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
