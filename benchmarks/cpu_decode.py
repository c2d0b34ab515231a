"""CPU decode step of the local default model: the batched decode attention against the per-sequence
path it replaced, in one run (layers/attention.py: `plan_decode`; the baseline runs every decode step
through `_one`, as mixed and prefill steps still do).

    python benchmarks/cpu_decode.py       # SmolLM2-135M-Instruct, float32, 2 torch threads
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import common as C
from tqdm import tqdm

from swift_engine import EngineConfig, StreamingEngine
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.sampling import SamplingParams


def decode_ms(core: EngineCore, batch: int, context: int, steps: int, tag: str) -> float:
    reqs = [Request(f"{tag}{i}", f"{tag}{i}", "generate", [3 + (7 * j + i) % 4000 for j in range(context)],
                    emit=lambda ev: None, sampling=SamplingParams(max_tokens=steps + 64, ignore_eos=True,
                                                                  temperature=1.0, top_p=0.9, seed=i))
            for i in range(batch)]
    for r in reqs:
        core.submit(r)
    while any(r.phase != "decode" for r in reqs) or len(reqs[0].output_ids) < 2:  # prefilled, then 2 warm steps
        core.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        times.append((time.perf_counter() - t) * 1e3)
    for r in reqs:
        core.abort(r.id)
    core.step()  # the aborts land
    for r in reqs:
        core.drop(r.session_id)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--cases", nargs="+", default=["1x100", "4x100", "8x600", "8x1000"], help="BATCHxCONTEXT")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cfg = EngineConfig(model=a.model, sink_tokens=4, window_tokens=1020, page_size=16, num_pages=1024,
                       max_batch_tokens=256, max_running=16)
    built = StreamingEngine(cfg, progress=False)  # the model and tokenizer as the engine loads them
    built.shutdown()
    core = EngineCore(cfg, built.inspect(lambda c: c.model), built.tokenizer)  # driven from this thread alone
    rows = []
    for case in tqdm(a.cases, desc="cases"):
        b, n = map(int, case.split("x"))
        batched = decode_ms(core, b, n, a.steps, "b")
        with mock.patch("swift_engine.layers.attention.plan_decode", lambda seqs, rope: None):
            per_seq = decode_ms(core, b, n, a.steps, "p")
        rows.append(dict(batch=b, context=n, batched_ms=batched, per_sequence_ms=per_seq, speedup=per_seq / batched))
        print(f"batch {b:2d}, context {n:5d}: {batched:7.1f} ms batched, {per_seq:7.1f} ms per sequence "
              f"({per_seq / batched:.2f}x)")
    C.save("cpu_decode", {"model": a.model, "rows": rows})
    C.line_plot("cpu_decode", [r["batch"] * r["context"] for r in rows],
                [("batched decode attention", [r["batched_ms"] for r in rows], {}),
                 ("per sequence (before)", [r["per_sequence_ms"] for r in rows], {"ls": "--"})],
                "batch x context tokens", "ms per decode step (median)", f"CPU decode step, {a.model}")


if __name__ == "__main__":
    main()
