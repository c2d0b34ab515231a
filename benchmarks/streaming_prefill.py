"""(e) Streaming prefill of a long input through an S+W = 4096 cache vs a dense SDPA prefill.

  ours     EngineCore: one generate turn whose prompt is N tokens (fed in chunks of
           max_batch_tokens, evicting as it goes), submit -> first token
  dense    HF transformers SDPA forward over all N tokens (logits of the last one), while it fits

Ours is linear in N (each token attends to at most S+W keys); dense is quadratic.

    python benchmarks/streaming_prefill.py [--shape llama2-7b] [--lengths 4096 ... 131072]
"""
from __future__ import annotations

import argparse
import time

import common as C
import torch

S, W = 4, 4092


def ours_ms(core, ids, sid) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    req = C.submit_generate(core, sid, ids, max_tokens=1)
    C.step_until(core, lambda: req.phase == "done")
    ms = (time.perf_counter() - t) * 1e3
    core.drop(sid)
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--dense-max", type=int, default=65536)
    args = p.parse_args()
    model = C.make_model(args.shape)
    a = model.args
    core = C.make_core(model, S, W, tokens_capacity=2 * (S + W) + args.chunk, max_batch_tokens=args.chunk,
                       max_running=2)
    hf = C.hf_sharing(model, C.SHAPES[args.shape], "sdpa")
    ours_ms(core, C.random_ids(2 * args.chunk, a.vocab_size, 1), "warm")
    rows = []
    for n in args.lengths:
        ids = C.random_ids(n, a.vocab_size, n)
        row = dict(tokens=n, ours_ms=ours_ms(core, ids, f"s{n}"))
        row["ours_tok_s"] = n / row["ours_ms"] * 1e3
        if n <= args.dense_max:
            try:
                row["dense_sdpa_ms"] = C.dense_forward_ms(hf, ids, 2, 1)
                row["dense_over_ours"] = row["dense_sdpa_ms"] / row["ours_ms"]
            except torch.OutOfMemoryError:
                row["dense_sdpa_ms"] = None
                C.free()
        rows.append(row)
        C.log("  ", row)
    C.save("streaming_prefill", dict(shape=args.shape, S=S, W=W, chunk=args.chunk, rows=rows))
    print(f"\n{args.shape}, S+W={S + W}, chunk {args.chunk}: tokens | ours ms | ours tok/s | dense SDPA ms | dense/ours")
    for r in rows:
        d = r.get("dense_sdpa_ms")
        print(f"{r['tokens']} | {r['ours_ms']:.0f} | {r['ours_tok_s']:.0f} | {'-' if d is None else f'{d:.0f}'} | "
              f"{r.get('dense_over_ours', float('nan')):.2f}")


if __name__ == "__main__":
    main()
