"""Engine step cost of sampling settings: batch 32 decoding at a full S+W cache, greedy against the
settings an OpenAI client sends (temperature 1.0 by default, often with top_p).

For each setting, 32 fresh sessions prefill S+W+32 random tokens, then every step decodes all of them:
  ms/step   wall time of EngineCore.step (the engine as served: model, sampler, one device->host copy)
  tok/s     batch / ms per step
  vs greedy ms/step over greedy's, in the same run
  sampler   the sampler alone on [batch, vocab] logits, ms

    python benchmarks/sampling_sweep.py [--shape llama3-8b] [--batch 32] [--cache 2048]
"""
from __future__ import annotations

import argparse
import time

import common as C
import torch

from swift_engine.engine.request import Request
from swift_engine.sampling import Sampler, SamplingParams

S = 4
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 1.0": dict(temperature=1.0),
    "temperature 1.0 + top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "temperature 0.7 + top_k 50 + seed": dict(temperature=0.7, top_k=50, seed=0),
    "temperature 1.0 + top_p 0.9 + penalties": dict(temperature=1.0, top_p=0.9, repetition_penalty=1.1,
                                                     presence_penalty=0.5, frequency_penalty=0.5),
    "greedy + top_logprobs 5": dict(temperature=0.0, top_logprobs=5),
}


def params_for(setting: dict, row: int) -> SamplingParams:
    p = SamplingParams(**setting)
    return p.model_copy(update={"seed": row}) if p.seed is not None else p  # a seed per row, as clients send


def step_cost(core, vocab: int, name: str, batch: int, L: int, steps: int, round_: int) -> dict:
    live = [C.submit_generate(core, f"{name}-{round_}-{i}", C.random_ids(L + 32, vocab, i), 1_000_000,
                              params_for(SETTINGS[name], i)) for i in range(batch)]
    C.step_until(core, lambda: all(r.phase == "decode" for r in live))
    for _ in range(5):
        core.step()
    ms = C.time_decode_steps(core, steps)
    for r in live:
        r.aborted = True
    core.step()
    for i in range(batch):
        core.drop(f"{name}-{round_}-{i}")
    return dict(setting=name, step_ms=ms, tok_s=batch / ms * 1e3)


def sampler_alone_ms(vocab: int, name: str, batch: int, reps: int = 50) -> float:
    sampler = Sampler(vocab, torch.device("cuda"))
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16) * 3
    rows = [Request(f"r{i}", f"s{i}", "generate", [1], emit=None, sampling=params_for(SETTINGS[name], i))
            for i in range(batch)]
    for r in rows:
        sampler.prepare(r)
    for _ in range(5):
        sampler.sample(logits, rows, context=lambda r: [1, 2, 3])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        sampler.sample(logits, rows, context=lambda r: [1, 2, 3])  # ends with a device->host copy
    return (time.perf_counter() - t) / reps * 1e3


def plot(rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["setting"] for r in rows]
    bars = ax.barh(names, [r["step_ms"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['step_ms']:.2f} ms, {r['tok_s']:.0f} tok/s, {r['vs_greedy']:.3f}x greedy", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("ms per engine step (batch decode)")
    ax.set_xlim(0, max(r["step_ms"] for r in rows) * 1.6)
    ax.set_title(title)
    fig.tight_layout()
    path = C.results_dir() / "sampling_sweep.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(C.SHAPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache", type=int, default=2048, help="S + W")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="every setting is measured this many times, "
                   "interleaved; the best round counts")
    args = p.parse_args()
    model = C.make_model(args.shape)
    vocab = model.args.vocab_size
    core = C.make_core(model, S, args.cache - S, tokens_capacity=args.batch * (args.cache + 64),
                       max_batch_tokens=512, max_running=args.batch)
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in SETTINGS:
            row = step_cost(core, vocab, name, args.batch, args.cache, args.steps, round_)
            C.log("  ", round_, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            if name not in best or row["step_ms"] < best[name]["step_ms"]:
                best[name] = row
    rows = [best[name] for name in SETTINGS]
    for r in rows:
        r["vs_greedy"] = r["step_ms"] / best["greedy"]["step_ms"]
        r["sampler_ms"] = sampler_alone_ms(vocab, r["setting"], args.batch)
    C.save("sampling_sweep", dict(shape=args.shape, batch=args.batch, cache_tokens=args.cache, S=S,
                                  steps=args.steps, rows=rows))
    print(f"\n{args.shape}, batch {args.batch}, S+W = {args.cache}: setting | ms/step | tok/s | vs greedy | "
          "sampler alone ms")
    for r in rows:
        print(f"{r['setting']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['vs_greedy']:.3f} | {r['sampler_ms']:.3f}")
    plot(rows, f"sampling settings, {args.shape} random weights, batch {args.batch}, S+W = {args.cache}")


if __name__ == "__main__":
    main()
