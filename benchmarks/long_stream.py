"""Stream N tokens through one session; print per-token latency and cache memory at intervals.

StreamingLLM's promise is constant cost per token at any length: both columns
should stay flat. Runs on any device the engine supports (CPU by default).

    python benchmarks/long_stream.py --tokens 20000 --window 252
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from swift_engine import EngineConfig, SamplingParams, StreamingEngine


def cache_of(core, session_id: str) -> tuple[int, int, int]:
    """A session's cached tokens, pages and KV bytes (run in the engine process: StreamingEngine.inspect)."""
    table, cache = core.sessions[session_id].table, core.cache
    return table.tokens, table.pages, table.pages * cache.P * cache.k[0, 0].numel() * cache.k.element_size() \
        * 2 * cache.k.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--intervals", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = ap.parse_args()

    engine = StreamingEngine(EngineConfig(model=args.model, sink_tokens=args.sinks, window_tokens=args.window,
                                          device=args.device), progress=False)
    steps = max(args.tokens // args.intervals, 1)
    rows, seen = [], 0
    sampling = SamplingParams(max_tokens=steps, ignore_eos=True)
    for i in tqdm(range(args.intervals), desc="intervals"):
        start = time.perf_counter()
        events = engine.generate_sync("long", prompt_token_ids=[1], sampling=sampling)
        elapsed = time.perf_counter() - start
        seen = engine.snapshot("long").tokens_seen
        tokens, pages, kv_bytes = engine.inspect(cache_of, "long")
        rows.append({"tokens_seen": seen, "ms_per_token": 1000 * elapsed / len(events),
                     "cache_tokens": tokens, "cache_pages": pages, "kv_bytes": kv_bytes})
    engine.shutdown()
    first, last = rows[0]["ms_per_token"], rows[-1]["ms_per_token"]
    print(f"{'tokens seen':>12} {'ms/token':>9} {'cache tokens':>13} {'pages':>6} {'KV bytes':>10}")
    for r in rows:
        print(f"{r['tokens_seen']:>12} {r['ms_per_token']:>9.3f} {r['cache_tokens']:>13} "
              f"{r['cache_pages']:>6} {r['kv_bytes']:>10}")
    print(f"latency drift last/first interval: {last / first:.3f}x; "
          f"cache bounded at {max(r['cache_tokens'] for r in rows)} <= S+W = {args.sinks + args.window}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
