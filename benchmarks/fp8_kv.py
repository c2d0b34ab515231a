"""FP8 KV cache (kv_cache_dtype: fp8) against the model's dtype: sessions resident and batch tokens/s.

  capacity  full sessions at S+W = 4096 the page pool holds beside the weights (many_sessions.capacity:
            the engine's page sizing, fp8 scales counted), auto vs fp8
  speed     batch 32 and 64 at S+W = 2048 (many_sessions.sweep: engine steps, the CUDA graph alone, and
            the bandwidth floor counting fp8 bytes), auto vs fp8
Without CUDA, --gpu-memory-gb G gives the capacity arithmetic alone for a GPU of G GiB.

    python benchmarks/fp8_kv.py                       # GPU: benchmarks/results/<gpu>/fp8_kv.{json,png}
    python benchmarks/fp8_kv.py --gpu-memory-gb 140   # no GPU: capacity arithmetic, results/cpu/
"""
from __future__ import annotations

import argparse

import common as C
import many_sessions as M
import matplotlib
import torch

from swift_engine.models.families import ModelArgs
from swift_engine.models.random_init import empty_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KV = ("auto", "fp8")


def run_shape(name: str, args, bw: float | None) -> dict:
    cuda = bw is not None
    model = C.make_model(name) if cuda else empty_model(ModelArgs.from_hf_config(C.SHAPES[name]), "meta",
                                                         torch.bfloat16)
    free_b = None if cuda else int(args.gpu_memory_gb * 2**30) - C.weight_bytes(model)
    r = dict(capacity={kv: M.capacity(model, 4096, 256, 512, kv_cache_dtype=kv, free_b=free_b) for kv in KV})
    r["resident_full_ratio"] = r["capacity"]["fp8"]["resident_full"] / r["capacity"]["auto"]["resident_full"]
    C.log("  capacity", {kv: c["resident_full"] for kv, c in r["capacity"].items()}, r["resident_full_ratio"])
    if cuda:
        r["speed"] = {kv: M.sweep(model, args.cache, args.batches, args.steps, bw, kv) for kv in KV}
        for key in ("tok_s", "device_tok_s"):  # fp8 over auto, per batch size
            r[f"{key}_ratio"] = {x["batch"]: y[key] / x[key] for x, y in zip(*r["speed"].values())}
    del model
    C.free()
    return r


def plot(results: dict, path) -> None:
    shapes = results["shapes"]
    speed = all("speed" in r for r in shapes.values())
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(12 if speed else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for j, kv in enumerate(KV):
        xs = [i + 0.4 * j for i in range(len(shapes))]
        ys = [r["capacity"][kv]["resident_full"] for r in shapes.values()]
        ax.bar(xs, ys, width=0.4, label=f"kv_cache_dtype {kv}")
        for x, y in zip(xs, ys):
            ax.annotate(str(y), (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([i + 0.2 for i in range(len(shapes))], list(shapes))
    ax.set_ylabel("full sessions resident (S+W = 4096)")
    ax.set_title(f"capacity, {results['memory']}")
    ax.legend(fontsize=8)
    if speed:
        ax = axes[0][1]
        for name, r in shapes.items():
            for kv, style in zip(KV, ("o-", "^-")):
                rows = r["speed"][kv]
                ax.plot([x["batch"] for x in rows], [x["tok_s"] for x in rows], style, label=f"{name}, {kv}")
        ax.set_xlabel("sessions decoding together")
        ax.set_ylabel("tokens / s (engine)")
        ax.set_title(f"decode throughput, S+W = {results['cache_tokens']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--cache", type=int, default=2048, help="S+W of the speed runs")
    p.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gpu-memory-gb", type=float, default=140.0, help="without CUDA: the GPU's memory (GiB)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    bw = C.copy_bandwidth_gbs() if cuda else None
    memory = "measured free memory" if cuda else f"arithmetic for {args.gpu_memory_gb:g} GiB"
    results = dict(copy_gbs=bw, S=M.S, cache_tokens=args.cache, memory=memory, shapes={})
    for name in args.shapes:
        C.log(f"== {name}")
        results["shapes"][name] = run_shape(name, args, bw)
    C.save("fp8_kv", results)
    plot(results, C.results_dir() / "fp8_kv.png")
    print("\nshape | resident full @4096 auto | fp8 | ratio" + (" | batch: tok/s auto -> fp8 (ratio)" if cuda else ""))
    for name, r in results["shapes"].items():
        c = r["capacity"]
        line = f"{name} | {c['auto']['resident_full']} | {c['fp8']['resident_full']} | {r['resident_full_ratio']:.2f}"
        if cuda:
            line += " | " + ", ".join(f"{x['batch']}: {x['tok_s']:.0f} -> {y['tok_s']:.0f} "
                                      f"({y['tok_s'] / x['tok_s']:.2f}x)" for x, y in zip(*r["speed"].values()))
        print(line)


if __name__ == "__main__":
    main()
