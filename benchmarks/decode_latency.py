"""(a) Per-token decode latency, batch 1, random bf16 weights (Figure-10 style).

For each cache size S+W (256 ... 4096), in one run:
  ours            EngineCore steps (Triton + CUDA graphs): the engine as served
  ours_eager      no CUDA graphs (Triton kernels launched eagerly)
  ours_device     the decode graph's replay alone (CUDA events): the GPU's share
  hf_eager        HF transformers, eager attention, DynamicCache holding that many tokens
  recompute       sliding window with recompute: dense (SDPA) forward over the last S+W tokens
  floor           (weight bytes + KV bytes) / device copy rate measured in this run

    python benchmarks/decode_latency.py [--shapes llama2-7b llama3-8b] [--tune]
    python benchmarks/decode_latency.py --tp 2    # the engine over 2 GPUs, all-reduce time broken out
"""
from __future__ import annotations

import argparse
import statistics
import time

import common as C
import tensor_parallel as TP
import torch

from swift_engine.engine import gpu_runner as gr
from swift_engine.layers import triton_attention as ta
from swift_engine.layers import triton_ops as ops
from swift_engine.layers.rotary import RotaryTable, inv_frequencies

SIZES = [256, 512, 1024, 2048, 4096]
S = 4


def ours(model, L: int, steps: int, graphs: bool = True):
    core = C.make_core(model, S, L - S, tokens_capacity=2 * L, max_batch_tokens=2048, max_running=4,
                       cuda_graphs=graphs)
    return core, decode_ms(core, L, steps)


def decode_ms(core, L: int, steps: int) -> float:
    """ms per decode step of one session whose cache holds L tokens (after L + 64 prefilled)."""
    req = C.submit_generate(core, "s", C.random_ids(L + 64, core.vocab_size, L), steps + 20)
    C.step_until(core, lambda: req.phase == "decode")
    for _ in range(8):
        core.step()
    ms = C.time_decode_steps(core, steps)
    assert req.phase == "decode" and core.sessions["s"].table.tokens <= L
    return ms


