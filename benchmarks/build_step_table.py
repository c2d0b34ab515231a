"""(Re)build the simulator's step table of a shape from GPU results (load_format: simulated).

    python benchmarks/build_step_table.py                       # llama3-8b from benchmarks/results/h200/
    python benchmarks/build_step_table.py --gpu h100 --shape llama2-7b

Decode curve: many_sessions.json, the device time (CUDA graph replay) of a decode step by batch
size, every session at a full S + W cache. Prefill curve: reprefill.json, a full-cache rebuild
split into steps of max_batch_tokens tokens (ms per step), with a one-token step (the batch-1
decode time) as its first point. Writes swift_engine/models/step_tables/<shape>-<gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import SHAPES  # noqa: E402
from swift_engine.models.step_table import TABLES, Curve, StepTable  # noqa: E402


def decode_curve(many_sessions: dict, shape: str) -> tuple[Curve, int]:
    rows = sorted(many_sessions["shapes"][shape]["sweep"], key=lambda r: r["batch"])
    return Curve(x=[r["batch"] for r in rows], ms=[round(r["device_ms"], 3) for r in rows]), \
        many_sessions["cache_tokens"]


def prefill_curve(reprefill: dict, shape: str, cache_tokens: int, one_token_ms: float) -> Curve:
    """ms per step by tokens per step: every rebuild of `cache_tokens` tokens, plus the largest
    single-step rebuild measured (a longer cache), so steps up to max_batch_tokens are measured."""
    points = {1: one_token_ms}
    rows = reprefill["shapes"][shape]
    for r in rows:
        per_step = min(r["max_batch_tokens"], r["cache_tokens"])
        steps = math.ceil(r["cache_tokens"] / r["max_batch_tokens"])
        if r["cache_tokens"] == cache_tokens or (steps == 1 and per_step > cache_tokens):
            points.setdefault(per_step, r["rebuild_ms"] / steps)  # first row of a size: the smaller budget
    xs = sorted(points)
    return Curve(x=xs, ms=[round(points[x], 3) for x in xs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="h200", help="results folder under benchmarks/results/")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, help="default: swift_engine/models/step_tables/<shape>-<gpu>.json")
    a = ap.parse_args()
    results = ROOT / "benchmarks" / "results" / a.gpu
    many = json.loads((results / "many_sessions.json").read_text())
    reprefill = json.loads((results / "reprefill.json").read_text())
    decode, cache_tokens = decode_curve(many, a.shape)
    table = StepTable(
        shape=a.shape, gpu=many["env"].get("gpu", a.gpu), cache_tokens=cache_tokens, hf_config=SHAPES[a.shape],
        decode=decode, prefill=prefill_curve(reprefill, a.shape, cache_tokens, decode.ms[0]),
        sources={"decode": f"benchmarks/results/{a.gpu}/many_sessions.json shapes.{a.shape}.sweep[].device_ms",
                 "prefill": f"benchmarks/results/{a.gpu}/reprefill.json shapes.{a.shape}[].rebuild_ms per step"},
        note="load-testing only (load_format: simulated): a step sleeps these times; never a real result")
    out = a.out or TABLES / f"{a.shape}-{a.gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table.model_dump_json(indent=1) + "\n")
    print(f"wrote {out}: decode {dict(zip(decode.x, decode.ms))} ms; prefill "
          f"{dict(zip(table.prefill.x, table.prefill.ms))} ms")


if __name__ == "__main__":
    main()
