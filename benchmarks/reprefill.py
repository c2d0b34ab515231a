"""(d) Re-prefill of a full S+W cache (failover / evicted-session rebuild) and TTFT of a 512-token turn.

  rebuild_ms   EngineCore: restore(snapshot of S+W ids) until the rebuild request completes,
               for several per-step token budgets (max_batch_tokens = prefill chunk)
  hf_sdpa_ms   HF transformers dense SDPA forward of the same number of tokens (a dense prefill,
               for scale; logits of the last token only)
  ttft_ms      a generate turn of 512 new tokens on that full session: submit -> first token

    python benchmarks/reprefill.py [--shapes llama2-7b llama3-8b] [--caches 2048 4096]
"""
from __future__ import annotations

import argparse
import time

import common as C
import torch

from swift_engine.engine.request import Request
from swift_engine.outputs import SessionSnapshot

S = 4


def rebuild_once(core, ids: list[int], sid: str = "r") -> float:
    snap = SessionSnapshot(session_id=sid, sink_ids=ids[:S], tail_ids=ids[S:], tokens_seen=100 * len(ids))
    req = Request(f"rb-{time.monotonic_ns()}", sid, "reprefill", [], emit=lambda ev: None)
    torch.cuda.synchronize()
    t = time.perf_counter()
    core.restore(req, snap)
    C.step_until(core, lambda: req.phase == "done")
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def ttft_once(core, prompt: list[int], sid: str = "r") -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    req = C.submit_generate(core, sid, prompt, max_tokens=1)
    C.step_until(core, lambda: req.phase == "done")
    return (time.perf_counter() - t) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--caches", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--budgets", nargs="+", type=int, default=[512, 2048, 4096])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    results = dict(S=S, shapes={})
    for name in args.shapes:
        C.log(f"== {name}")
        model = C.make_model(name)
        a = model.args
        flops_tok = 2 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
        rows, dense = [], {}
        hf = None
        for L in args.caches:
            ids = C.random_ids(L, a.vocab_size, L)
            for mbt in args.budgets:
                core = C.make_core(model, S, L - S, tokens_capacity=2 * L + 1024, max_batch_tokens=mbt,
                                   max_running=2)
                rebuild_once(core, ids)  # compile / warm
                times = sorted(rebuild_once(core, ids) for _ in range(args.reps))
                ttft = sorted(ttft_once(core, C.random_ids(512, a.vocab_size, 3 + i)) for i in range(2))
                row = dict(cache_tokens=L, max_batch_tokens=mbt, rebuild_ms=times[len(times) // 2],
                           rebuild_min_ms=times[0], ttft_512_ms=ttft[0],
                           rebuild_tflops=flops_tok * L / (times[len(times) // 2] * 1e-3) / 1e12)
                del core
                C.free()
                if hf is None:
                    hf = C.hf_sharing(model, C.SHAPES[name], "sdpa")
                if L not in dense:
                    dense[L] = C.dense_forward_ms(hf, C.random_ids(L, a.vocab_size, 5), 5, 2)
                row["hf_sdpa_dense_ms"] = dense[L]
                rows.append(row)
                C.log("  ", {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        results["shapes"][name] = rows
        del hf, model
        C.free()
        C.save("reprefill", results)
    for name, rows in results["shapes"].items():
        print(f"\n{name}: S+W | chunk | rebuild ms | TFLOP/s | TTFT(512) ms | HF dense SDPA ms")
        for r in rows:
            print(f"{r['cache_tokens']} | {r['max_batch_tokens']} | {r['rebuild_ms']:.1f} | {r['rebuild_tflops']:.0f} | "
                  f"{r['ttft_512_ms']:.1f} | {r['hf_sdpa_dense_ms']:.1f}")


if __name__ == "__main__":
    main()
