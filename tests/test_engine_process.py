"""The engine core in its own process: a dead or stuck process turns into a typed error for every
waiting caller within seconds, is_alive() turns false, and nothing of the caller's process dies."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from swift_engine import (CapacityError, EngineConfig, EngineDeadError, InvalidRequestError, SamplingParams,
                          StreamingEngine)
from tests.engine_faults import hold_then_step

LONG = SamplingParams(max_tokens=2000, ignore_eos=True)


def make(**kw) -> StreamingEngine:
    return StreamingEngine(EngineConfig(**{"model": "tiny", "sink_tokens": 4, "window_tokens": 48,
                                           "page_size": 8, **kw}), progress=False)


async def stream(engine, sid, sampling=LONG):
    return [ev async for ev in engine.generate(sid, prompt_token_ids=[1, 2, 3], sampling=sampling)]


async def test_a_killed_engine_process_fails_every_waiting_caller_at_once():
    e = make()
    try:
        turns = [asyncio.ensure_future(stream(e, f"s{i}")) for i in range(4)]
        while e.stats().sessions_running < 4:
            await asyncio.sleep(0.02)
        os.kill(e.inspect(lambda core: os.getpid()), signal.SIGKILL)
        start = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*turns, return_exceptions=True), 10)
        assert time.monotonic() - start < 5
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert not e.is_alive()
        with pytest.raises(EngineDeadError):  # later calls too, at once
            await asyncio.wait_for(stream(e, "later"), 5)
        with pytest.raises(EngineDeadError):
            e.snapshot("s0")
    finally:
        e.shutdown()


async def test_a_stuck_engine_process_is_declared_dead():
    """The engine process says nothing for stall_timeout_s while a turn waits (here: it sleeps between
    steps): the turn fails with EngineDeadError, and the process is ended."""
    e = make(stall_timeout_s=2)
    try:
        e.inspect(hold_then_step, 3600, wait=False)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="said nothing"):
            await asyncio.wait_for(stream(e, "s", SamplingParams(max_tokens=2)), 30)
        assert time.monotonic() - start < 10 and not e.is_alive()
    finally:
        e.shutdown()


async def test_calls_keep_their_typed_errors_across_the_process_boundary():
    e = make()
    try:
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            [ev async for ev in e.generate("s", prompt_token_ids=[10**9], sampling=SamplingParams(max_tokens=2))]
        assert (await stream(e, "s", SamplingParams(max_tokens=2, ignore_eos=True)))[-1].finish_reason == "length"
    finally:
        e.shutdown()
    with pytest.raises(CapacityError, match="shut down"):
        await stream(e, "s")


def test_a_script_without_a_main_guard_builds_one_engine(tmp_path):
    """The engine process is forked from a server that never re-runs the caller's main script; the script
    ends without a warning (its progress bars once left a semaphore the resource tracker reported)."""
    script = tmp_path / "chat.py"
    script.write_text("from swift_engine import EngineConfig, SamplingParams, StreamingEngine\n"
                      "e = StreamingEngine(EngineConfig(model='tiny', window_tokens=48, page_size=8), progress=True)\n"
                      "ev = e.generate_sync('s', prompt_token_ids=[1, 2], sampling=SamplingParams(max_tokens=3, "
                      "ignore_eos=True))\n"
                      "print('tokens', len(ev))\n"
                      "e.shutdown()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("tokens 3") == 1
    assert "leaked" not in out.stderr and "Warning" not in out.stderr, out.stderr[-2000:]
