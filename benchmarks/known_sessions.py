"""Engine-thread bookkeeping against the number of sessions a replica knows.

A replica knows far more conversations than its pool holds (`max_idle_sessions`, 10,000 by
default, plus the host tier's): most are ids only. What the engine thread does per step must
not grow with them: the published view (engine/stats.py, after every step), the search for an
eviction victim when a new session needs pages. Tiny model on the CPU (the model's own time
is the same at every N, so the differences are the bookkeeping):

  view        ms to build the published view once (engine thread, after every step)
  step        ms per decode step of 8 running sessions, view included (what a step costs)
  evicting    ms per new session's one-token turn that must evict an idle session first (and,
              the replica at max_idle_sessions, forget the oldest ids-only one)

    python benchmarks/known_sessions.py            # N = 0, 1,000, 10,000, 50,000 ids-only sessions
    # against an earlier commit's engine: run it there first, keep its JSON, then here
    python benchmarks/known_sessions.py --before /tmp/known_sessions_then.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import common as C
import torch
from tqdm import tqdm

from swift_engine.config import EngineConfig
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.engine.session import Session
from swift_engine.engine.stats import view_of
from swift_engine.models.tiny import TINY_CONFIG
from swift_engine.models.random_init import random_model
from swift_engine.outputs import SessionSnapshot
from swift_engine.sampling import SamplingParams

RESIDENT, RUNNING = 48, 8


def core_with(known: int) -> EngineCore:
    """`known` ids-only sessions (the least recently used: as LRU eviction leaves them), then
    RESIDENT idle sessions holding pages (the pool is then full: a new session evicts one). The
    replica is at its bound (max_idle_sessions = known): each eviction makes one session too many."""
    cfg = EngineConfig(model="tiny", sink_tokens=4, window_tokens=28, page_size=8, num_pages=RESIDENT * 4 + 9,
                       max_batch_tokens=32, max_running=RUNNING + 1, max_idle_sessions=known)
    core = EngineCore(cfg, random_model(TINY_CONFIG, "cpu", torch.float32, 0), None)
    for i in range(known):  # the state eviction leaves: retained ids, no pages
        snap = SessionSnapshot(session_id=f"idle-{i}", sink_ids=[5, 6, 7, 8], tail_ids=list(range(9, 37)),
                               tokens_seen=32, turns=1)
        s = Session.from_snapshot(snap, 4, 28)
        s.needs_reprefill = True
        core.sessions[s.id] = s
    for i in range(RESIDENT):
        run(core, [turn(core, f"resident-{i}", 24, 1)])
    return core


def turn(core: EngineCore, sid: str, n_prompt: int, max_tokens: int) -> Request:
    prompt = [(7 * i + len(sid)) % 250 + 3 for i in range(n_prompt)]
    req = Request(f"{sid}-{time.monotonic_ns()}", sid, "generate", prompt, emit=lambda ev: None,
                  sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    core.submit(req)
    return req


def run(core: EngineCore, reqs: list[Request]) -> None:
    while any(r.phase != "done" for r in reqs):
        core.step()


def measure(known: int, steps: int) -> dict:
    core = core_with(known)
    views = []
    for _ in range(50):
        t = time.perf_counter()
        view_of(core)
        views.append((time.perf_counter() - t) * 1e3)
    running = [turn(core, f"running-{i}", 8, steps + 4) for i in range(RUNNING)]
    while any(r.phase == "prefill" for r in running):
        core.step()
    step_ms = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        view_of(core)
        step_ms.append((time.perf_counter() - t) * 1e3)
    run(core, running)
    evicting, i = [], 0
    while len(evicting) < 20:  # new sessions until 20 turns each evicted the least recently used idle one
        before, t = core.scheduler.evictions, time.perf_counter()
        run(core, [turn(core, f"new-{i}", 24, 1)])
        if core.scheduler.evictions > before:
            evicting.append((time.perf_counter() - t) * 1e3)
        i += 1
    return dict(known_ids_only=known, view_ms=statistics.median(views), step_ms=statistics.median(step_ms),
                evicting_turn_ms=statistics.median(evicting))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--known", type=int, nargs="+", default=[0, 1000, 10_000, 50_000])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--before", type=Path, help="this benchmark's JSON from an earlier engine: plotted and compared")
    a = ap.parse_args()
    before = json.loads(a.before.read_text())["rows"] if a.before else None
    rows = []
    for n in tqdm(a.known, desc="known sessions"):
        rows.append(measure(n, a.steps))
        C.log(rows[-1])
    base = rows[0]
    for r in rows:
        r.update({f"{k}_over_none": r[k] / base[k] for k in ("view_ms", "step_ms", "evicting_turn_ms")})
        print(f"{r['known_ids_only']:>7,} ids-only: view {r['view_ms']:.3f} ms, step {r['step_ms']:.2f} ms "
              f"({r['step_ms_over_none']:.2f}x), evicting turn {r['evicting_turn_ms']:.2f} ms "
              f"({r['evicting_turn_ms_over_none']:.2f}x)")
    for r, b in zip(rows, before or []):
        r.update({f"{k}_before": b[k] for k in ("view_ms", "step_ms", "evicting_turn_ms")})
        print(f"{r['known_ids_only']:>7,} ids-only, before: view {b['view_ms']:.3f} ms "
              f"({b['view_ms'] / r['view_ms']:.0f}x now), step {b['step_ms']:.2f} ms, evicting turn {b['evicting_turn_ms']:.2f} ms "
              f"({b['evicting_turn_ms'] / r['evicting_turn_ms']:.1f}x now)")
    C.save("known_sessions", {"resident": RESIDENT, "running": RUNNING, "rows": rows})
    plot(rows, before)


def plot(rows: list[dict], before: list[dict] | None) -> None:
    lines = []
    for i, (key, label) in enumerate((("view_ms", "published view"), ("step_ms", "decode step (8 running) + view"),
                                      ("evicting_turn_ms", "new session's turn that evicts"))):
        lines.append((label, [r[key] for r in rows], {"color": f"C{i}"}))
        if before:
            lines.append((f"{label}, before", [b[key] for b in before], {"color": f"C{i}", "marker": "x", "ls": "--"}))
    C.line_plot("known_sessions", [max(r["known_ids_only"], 1) for r in rows], lines,
                "ids-only sessions known (0 plotted at 1)", "ms (median)",
                "engine-thread bookkeeping vs sessions known (tiny model, CPU)")


if __name__ == "__main__":
    main()