def run_shape_tp(name: str, args) -> dict:
    """--tp N: our engine over N GPUs at each cache size, the all-reduce time broken out."""
    C.log(f"== {name}, tensor_parallel_size {args.tp}")
    res = dict(tp=args.tp, sizes={})
    for L in args.sizes:
        core = TP.make_tp_core(name, args.tp, S, L - S, tokens_capacity=2 * L, max_batch_tokens=2048,
                               max_running=4)
        ms = decode_ms(core, L, args.steps)
        comm = TP.collective_ms(core, max(10, args.steps // 4))
        res["sizes"][L] = row = dict(cache_tokens=L, ours_ms=ms, tok_s=1e3 / ms, allreduce_ms=comm,
                                     allreduce_share=comm / ms, graph_stats=dict(core.runner.runner.gpu.stats))
        C.log(f"  L={L}: {ms:.3f} ms/token, all-reduce {comm:.3f} ms ({comm / ms:.0%})")
        TP.close(core)
    return res


def device_ms(core) -> float:
    graph, _ = core.runner.gpu.graphs[1]
    return C.cuda_time_ms(graph.replay, reps=30)


def hf_eager_ms(hf, L: int, steps: int, vocab: int) -> float:
    import transformers

    ids = torch.tensor([C.random_ids(L, vocab, 7)], device="cuda")
    cache = transformers.DynamicCache(config=hf.config)
    C.set_attn(hf, "sdpa")  # fill the cache fast; decode below runs eager attention
    with torch.no_grad():
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        C.set_attn(hf, "eager")
        tok = int(out.logits[0, -1].argmax())
        times = []
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = hf(input_ids=torch.tensor([[tok]], device="cuda"), past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
    del cache
    return statistics.median(times)


def run_shape(name: str, args, bw: float) -> dict:
    C.log(f"== {name}")
    model = C.make_model(name)
    a = model.args
    wb = C.weight_bytes(model)
    res = dict(weight_bytes=wb, sizes={})
    hf = None
    for L in args.sizes:
        row = dict(cache_tokens=L, kv_bytes=C.kv_bytes(a, L))
        row["floor_ms"] = C.floor_ms(wb, row["kv_bytes"], bw)
        core, row["ours_ms"] = ours(model, L, args.steps)
        row["ours_device_ms"] = device_ms(core)
        if L == max(args.sizes):
            res["profile"] = lab_profile(core, f"{name} L={L} B=1")
            if args.tune:
                res["attention_configs"] = lab_decode_attention(core)
        row["graph_stats"] = dict(core.runner.gpu.stats)
        del core
        C.free()
        _, row["ours_eager_ms"] = ours(model, L, max(10, args.steps // 4), graphs=False)
        C.free()
        if hf is None:  # after the first engine fused the weights: shares the fused views
            hf = C.hf_sharing(model, C.shape_config(name), "eager")
        if not args.no_hf:
            row["hf_eager_ms"] = hf_eager_ms(hf, L, args.hf_steps, a.vocab_size)
            C.free()
            row["recompute_ms"] = C.dense_forward_ms(hf, C.random_ids(L, a.vocab_size, 9), args.recompute_reps, 2)
            C.free()
            row["hf_over_ours"] = row["hf_eager_ms"] / row["ours_ms"]
            row["recompute_over_ours"] = row["recompute_ms"] / row["ours_ms"]
        row["ours_over_floor"] = row["ours_ms"] / row["floor_ms"]
        row["device_over_floor"] = row["ours_device_ms"] / row["floor_ms"]
        res["sizes"][L] = row
        C.log(f"  L={L}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
    del hf, model
    C.free()
    return res


TUNE = [dict(block_n=32, elementwise=False), dict(block_n=32, elementwise=True), dict(block_n=64, elementwise=True),
        dict(block_n=16, elementwise=True), dict(block_n=32, elementwise=True, num_stages=3),
        dict(block_n=32), dict(block_n=64), dict(block_n=32, rope_delta=True), dict(block_n=64, rope_delta=True),
        dict(block_n=32, num_warps=8), dict(block_n=64, num_warps=8), dict(block_n=32, num_stages=3),
        dict(block_n=64, num_stages=3), dict(block_n=16), dict(block_n=128, num_warps=8),
        dict(programs_per_sm=2), dict(programs_per_sm=8), dict(programs_per_sm=16),
        dict(block_n=64, programs_per_sm=8, num_warps=8)]


def table(results: dict) -> str:
    lines = []
    for name, r in results["shapes"].items():
        lines.append(f"\n{name}  (copy rate {results['copy_gbs']:.0f} GB/s; ms per token, batch 1)")
        lines.append("cache | ours | ours(no graphs) | GPU only | HF eager | recompute | floor "
                     "| ours/floor | HF/ours | recompute/ours")
        for L, x in r["sizes"].items():
            lines.append(f"{L} | {x['ours_ms']:.2f} | {x['ours_eager_ms']:.2f} | "
                         f"{x['ours_device_ms']:.2f} | {x.get('hf_eager_ms', float('nan')):.1f} | "
                         f"{x.get('recompute_ms', float('nan')):.1f} | {x['floor_ms']:.2f} | "
                         f"{x['ours_over_floor']:.2f} | {x.get('hf_over_ours', float('nan')):.1f} | "
                         f"{x.get('recompute_over_ours', float('nan')):.1f}")
    return "\n".join(lines)


# ---- kernel lab: in-graph timings of kernel variants, a per-kernel profile, host-overhead profile ----
def graph_ms(fn, reps: int = 20) -> float:
    """Median time of fn captured once in a CUDA graph (launch overhead excluded)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return C.cuda_time_ms(g.replay, reps=reps)


def lab_gemv(model) -> list[dict]:
    a = model.args
    H, I = a.hidden_size, a.intermediate_size
    shapes = {"qkv": ((a.num_heads + 2 * a.num_kv_heads) * a.head_dim, H), "o": (H, H),
              "gate_up": (2 * I, H), "down": (H, I)}
    variants = [None, dict(), dict(block_k=128), dict(block_k=512, num_stages=3), dict(block_n=32),
                dict(block_n=64), dict(num_warps=8), dict(block_k=128, num_stages=6), dict(block_n=16, block_k=512)]
    rows = []
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0]).float()
            for v in variants:
                if v is None:
                    fn = lambda: [torch.nn.functional.linear(x, w) for w in ws]
                    label = "cublas"
                else:
                    got = ops.gemv(x, ws[0], **v).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    fn = lambda v=v: [ops.gemv(x, w, **v) for w in ws]
                    label = str(v)
                try:
                    ms = graph_ms(fn) / len(ws)
                    rows.append(dict(shape=name, m=m, variant=label, us=ms * 1e3, gbs=n * k * 2 / (ms * 1e-3) / 1e9,
                                     rel_err=None if v is None else err))
                except Exception as exc:
                    rows.append(dict(shape=name, m=m, variant=label, error=repr(exc)[:200]))
                C.log("  gemv", rows[-1])
        ws = None
        C.free()
    return rows


def lab_decode_attention(core, batches=(1,)) -> list[dict]:
    gpu = core.runner.gpu
    a = gpu.a
    meta, bt = gpu.dev[:1, gr.META_COL:gr.PAGES_COL], gpu.dev[:1, gr.PAGES_COL:]
    n_vis = int(meta[0, 0])
    q = torch.randn(1, a.num_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, a.num_kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    kvb = C.kv_bytes(a, n_vis)
    rows = []
    for cfg in TUNE:
        params = ta.DecodeParams(1, a.num_kv_heads, gpu.max_keys, gpu.sms, **cfg)

        def all_layers():
            for layer in range(a.num_layers):
                ta.decode_attention(q, k, v, gpu.cache.k[layer], gpu.cache.v[layer], bt, meta, gpu.rope, out,
                                    params, gpu.cache.P)
        try:
            ms = graph_ms(all_layers)
            rows.append(dict(cfg=cfg, splits=params.num_splits, ms=ms, gbs=kvb / (ms * 1e-3) / 1e9))
        except Exception as exc:
            rows.append(dict(cfg=cfg, error=repr(exc)[:300]))
        C.log("  attention (graph)", rows[-1])
    return rows


def lab_prefill(model) -> list[dict]:
    """Prefill attention kernel alone, per config: a rebuild chunk (C=4096, empty window) and a
    streaming chunk (C=512 after a full window of 4092)."""
    a = model.args
    S, W, P = 4, 4092, 16
    pages = (S + W + 4096) // P + 8
    kc = torch.randn(pages * P, a.num_kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    rope = RotaryTable(inv_frequencies(a.head_dim, a.rope_theta, None), S + W + 4097, "cuda", torch.float32)
    rows = []
    for C_, old in ((4096, 0), (512, W)):
        ns = S
        new_sinks = S if old == 0 else 0
        bt = torch.arange(pages, dtype=torch.int32, device="cuda")[None].flip(1).contiguous()  # pages reversed
        seq = torch.tensor([[0, C_, ns, new_sinks, old, 1, 0, 0]], dtype=torch.int32, device="cuda")
        q = torch.randn(C_, a.num_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        # visible pairs: sinks + min(u+1, W) window keys per query
        pairs = sum(ns + min(old + j - new_sinks + 1, W) if j >= new_sinks else j + 1 for j in range(C_))
        flops = 4 * pairs * a.head_dim * a.num_heads
        for cfg in PREFILL_TUNE:
            bm = cfg.get("block_m", 64)
            qb = torch.tensor([(0, j0) for j0 in range(0, C_, bm)], dtype=torch.int32, device="cuda")
            fn = lambda: ta.prefill_attention(q, kc, vc, bt, seq, qb, qb.shape[0], rope, out, W, P, **cfg)
            try:
                ms = C.cuda_time_ms(fn, reps=10)
                rows.append(dict(chunk=C_, old_window=old, cfg=cfg, ms_per_layer=ms, tflops=flops / (ms * 1e-3) / 1e12,
                                 ms_all_layers=ms * a.num_layers))
            except Exception as exc:
                rows.append(dict(chunk=C_, cfg=cfg, error=repr(exc)[:300]))
            C.log("  prefill", rows[-1])
    kc = vc = None
    C.free()
    return rows


PREFILL_TUNE = [dict(), dict(block_m=128, block_n=64, num_warps=8), dict(block_m=128, block_n=32, num_warps=4),
                dict(block_m=64, block_n=32), dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
                dict(block_m=64, block_n=128, num_warps=8), dict(block_m=128, block_n=128, num_warps=8)]


def lab_profile(core, label: str) -> dict:
    """Kernels of one decode graph replay (CUPTI), summed by name, vs the replay's wall time."""
    from torch.profiler import ProfilerActivity, profile

    bucket = min(core.runner.gpu.graphs)
    graph, _ = core.runner.gpu.graphs[bucket]
    wall = C.cuda_time_ms(graph.replay, reps=20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    by = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            d = by.setdefault(e.name[:60], [0, 0.0])
            d[0] += 1
            d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in by.values()) / 5 / 1e3
    top = sorted(((k, v[0] // 5, v[1] / 5 / 1e3) for k, v in by.items()), key=lambda x: -x[2])[:14]
    res = dict(label=label, replay_ms=wall, kernel_sum_ms=total, kernels_per_step=sum(v[0] for v in by.values()) // 5,
               top=[dict(name=n, count=c, ms=m) for n, c, m in top])
    C.log("  profile", {k: v for k, v in res.items() if k != "top"})
    for t in res["top"]:
        C.log("     ", t)
    return res


def lab_host(core, steps: int = 30) -> list:
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        core.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    C.log(s.getvalue()[-3500:])
    st = pstats.Stats(pr)
    return sorted(((f"{k[0].split('/')[-1]}:{k[2]}", v[2] / steps * 1e3, v[3] / steps * 1e3)
                   for k, v in st.stats.items()), key=lambda x: -x[1])[:20]


def lab(args) -> dict:
    out = {}
    model = C.make_model(args.shapes[0])
    out["prefill"] = lab_prefill(model)
    C.save("lab", out)
    for gemv in (True, False):
        for L, B in ((4096, 1), (256, 1), (2048, 32)):
            core = C.make_core(model, S, L - S, tokens_capacity=B * (L + 64), max_batch_tokens=512, max_running=B,
                               triton_gemv=gemv)
            reqs = [C.submit_generate(core, f"s{i}", C.random_ids(L + 32, model.args.vocab_size, i), 10**6)
                    for i in range(B)]
            C.step_until(core, lambda: all(r.phase == "decode" for r in reqs))
            for _ in range(5):
                core.step()
            key = f"gemv={gemv} L={L} B={B}"
            step = C.time_decode_steps(core, 20)
            out[key] = dict(step_ms=step, profile=lab_profile(core, key))
            C.log(key, "engine step ms", step)
            if not gemv and L == 4096:
                out["attention_graph"] = lab_decode_attention(core)
            if gemv and L in (256, 2048):
                out[key]["host"] = lab_host(core)
            for r in reqs:
                r.aborted = True
            core.step()
            core = reqs = None
            C.free()
            C.save("lab", out)
    out["gemv"] = lab_gemv(model)
    C.save("lab", out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"],
                   help="benchmark shapes (random weights) or real models by name or path")
    p.add_argument("--save-as", default="decode_latency", help="results file name (JSON, TXT)")
    p.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--hf-steps", type=int, default=12)
    p.add_argument("--recompute-reps", type=int, default=6)
    p.add_argument("--tune", action="store_true", help="time decode-kernel configs at the largest size")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--lab", action="store_true", help="kernel lab: in-graph kernel variants, profiles")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size: the engine over this many GPUs "
                   "(ours only, all-reduce time broken out; results in <save-as>_tp<N>.json)")
    args = p.parse_args()
    if args.lab:
        lab(args)
        return
    if args.tp > 1:
        results = dict(S=S, tp=args.tp, shapes={name: run_shape_tp(name, args) for name in args.shapes})
        C.save(f"{args.save_as}_tp{args.tp}", results)
        for name, r in results["shapes"].items():
            print(f"\n{name}, TP={args.tp}: cache | ms/token | tok/s | all-reduce ms | all-reduce share")
            for L, x in r["sizes"].items():
                print(f"{L} | {x['ours_ms']:.2f} | {x['tok_s']:.0f} | {x['allreduce_ms']:.3f} | "
                      f"{x['allreduce_share']:.0%}")
        return
    bw = C.copy_bandwidth_gbs()
    C.log(f"copy rate {bw:.0f} GB/s")
    results = dict(copy_gbs=bw, S=S, shapes={})
    for name in args.shapes:
        results["shapes"][name] = run_shape(name, args, bw)
        C.save(args.save_as, results)
    txt = table(results)
    print(txt)
    (C.results_dir() / f"{args.save_as}.txt").write_text(txt + "\n")


if __name__ == "__main__":
    main()
