"""Does a conversation remember its pinned prompt far past W? Behavioural check on a real model.

A prompt defines a code (words that appear nowhere else); a long stretch of unrelated text follows
(several times W); then the text asks for the code. We report the log-probability the model gives
the code's tokens when the prompt is pinned (P tokens kept in place of the sinks), and when it is
not: 4 sinks with the same window W, and 4 sinks with the same total cache (W + P - 4).

    python benchmarks/pinned_recall.py [--model smollm2-135m-instruct] [--window 256] [--laps 4]
Writes benchmarks/results/quality/pinned_recall.json.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
from pathlib import Path

from tqdm import tqdm

from swift_engine import EngineConfig, StreamingEngine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "You are a helpful assistant. Remember this secret code: violet anchor 7319 harbor quartz lantern.\n"
ASK, CODE = "\nWhat was the secret code? It was: violet anchor", " 7319 harbor quartz lantern"
with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints it
    import this
FILLER = codecs.decode(this.s, "rot13") + "\n"  # the Zen of Python: text with no code in it


def code_logprob(engine: StreamingEngine, prompt: list[int], filler: list[int], ask: list[int], code: list[int],
                 pinned: int, chunk: int = 128) -> float:
    sid = f"s{pinned}-{engine.config.window_tokens}"
    engine.score_sync(sid, prompt, pinned_tokens=pinned)
    for s in tqdm(range(0, len(filler), chunk), desc=sid, leave=False):
        engine.score_sync(sid, filler[s:s + chunk])
    lps = engine.score_sync(sid, ask + code)[len(ask):]
    engine.drop(sid)
    return sum(lps)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--laps", type=int, default=4, help="filler length in windows")
    args = p.parse_args()

    def make(window: int) -> StreamingEngine:
        return StreamingEngine(EngineConfig(model=args.model, sink_tokens=4, window_tokens=window, page_size=16,
                                            num_pages=256, max_batch_tokens=256, max_pinned_tokens=128),
                               progress=False)

    e = make(args.window)
    tok = e.tokenizer
    prompt = [tok.hf.bos_token_id] * (tok.hf.bos_token_id is not None) + tok.encode(PROMPT)
    filler_once = tok.encode(FILLER)
    filler = (filler_once * (args.laps * args.window // len(filler_once) + 1))[:args.laps * args.window]
    ask, code = tok.encode(ASK), tok.encode(CODE)
    P = len(prompt)
    rows = {"pinned": code_logprob(e, prompt, filler, ask, code, P),
            "4 sinks, same W": code_logprob(e, prompt, filler, ask, code, 0)}
    e.shutdown()
    wide = make(args.window + P - 4)
    rows["4 sinks, same cache"] = code_logprob(wide, prompt, filler, ask, code, 0)
    wide.shutdown()
    out = dict(model=args.model, window=args.window, pinned_tokens=P, filler_tokens=len(filler),
               code_tokens=len(code), code_logprob=rows)
    for k, v in rows.items():
        print(f"{k:>20}: log p(code) = {v:8.2f}  ({v / len(code):.2f} per token)")
    path = ROOT / "benchmarks" / "results" / "quality" / "pinned_recall.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
