"""Host tier on the CPU (a second memory pool): sessions move resident -> host -> ids only under page
pressure, come back from the host tier bit-identical without a re-prefill, and every tier is counted."""
import asyncio

import pytest
from pydantic import ValidationError

from swift_engine import EngineConfig, EngineError, SamplingParams, StreamingEngine
from swift_engine.models.tiny import TINY_CONFIG
from tests.engine_faults import fail_next_step, hold_then_step

# tiny model, page_size 8: one page of k and v over 2 layers, 2 KV heads of 16 float32 = 4 KiB
PAGE_BYTES = 2 * TINY_CONFIG["num_hidden_layers"] * 8 * TINY_CONFIG["num_key_value_heads"] * 16 * 4
SESSION_PAGES = 8  # S + W = 4 + 48 tokens after eviction: at most 8 pages
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def make(**kw) -> StreamingEngine:
    # a pool of 30 pages: a turn reserves 17, so an idle full session is evicted by the second new one
    return StreamingEngine(EngineConfig(**{"model": "tiny", "sink_tokens": 4, "window_tokens": 48, "page_size": 8,
                                           "num_pages": 30, "max_batch_tokens": 64, **kw}), progress=False)


def prompt(n, seed):
    return [(seed * 31 + i * 7) % 250 for i in range(n)]


async def turn(engine, sid, n=40, seed=0, sampling=GREEDY):
    return [ev.token_id async for ev in engine.generate(sid, prompt_token_ids=prompt(n, seed), sampling=sampling)
            if ev.token_id is not None]


@pytest.mark.parametrize("kv", ["auto", "fp8"])  # fp8: the per-token scales travel with their pages
async def test_a_session_back_from_the_host_tier_continues_bit_identical(kv):
    tiered = make(host_cache_bytes=4 * SESSION_PAGES * PAGE_BYTES, kv_cache_dtype=kv)
    alone = make(num_pages=200, kv_cache_dtype=kv)
    for e in (tiered, alone):
        await turn(e, "s", seed=1)  # 64 tokens seen > S + W: past its first eviction, not a prefix
    for i in range(2):  # two more sessions: the pool keeps one idle session, so "s" leaves it
        await turn(tiered, f"crowd{i}", seed=2 + i)
    st = tiered.stats()
    assert "s" not in tiered.resident_sessions() and "s" in tiered.held_sessions()
    assert st.offloads >= 1 and st.sessions_host >= 1 and st.reprefills == 0
    probe = prompt(12, 9)
    assert await tiered.score("s", probe) == await alone.score("s", probe)  # bit-identical log-probs
    assert await turn(tiered, "s", n=5, seed=7) == await turn(alone, "s", n=5, seed=7)
    st = tiered.stats()
    assert st.reloads == 1 and st.reprefills == 0
    assert tiered.snapshot("s") == alone.snapshot("s")
    tiered.shutdown(), alone.shutdown()


async def test_tiers_lru_bounds_and_stats():
    e = make(host_cache_bytes=SESSION_PAGES * PAGE_BYTES)  # the host tier holds one session
    for sid in ["a", "b", "c"]:
        await turn(e, sid, seed=len(sid))
    st = e.stats()  # a: host; b, c: resident
    assert (st.sessions_resident, st.sessions_host, st.sessions_ids_only) == (2, 1, 0)
    assert st.host_cache_bytes_total == SESSION_PAGES * PAGE_BYTES and 0 < st.host_cache_bytes_used <= st.host_cache_bytes_total
    await turn(e, "d", seed=4)  # b goes to the host tier; full, so a (least recently offloaded) falls to ids
    st = e.stats()
    assert (st.sessions_resident, st.sessions_host, st.sessions_ids_only) == (2, 1, 1)
    assert (st.offloads, st.host_drops, st.evictions) == (2, 1, 2)
    assert set(e.held_sessions()) == {"b", "c", "d"} and set(e.resident_sessions()) == {"c", "d"}
    await turn(e, "b", n=3)  # from the host tier: copied back
    assert (e.stats().reloads, e.stats().reprefills) == (1, 0)
    await turn(e, "a", n=3)  # ids only: re-prefilled
    assert (e.stats().reloads, e.stats().reprefills) == (1, 1)
    e.shutdown()


