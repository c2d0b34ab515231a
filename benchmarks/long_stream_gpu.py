"""(b) One session streamed far (default 1M tokens) on the GPU path: throughput, flat decode latency,
and numerical drift.

A small Llama shape (~0.2B) so a million tokens fit in a benchmark's time. The stream is fed
in prefill chunks (evicting token by token inside each chunk), with bursts of single-token
decode steps (CUDA graphs) at checkpoints. The same stream runs in lockstep through a float32
copy of the model (same weights, Triton path in float32, which the GPU tests pin to the
CPU reference at 1e-4); drift = relative error of the bf16 logits against it, per chunk.
No drift means the error at 1M tokens is the error at 4K: positions stay < S+W, nothing
accumulates.

    python benchmarks/long_stream_gpu.py [--tokens 1048576] [--window 1020]
"""
from __future__ import annotations

import argparse
import copy
import time

import common as C
import torch

from swift_engine.config import EngineConfig
from swift_engine.engine.cache import PageTable, SinkWindowCache
from swift_engine.engine.model_runner import ModelRunner


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Lane:
    def __init__(self, model, S, W, chunk, dtype):
        a = model.args
        self.cache = SinkWindowCache(S, W, 16, (S + W + chunk) // 16 + 64,
                                     (a.num_layers, a.num_kv_heads, a.head_dim), "cuda", dtype)
        self.runner = ModelRunner(model, self.cache, EngineConfig(max_batch_tokens=chunk))
        self.table = PageTable()

    def warm(self, chunk: int, vocab: int) -> None:
        """Compile the kernels and capture the decode graph on a throwaway session."""
        main, self.table = self.table, PageTable()
        self.feed(list(range(3, 3 + chunk)))
        for t in range(3):
            self.feed([5 + t])
        self.cache.release(self.table)
        self.table = main

    def feed(self, ids: list[int]) -> torch.Tensor:
        plan = self.cache.append(self.table, len(ids))
        out = self.runner.run([ids], [plan], [[len(ids) - 1]])[0]
        self.cache.evict(self.table)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--decode-burst", type=int, default=32)
    args = p.parse_args()
    S, W = args.sinks, args.window
    m16 = C.make_model("small-0.2b")
    m32 = copy.deepcopy(m16).float()
    m32.tie_weights()
    fast, ref = Lane(m16, S, W, args.chunk, torch.bfloat16), Lane(m32, S, W, args.chunk, torch.float32)
    vocab = m16.args.vocab_size
    fast.warm(args.chunk, vocab)
    ref.warm(args.chunk, vocab)
    gen = torch.Generator().manual_seed(0)
    checkpoints = {1 << k for k in range(12, 21)} | {args.tokens}
    seen, drift, decode, prefill_s = 0, [], [], 0.0
    next_cp = sorted(c for c in checkpoints if c > 0)
    while seen < args.tokens:
        ids = torch.randint(3, vocab, (min(args.chunk, args.tokens - seen),), generator=gen).tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        lf = fast.feed(ids)
        torch.cuda.synchronize()
        prefill_s += time.perf_counter() - t
        lr = ref.feed(ids)
        seen += len(ids)
        drift.append((seen, rel(lf, lr)))
        if next_cp and seen >= next_cp[0]:
            while next_cp and seen >= next_cp[0]:
                next_cp.pop(0)
            tok, times, errs = int(lf.argmax()), [], []
            for _ in range(args.decode_burst):
                torch.cuda.synchronize()
                t = time.perf_counter()
                lf = fast.feed([tok])
                nxt = int(lf.argmax())  # sync, as the engine's sampler does
                times.append((time.perf_counter() - t) * 1e3)
                lr = ref.feed([tok])
                errs.append(rel(lf, lr))
                tok = nxt
            seen += args.decode_burst
            times.sort()
            decode.append(dict(tokens_seen=seen, decode_ms_median=times[len(times) // 2],
                               decode_rel_err_max=max(errs), cache_tokens=fast.table.tokens,
                               pages=fast.table.pages))
            C.log("  ", decode[-1], f"chunk drift {drift[-1][1]:.2e}")
        assert fast.table.tokens <= S + W and fast.table.pages <= fast.cache.steady_pages
    errs = [e for _, e in drift]
    first = errs[: max(1, len(errs) // 10)]
    last = errs[-max(1, len(errs) // 10):]
    res = dict(shape="small-0.2b", S=S, W=W, chunk=args.chunk, tokens=seen,
               prefill_tok_s=(seen - args.decode_burst * len(decode)) / prefill_s,
               drift_first_decile_mean=sum(first) / len(first), drift_last_decile_mean=sum(last) / len(last),
               drift_max=max(errs), decode=decode, drift_series=drift[:: max(1, len(drift) // 200)],
               graph_stats=fast.runner.gpu.stats)
    C.save("long_stream_gpu", res)
    print(f"\nstreamed {seen} tokens, S+W={S + W}, bf16 prefill {res['prefill_tok_s']:.0f} tok/s")
    print(f"drift (rel err vs fp32 lane): first 10% {res['drift_first_decile_mean']:.2e}, last 10% "
          f"{res['drift_last_decile_mean']:.2e}, max {res['drift_max']:.2e}")
    print("tokens seen | decode ms | decode rel err")
    for d in decode:
        print(f"{d['tokens_seen']} | {d['decode_ms_median']:.3f} | {d['decode_rel_err_max']:.2e}")


if __name__ == "__main__":
    main()
