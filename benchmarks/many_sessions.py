"""(c) Aggregate decode throughput of many sessions batched, against the memory-bandwidth floor.

Every session holds a full S+W cache (default 2048). For B = 1..N sessions decoding together:
  ours         EngineCore steps (the engine as served), tokens/s = B / step time
  ours_device  the bucket's CUDA graph replay alone
  floor        B / ((weight bytes + B * KV bytes) / copy rate)
  hf_eager     HF transformers eager, batch of B with a DynamicCache of S+W tokens (largest B only)
Also: how many sessions fit on this GPU at S+W = 4096, full caches vs short (256-token) ones.

    python benchmarks/many_sessions.py [--shape llama2-7b] [--cache 2048] [--batches 1 2 4 8 16 32]
"""
from __future__ import annotations

import argparse
import time

import common as C
import tensor_parallel as TP
import torch

from swift_engine.engine.cache import ceil_div, page_bytes, running_pages, span_pages
from swift_engine.engine.kv_fp8 import bytes_per_element

S = 4


def sweep(model, L: int, batches: list[int], steps: int, bw: float, kv_cache_dtype: str = "auto", tp: int = 1,
          shape: str = "") -> list[dict]:
    """tp > 1: the engine over tp GPUs (random weights of `shape`; `model` unused), the all-reduce
    time broken out; the floor is one rank's (its share of weights and KV heads)."""
    bmax = max(batches)
    kw = dict(tokens_capacity=bmax * (L + 64), max_batch_tokens=512, max_running=bmax, kv_cache_dtype=kv_cache_dtype)
    core = TP.make_tp_core(shape, tp, S, L - S, **kw) if tp > 1 else C.make_core(model, S, L - S, **kw)
    a, wb = core.model.args, C.weight_bytes(core.model)
    gpu = core.runner.runner.gpu if tp > 1 else core.runner.gpu
    elem = bytes_per_element(kv_cache_dtype, core.model.lm_head.weight.dtype, a.head_dim)
    rows = []
    live = []
    for B in batches:
        while len(live) < B:  # add sessions; each prefills L + 32 tokens, then keeps decoding
            i = len(live)
            live.append(C.submit_generate(core, f"s{i}", C.random_ids(L + 32, a.vocab_size, i), 1_000_000))
        C.step_until(core, lambda: all(r.phase == "decode" for r in live))
        for _ in range(5):
            core.step()
        ms = C.time_decode_steps(core, steps)
        bucket = next(b for b in gpu.buckets if b >= B)
        graph, _ = gpu.graphs[bucket]
        # a graph holding collectives replayed on rank 0 alone would wait for the other ranks forever
        dev = C.cuda_time_ms(graph.replay, reps=10) if tp == 1 else float("nan")
        fl = C.floor_ms(wb, B * C.kv_bytes(a, L, elem), bw)
        row = dict(batch=B, step_ms=ms, tok_s=B / ms * 1e3, device_ms=dev, device_tok_s=B / dev * 1e3,
                   floor_ms=fl, floor_tok_s=B / fl * 1e3, bucket=bucket)
        row["of_floor"] = row["tok_s"] / row["floor_tok_s"]
        row["device_of_floor"] = row["device_tok_s"] / row["floor_tok_s"]
        if tp > 1:
            row["allreduce_ms"] = TP.collective_ms(core, 5)
            row["allreduce_share"] = row["allreduce_ms"] / ms
        rows.append(row)
        C.log("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    for r in live:
        r.aborted = True
    core.step()
    if tp > 1:
        TP.close(core)
    core = live = r = None
    C.free()
    return rows


def hf_batched(model, cfg, L: int, B: int, steps: int) -> dict:
    import transformers

    hf = C.hf_sharing(model, cfg, "sdpa")
    ids = torch.tensor([C.random_ids(L, model.args.vocab_size, 100 + b) for b in range(B)], device="cuda")
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        C.set_attn(hf, "eager")
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.tolist()
            if i >= 2:
                times.append(time.perf_counter() - t)
    times.sort()
    ms = times[len(times) // 2] * 1e3
    del cache, hf
    C.free()
    return dict(batch=B, step_ms=ms, tok_s=B / ms * 1e3)


def capacity(model, L: int, short: int, mbt: int, page_size: int = 16, kv_cache_dtype: str = "auto",
             free_b: int | None = None) -> dict:
    """Sessions whose caches fit in the GPU memory left after weights (page pool), full vs short.
    `free_b`: memory left after the weights (default: measured on this GPU)."""
    a = model.args
    if free_b is None:
        C.free()
        free_b, _ = torch.cuda.mem_get_info()
    usable = free_b - 4 * 2**30  # activations, graphs, allocator slack
    pb = page_bytes((a.num_layers, a.num_kv_heads, a.head_dim), page_size, model.lm_head.weight.dtype, kv_cache_dtype)
    pages = usable // pb
    full = span_pages(S, L - S, page_size)
    small = ceil_div(S, page_size) + ceil_div(short - S, page_size)  # never evicted: window starts a page
    running_reserve = running_pages(S, L - S, page_size, mbt)
    return dict(cache_tokens=L, pool_pages=int(pages), pool_gb=pages * pb / 2**30,
                pages_full_session=full, pages_short_session=small, short_tokens=short,
                resident_full=int(pages // full), resident_short=int(pages // small),
                running_full=int(pages // running_reserve))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--cache", type=int, default=2048)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--fit-batch", action="store_true", help="also decode the most full 4096 sessions that fit")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size: the engine over this many GPUs "
                   "(the sweep only, all-reduce time broken out; results in many_sessions_tp<N>.json)")
    args = p.parse_args()
    bw = C.copy_bandwidth_gbs()
    if args.tp > 1:
        results = dict(copy_gbs=bw, S=S, cache_tokens=args.cache, tp=args.tp, shapes={})
        for name in args.shapes:
            C.log(f"== {name}, tensor_parallel_size {args.tp}")
            results["shapes"][name] = dict(sweep=sweep(None, args.cache, args.batches, args.steps, bw, tp=args.tp, shape=name))
            C.save(f"many_sessions_tp{args.tp}", results)
            print(f"\n{name}, TP={args.tp}, S+W={args.cache}: batch | tok/s | all-reduce ms/step | share | "
                  "of one rank's floor")
            for x in results["shapes"][name]["sweep"]:
                print(f"{x['batch']} | {x['tok_s']:.0f} | {x['allreduce_ms']:.3f} | {x['allreduce_share']:.0%} | "
                      f"{x['of_floor']:.2f}")
        return
    results = dict(copy_gbs=bw, S=S, cache_tokens=args.cache, shapes={})
    for name in args.shapes:
        C.log(f"== {name}")
        model = C.make_model(name)
        r = dict(sweep=sweep(model, args.cache, args.batches, args.steps, bw))
        r["capacity_4096"] = capacity(model, 4096, 256, 512)
        C.log("  capacity", r["capacity_4096"])
        if args.hf_batch:
            try:
                r["hf_eager"] = hf_batched(model, C.SHAPES[name], args.cache, args.hf_batch, 6)
                ours = next(x for x in r["sweep"] if x["batch"] == args.hf_batch)
                r["hf_eager"]["ours_over_hf"] = ours["tok_s"] / r["hf_eager"]["tok_s"]
                C.log("  hf", r["hf_eager"])
            except torch.OutOfMemoryError as exc:
                r["hf_eager"] = dict(error=str(exc)[:200])
                C.free()
        if args.fit_batch:  # last: the HF baseline above needs the memory these caches take
            nfit = min(r["capacity_4096"]["pool_pages"] // 300 - 1, 64)  # make_core's pages per session
            r["fit_4096"] = sweep(model, 4096, [nfit], 10, bw)
        results["shapes"][name] = r
        del model
        C.free()
        C.save("many_sessions", results)
    for name, r in results["shapes"].items():
        print(f"\n{name}, S+W={args.cache}: batch | tok/s | GPU-only tok/s | floor tok/s | of floor | "
              "GPU-only of floor")
        for x in r["sweep"]:
            print(f"{x['batch']} | {x['tok_s']:.0f} | {x['device_tok_s']:.0f} | {x['floor_tok_s']:.0f} | "
                  f"{x['of_floor']:.2f} | {x['device_of_floor']:.2f}")
        for x in r.get("fit_4096", []):
            print(f"S+W=4096, {x['batch']} sessions (most that fit): {x['tok_s']:.0f} tok/s, "
                  f"GPU-only {x['device_tok_s']:.0f}, floor {x['floor_tok_s']:.0f}")
        if "hf_eager" in r:
            print("HF eager:", r["hf_eager"])
        print("capacity at 4096:", r["capacity_4096"])


if __name__ == "__main__":
    main()
