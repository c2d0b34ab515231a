"""Nothing a caller does stalls or kills the engine: a cancel while the submit is queued, a burst
under page pressure, a caller's event loop closed mid-stream, an idle engine's page count."""
import asyncio
import time

import pytest
from pydantic import ValidationError

from swift_engine import EngineConfig, SamplingParams, StreamingEngine

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
BOUND_S = 20  # every call below must end well inside this; a stall shows as a timeout


def make(**kw) -> StreamingEngine:
    return StreamingEngine(EngineConfig(**{"model": "tiny", "sink_tokens": 4, "window_tokens": 48,
                                           "page_size": 8, **kw}), progress=False)


def ids(n, seed):
    return [(seed * 31 + i * 7) % 250 for i in range(n)]


async def turn(engine, sid, n=10, seed=0, sampling=GREEDY):
    return [ev async for ev in engine.generate(sid, prompt_token_ids=ids(n, seed), sampling=sampling)]


async def test_a_cancel_while_the_submit_is_queued_harms_no_one():
    e = make()
    try:
        for _ in range(3):
            task = asyncio.create_task(turn(e, "gone"))
            await asyncio.sleep(0)  # the submit is in the engine's inbox, not yet accepted
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        events = await asyncio.wait_for(turn(e, "other"), BOUND_S)
        assert events[-1].finish_reason == "length" and e.is_alive()
        # the cancelled session's next turn is accepted: nothing was left running for it
        assert (await asyncio.wait_for(turn(e, "gone"), BOUND_S))[-1].finish_reason == "length"
    finally:
        e.shutdown()


async def test_a_burst_under_page_pressure_is_admitted():
    """x, y, z each fill the pool in turn; their next turns arrive at once with x first. x's room is
    held by y and z, whose turns are only queued: they must give their pages up, not stall x."""
    for host in (0, 64 << 10):
        e = make(sink_tokens=4, window_tokens=20, page_size=4, max_batch_tokens=16, num_pages=24,
                 host_cache_bytes=host)
        try:
            for sid in "xyz":
                await asyncio.wait_for(e.score(sid, ids(30, ord(sid))), BOUND_S)
            scores = await asyncio.wait_for(
                asyncio.gather(*(e.score(sid, ids(8, i)) for i, sid in enumerate("xyz"))), BOUND_S)
            assert [len(s) for s in scores] == [8, 8, 8] and e.is_alive()
        finally:
            e.shutdown()


def test_a_callers_loop_closed_mid_stream_harms_only_that_caller():
    e = make()
    try:
        loop = asyncio.new_event_loop()
        agen = e.generate("dying", prompt_token_ids=ids(10, 1),
                          sampling=SamplingParams(max_tokens=400, ignore_eos=True))
        loop.run_until_complete(agen.__anext__())  # the stream is open, the turn decoding
        loop.close()  # the caller's loop goes away without closing the stream
        time.sleep(0.5)
        assert e.is_alive()
        events = e.generate_sync("other", prompt_token_ids=ids(10, 2), sampling=GREEDY)
        assert events[-1].finish_reason == "length"
        deadline = time.monotonic() + BOUND_S
        while e.stats().sessions_running and time.monotonic() < deadline:
            time.sleep(0.05)  # the orphaned turn was aborted, not decoded to its end
        assert e.stats().sessions_running == 0
    finally:
        e.shutdown()


async def test_an_idle_engine_counts_pages_back_from_ageing():
    """Sessions ageing out into the host tier give their pool pages back while the engine idles."""
    e = make(num_pages=40, max_batch_tokens=32, host_cache_bytes=1 << 20, idle_cache_ttl_s=0.5)
    try:
        for sid in "ab":
            await turn(e, sid, n=30, seed=len(sid))
        deadline = time.monotonic() + BOUND_S
        while (e.stats().sessions_host < 2 or e.stats().pages_used) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        st = e.stats()
        assert (st.sessions_host, st.pages_used, st.pages_free) == (2, 0, 40)
    finally:
        e.shutdown()


def test_max_pinned_tokens_below_the_sinks_is_refused():
    with pytest.raises(ValidationError, match="max_pinned_tokens"):
        EngineConfig(sink_tokens=4, max_pinned_tokens=2)
    assert EngineConfig(sink_tokens=4, max_pinned_tokens=4).max_pinned_tokens == 4
