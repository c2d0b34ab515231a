"""Plots of the GPU benchmark results: benchmarks/results/<gpu>/*.json -> *.png.

    python benchmarks/plot.py [results_dir]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def finish(ax, xlabel: str, ylabel: str, title: str, log: bool = False) -> None:
    """Axis labels, grid and legend shared by every plot; `log`: log-log axes (x base 2)."""
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both" if log else "major", alpha=0.3)
    ax.legend(fontsize=8)


def load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def decode_latency(d: Path, r: dict) -> None:
    shapes = r["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], shapes.items()):
        xs = sorted(int(k) for k in s["sizes"])
        row = lambda key: [s["sizes"][str(x)].get(key) if str(x) in s["sizes"] else s["sizes"][x].get(key)
                           for x in xs]
        for key, label, style in [("hf_eager_ms", "HF transformers eager (StreamingLLM's runtime)", "o-"),
                                  ("recompute_ms", "sliding window with recompute", "s-"),
                                  ("ours_ms", "swiftserve (engine step)", "^-"),
                                  ("ours_device_ms", "swiftserve (GPU only)", "v--"),
                                  ("floor_ms", "memory-bandwidth floor", "k:")]:
            ys = row(key)
            if any(y is not None for y in ys):
                ax.plot(xs, ys, style, label=label)
        finish(ax, "cache tokens (S + W)", "ms per token, batch 1", f"{name}, bf16, {r['env'].get('gpu', '')}",
               log=True)
        ax.set_xticks(xs, [str(x) for x in xs])
    fig.tight_layout()
    fig.savefig(d / "decode_latency.png", dpi=120)


def many_sessions(d: Path, r: dict) -> None:
    shapes = r["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], shapes.items()):
        b = [x["batch"] for x in s["sweep"]]
        ax.plot(b, [x["tok_s"] for x in s["sweep"]], "^-", label="swiftserve (engine)")
        ax.plot(b, [x["device_tok_s"] for x in s["sweep"]], "v--", label="swiftserve (GPU only)")
        ax.plot(b, [x["floor_tok_s"] for x in s["sweep"]], "k:", label="memory-bandwidth floor")
        hf = s.get("hf_eager")
        if hf and "tok_s" in hf:
            ax.plot([hf["batch"]], [hf["tok_s"]], "o", label="HF transformers eager")
        finish(ax, "sessions decoding together", "tokens / s", f"{name}, S+W={r['cache_tokens']}, bf16")
    fig.tight_layout()
    fig.savefig(d / "many_sessions.png", dpi=120)


def streaming_prefill(d: Path, r: dict) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = r["rows"]
    ax.plot([x["tokens"] for x in rows], [x["ours_ms"] for x in rows], "^-", label=f"swiftserve, S+W={r['S'] + r['W']}")
    dn = [x for x in rows if x.get("dense_sdpa_ms")]
    ax.plot([x["tokens"] for x in dn], [x["dense_sdpa_ms"] for x in dn], "o-", label="dense SDPA prefill (HF)")
    finish(ax, "input tokens", "ms to first token", f"{r['shape']}, bf16", log=True)
    fig.tight_layout()
    fig.savefig(d / "streaming_prefill.png", dpi=120)


def long_stream(d: Path, r: dict) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys = zip(*r["drift_series"])
    a1.plot(xs, ys, ".", ms=3)
    a1.set_xscale("log")
    a1.set_xlabel("tokens streamed")
    a1.set_ylabel("rel. error of bf16 logits vs fp32 lane")
    a1.set_title(f"drift, {r['shape']}, S+W={r['S'] + r['W']}")
    a1.grid(True, which="both", alpha=0.3)
    dec = r["decode"]
    a2.plot([x["tokens_seen"] for x in dec], [x["decode_ms_median"] for x in dec], "^-")
    a2.set_xscale("log")
    a2.set_ylim(0, max(x["decode_ms_median"] for x in dec) * 1.5)
    a2.set_xlabel("tokens streamed")
    a2.set_ylabel("decode ms per token")
    a2.set_title("decode latency stays flat")
    a2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "long_stream_gpu.png", dpi=120)


def main():
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else sorted((Path(__file__).parent / "results").glob("h*"))[-1]
    for name, fn in [("decode_latency", decode_latency), ("many_sessions", many_sessions),
                     ("streaming_prefill", streaming_prefill), ("long_stream_gpu", long_stream)]:
        r = load(d, name)
        if r is not None:
            try:
                fn(d, r)
                print(f"wrote {d / name}.png")
            except Exception as exc:  # one bad file should not stop the others
                print(f"{name}: {exc!r}")


if __name__ == "__main__":
    main()