async def test_a_session_larger_than_the_host_tier_falls_to_ids_only():
    e = make(host_cache_bytes=2 * PAGE_BYTES)
    for sid in ["a", "b", "c"]:
        await turn(e, sid, seed=len(sid))
    st = e.stats()
    assert (st.sessions_host, st.sessions_ids_only, st.offloads, st.host_cache_bytes_used) == (0, 1, 0, 0)
    e.shutdown()


async def test_the_idle_bound_forgets_ids_only_sessions_not_host_tier_ones():
    e = make(host_cache_bytes=SESSION_PAGES * PAGE_BYTES, max_idle_sessions=0)
    for sid in ["a", "b", "c", "d"]:  # a: host, then ids only when b is offloaded; d's submit trims
        await turn(e, sid, seed=len(sid))
    await turn(e, "e", seed=5)  # c to the host tier (b falls to ids only); the trim forgot a
    assert not e.has_session("a") and e.has_session("c") and "c" in e.held_sessions()
    e.shutdown()


async def test_a_failed_step_sends_a_queued_host_tier_session_back_to_its_ids():
    e = make(host_cache_bytes=4 * SESSION_PAGES * PAGE_BYTES, max_running=1)
    for sid in ["s", "a", "b"]:
        await turn(e, sid, seed=len(sid))
    assert e.stats().sessions_host >= 1 and "s" not in e.resident_sessions()
    e.inspect(fail_next_step)  # fails "a"'s step while the turn of "s" waits (max_running 1)
    e.inspect(hold_then_step, 1.0, wait=False)  # both submissions reach one drain: "s" is surely queued
    results = await asyncio.gather(turn(e, "a", n=3), turn(e, "s", n=3), return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    assert not e.inspect(lambda c: c.host.holds("s"))  # one way back after a failure: its retained ids
    before = e.stats()
    assert len(await turn(e, "s", n=3)) == GREEDY.max_tokens
    assert (e.stats().reprefills - before.reprefills, e.stats().reloads - before.reloads) == (1, 0)
    e.shutdown()


def test_host_cache_bytes_is_validated_and_reads_units():
    assert EngineConfig(host_cache_bytes="2GiB").host_cache_bytes == 2 << 30
    with pytest.raises(ValidationError, match="host_cache_bytes"):
        EngineConfig(host_cache_bytes=-1)


async def _pinned_turn(engine, sid, seed, pinned=16):
    ids = prompt(16, 99) + prompt(24, seed)  # the same first 16 ids: one shared pinned region of 2 pages
    return [ev.token_id async for ev in engine.generate(sid, prompt_token_ids=ids, sampling=GREEDY,
                                                         pinned_tokens=pinned) if ev.token_id is not None]


async def test_pinned_sessions_through_the_host_tier_keep_shared_pages_counted():
    """Sessions sharing a pinned region go to the host tier and back: they continue as ones that never
    left, and the pool neither loses nor doubles a page (shared pages leave with their last table)."""
    kw = dict(max_pinned_tokens=16)
    tiered, alone = make(host_cache_bytes=6 * SESSION_PAGES * PAGE_BYTES, **kw), make(num_pages=200, **kw)
    for e in (tiered, alone):
        for sid in ("p1", "p2"):
            await _pinned_turn(e, sid, seed=int(sid[1]))
    for i in range(3):  # crowd the pool: the pinned sessions leave it
        await turn(tiered, f"crowd{i}", seed=5 + i)
    assert tiered.stats().offloads >= 2 and {"p1", "p2"} <= set(tiered.held_sessions())
    for sid in ("p2", "p1"):
        assert await _pinned_turn(tiered, sid, seed=7) == await _pinned_turn(alone, sid, seed=7)
    assert tiered.stats().reprefills == 0 and tiered.snapshot("p1") == alone.snapshot("p1")
    for sid in tiered.inspect(lambda c: list(c.sessions)):
        tiered.drop(sid)
    free, total, regions = tiered.inspect(lambda c: (c.host.wait(), sorted(c.cache.free), c.cache.num_pages,
                                                     len(c.cache.pinned.regions))[1:])
    assert free == list(range(total)) and not regions
    tiered.shutdown(), alone.shutdown()
