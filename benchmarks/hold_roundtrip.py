"""What `await engine.hold_session(sid)` before a turn costs its TTFT (LLMServer._ensure_owned does that every turn).

The engine process answers calls between steps, so the hold waits for the step running when it is sent, and the
turn's submit, sent after the reply, waits for the next one. On a simulated engine (logits 4,096 wide, greedy) with 28
background conversations decoding, 40 probe turns of a resident session alternate with and without the hold.

    python benchmarks/hold_roundtrip.py
"""
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["OMP_NUM_THREADS"] = "1"  # the replica's engine process has one torch thread (Ray's OMP_NUM_THREADS)
from benchmarks.serve_load import local_args, user_message
from deployments.config import AppArgs
from swift_engine import StreamingEngine, SamplingParams

app_args, _ = local_args(Path(__file__).parent / 'serve_sim.yaml', 'swiftserve-llama-7m', ['simulated.vocab_size=4096'])
engine = StreamingEngine(AppArgs.model_validate(app_args).engine, progress=False)
greedy = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
probe_params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

async def background(u, stop):
    conv = 0
    while not stop.is_set():
        hist = []
        for t in range(8):
            if stop.is_set():
                return
            hist.append(user_message(u, t, 12))
            text = []
            async for ev in engine.generate(f"bg-{u}-{conv}", messages=hist, sampling=greedy):
                text.append(ev.text)
            hist.append({"role": "assistant", "content": "".join(text)})
            await asyncio.sleep(0.2)
        conv += 1

async def probe(sid, hist, hold):
    t0 = time.perf_counter()
    held = await engine.hold_session(sid) if hold else None
    t1 = time.perf_counter()
    text = []
    async for ev in engine.generate(sid, messages=hist, sampling=probe_params):
        if len(text) == 0:
            ttft = time.perf_counter() - t0
        text.append(ev.text)
    hist.append({"role": "assistant", "content": "".join(text)})
    return ttft, t1 - t0

async def main():
    stop = asyncio.Event()
    bg = [asyncio.create_task(background(u, stop)) for u in range(28)]
    await asyncio.sleep(8)
    res = {False: [], True: []}
    holds = []
    hists = {h: [] for h in (False, True)}
    for i in range(40):
        for hold in (False, True):
            sid = f"probe-{hold}"
            hists[hold].append(user_message(99, i, 12))
            ttft, hold_s = await probe(sid, hists[hold], hold)
            res[hold].append(ttft)
            if hold:
                holds.append(hold_s)
            await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*bg)
    st = engine.stats()
    print(f"TTFT p50 without hold {1000*statistics.median(res[False]):.1f} ms, with hold {1000*statistics.median(res[True]):.1f} ms; "
          f"hold round trip p50 {1000*statistics.median(holds):.1f} ms (n={len(holds)})")

try:
    asyncio.run(main())
finally:
    engine.shutdown()
