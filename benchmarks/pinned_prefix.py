"""Pinned system prompts: pool pages of many sessions sharing one pinned prompt, and TTFT of a new
session whose prompt is already resident.

  pages     N sessions, the same P-token prompt pinned (pinned_tokens=P) and W window tokens after it:
            pages the pool holds, against every session keeping its own copy (held + pages_shared)
  ttft_ms   a new session's first token for a P-token prompt + a U-token user turn: prompt resident
            (its pages are shared, only the U tokens are prefilled) vs not (a prompt no one holds)

    python benchmarks/pinned_prefix.py           # GPU: 100 sessions (0.2B shape), TTFT 7B shape, P = 2,048
    python benchmarks/pinned_prefix.py --cpu --sessions 20 --ttft-shape tiny --ttft-pinned 1024   # CPU smoke
Writes benchmarks/results/<gpu|cpu>/pinned_prefix.json (+ .png).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import common as C
import torch
from tqdm import tqdm

from swift_engine import EngineConfig, SamplingParams, StreamingEngine
from swift_engine.engine.cache import running_pages

ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def engine(device: str, shape: str, S: int, W: int, P: int, pages: int, mbt: int) -> StreamingEngine:
    cfg = EngineConfig(model="tiny" if shape == "tiny" else "random", device=device, sink_tokens=S,
                       window_tokens=W, page_size=16, num_pages=pages, max_batch_tokens=mbt, max_running=8,
                       max_pinned_tokens=P, max_prompt_tokens=1 << 20)
    if shape == "tiny":
        return StreamingEngine(cfg, progress=False)
    return StreamingEngine.random(C.SHAPES[shape], cfg)


def pages_part(device: str, shape: str, n: int, P: int, W: int) -> dict:
    mbt = 1024
    pool = P // 16 + n * (W // 16) + 8 * running_pages(P, W, 16, mbt)
    e = engine(device, shape, 4, W, P, pool, mbt)
    vocab = e.inspect(lambda c: c.vocab_size)
    prompt = C.random_ids(P, vocab, 1)
    for i in tqdm(range(n), desc=f"{n} sessions, P={P}, W={W}"):
        e.generate_sync(f"s{i}", prompt_token_ids=prompt + C.random_ids(W, vocab, 100 + i), sampling=ONE_TOKEN,
                        pinned_tokens=P)
    st = e.stats()
    e.shutdown()
    unshared = st.pages_used + st.pages_shared
    row = dict(sessions=n, pinned_tokens=P, window_tokens=W, page_size=16, pages_used=st.pages_used,
               pages_shared=st.pages_shared, pages_unshared=unshared, ratio=st.pages_used / unshared,
               reprefills=st.reprefills)
    C.log(f"pages: {st.pages_used} held, {unshared} unshared ({row['ratio']:.3f}x)")
    return row


def ttft_part(device: str, shape: str, P: int, user: int, reps: int) -> dict:
    W = 2048
    mbt = P + user + 16
    e = engine(device, shape, 4, W, P, 8 * running_pages(P, W, 16, mbt), mbt)  # 7B: 24 GiB of KV
    vocab = e.inspect(lambda c: c.vocab_size)
    shared = C.random_ids(P, vocab, 7)

    def ttft(sid: str, prompt: list[int], seed: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        e.generate_sync(sid, prompt_token_ids=prompt + C.random_ids(user, vocab, seed), sampling=ONE_TOKEN,
                        pinned_tokens=P)
        return 1e3 * (time.perf_counter() - t)

    ttft("warmup", shared, 0), ttft("warmup-resident", shared, 1)  # compiles; makes `shared` resident
    cold = [ttft(f"cold{i}", C.random_ids(P, vocab, 1000 + i), i) for i in tqdm(range(reps), desc="not resident")]
    warm = [ttft(f"warm{i}", shared, i) for i in tqdm(range(reps), desc="prompt resident")]
    e.shutdown()
    row = dict(shape=shape, pinned_tokens=P, user_tokens=user, cold_ms=cold, warm_ms=warm,
               cold_median_ms=statistics.median(cold), warm_median_ms=statistics.median(warm))
    C.log(f"ttft {shape} P={P}: resident {row['warm_median_ms']:.1f} ms, not resident {row['cold_median_ms']:.1f} ms")
    return row


def plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("pages", "ttft") if p in out]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.6), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = out[part]
        if part == "pages":
            ax.bar(["one copy each", "shared pinned pages"], [r["pages_unshared"], r["pages_used"]])
            ax.set_title(f"{r['sessions']} sessions, P={r['pinned_tokens']}, W={r['window_tokens']}")
            ax.set_ylabel("KV pages held")
        else:
            ax.bar(["prompt not resident", "prompt resident"], [r["cold_median_ms"], r["warm_median_ms"]])
            ax.set_title(f"new session TTFT, {r['shape']}, P={r['pinned_tokens']}")
            ax.set_ylabel("ms (median)")
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny model on the CPU (TTFT only with --ttft-shape tiny)")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--pinned", type=int, default=1024)
    p.add_argument("--window", type=int, default=3072)
    p.add_argument("--ttft-shape", default="llama2-7b")
    p.add_argument("--ttft-pinned", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.cpu:
        os.environ.setdefault("SWIFTSERVE_RESULTS", str(C.ROOT / "benchmarks" / "results" / "cpu"))
    out = dict(pages=pages_part("cpu" if args.cpu else "cuda", "tiny" if args.cpu else "small-0.2b",
                                args.sessions, args.pinned, args.window))
    if not args.cpu or args.ttft_shape == "tiny":
        out["ttft"] = ttft_part("cpu" if args.cpu else "cuda", args.ttft_shape, args.ttft_pinned, 32, args.reps)
    path = C.save("pinned_prefix", out)
    plot(out, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
