"""Idle caches age out of the pool (idle_cache_ttl_s) and the rebuild is reported on the next turn."""
import time

import pytest
import torch

from swift_engine import EngineConfig, SamplingParams, StreamingEngine
from swift_engine.engine.idle_cache import live_weight

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])


def make(device: str = "cpu", **kw) -> StreamingEngine:
    # float32 on the GPU too: the rebuilt cache must give the same greedy tokens as the kept one
    return StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8, num_pages=64,
                                        max_batch_tokens=64, device=device, dtype="float32", **kw), progress=False)


def turn(engine, sid, ids):
    return engine.generate_sync(sid, prompt_token_ids=ids, sampling=GREEDY)


def test_live_weight_counts_idle_pages_fully_then_fades_to_none_at_the_ttl():
    assert live_weight(0.0, 10.0) == live_weight(5.0, 10.0) == 1.0
    assert live_weight(7.5, 10.0) == pytest.approx(0.5)
    assert live_weight(10.0, 10.0) == live_weight(99.0, 10.0) == 0.0
    assert live_weight(1e9, None) == 1.0  # no ageing: idle pages are needed as long as they stay


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_idle_session_gives_its_pages_back_and_its_next_turn_rebuilds_exactly(device):
    aged, kept = make(device, idle_cache_ttl_s=1.0), make(device)
    try:
        first, second = [(7 * i) % 250 for i in range(30)], [3, 5, 7]
        for e in (aged, kept):
            assert (turn(e, "s", first))[0].reprefill_s is None  # a new session rebuilds nothing
        held = aged.stats()
        assert held.pages_used > 0 and held.pages_live == held.pages_used  # young: every page counts
        start = time.monotonic()
        while aged.stats().pages_used and time.monotonic() < start + 10:  # the idle engine wakes up by itself
            time.sleep(0.1)
        st = aged.stats()
        assert st.pages_used == 0 and st.pages_live == 0 and st.evictions == 1
        assert "s" not in aged.resident_sessions() and aged.has_session("s")  # ids kept, pages gone
        assert time.monotonic() - start >= 0.5  # not before the TTL's fading half, at least
        rebuilt, plain = turn(aged, "s", second), turn(kept, "s", second)
        assert rebuilt[0].reprefill_s is not None and 0 < rebuilt[0].reprefill_s < 5
        assert plain[0].reprefill_s is None and kept.stats().evictions == 0
        assert [e.token_id for e in rebuilt] == [e.token_id for e in plain]  # same cache, same tokens
        assert all(e.reprefill_s is None for e in rebuilt[1:])  # reported once, on the first token
    finally:
        aged.shutdown(), kept.shutdown()
