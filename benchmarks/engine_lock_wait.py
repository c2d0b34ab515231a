"""How long the engine's readers wait while a step runs: has_session, stats, resident_sessions,
is_alive and an idle session's snapshot, timed 200 times each during a deliberately slow (1.5 s)
prefill step on the tiny CPU model (no lock is held across a step; README "Architecture").

    python benchmarks/engine_lock_wait.py
"""
import asyncio
import os
import statistics
import tempfile
import time

from swift_engine import EngineConfig, SamplingParams, StreamingEngine


def slow_steps(engine: StreamingEngine, seconds: float) -> "StepStarted":
    """Make every later step of `engine` take `seconds` longer; `.wait()` returns once one starts
    (also used by tests/test_engine.py). The engine runs in its own process: it says so in a file."""
    flag = StepStarted()

    def install(core, seconds, path):
        real = core.runner.run

        def slow(*a, **k):
            open(path, "w").close()
            time.sleep(seconds)
            return real(*a, **k)

        core.runner.run = slow
    engine.inspect(install, seconds, flag.path)
    return flag


class StepStarted:
    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="swift-step-")
        os.close(fd)
        os.unlink(self.path)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        os.unlink(self.path)
        return True


async def main():
    e = StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8), progress=False)
    two, one = SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=1, ignore_eos=True)
    async for _ in e.generate("idle", prompt_token_ids=list(range(1, 7)), sampling=two):
        pass
    started = slow_steps(e, 1.5)

    async def turn():
        return [ev async for ev in e.generate("long", prompt_token_ids=list(range(1, 41)), sampling=one)]

    step = asyncio.ensure_future(turn())
    await asyncio.to_thread(started.wait, 10)
    readers = [("has_session", lambda: e.has_session("idle")), ("stats", e.stats),
               ("resident_sessions", e.resident_sessions), ("is_alive", e.is_alive),
               ("snapshot(idle)", lambda: e.snapshot("idle"))]
    res = {}
    for name, fn in readers:
        waits = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn()
            waits.append(time.perf_counter() - t0)
        res[name] = (statistics.median(waits) * 1e6, max(waits) * 1e6)
    assert not step.done(), "the slow step ended before the readers were timed"
    await step
    e.shutdown()
    for name, (med, mx) in res.items():
        print(f"{name:20s} median {med:7.1f} us   max {mx:8.1f} us   (step in progress: 1,500,000 us)")


if __name__ == "__main__":
    asyncio.run(main())
