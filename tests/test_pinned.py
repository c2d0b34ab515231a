"""Pinned regions (engine/pinned.py): the layout equals the StreamingLLM reference with P sinks, sessions
with the same pinned ids share one copy of its pages, and the counts stay right as sessions come and go."""
import asyncio

import pytest
import torch

from swift_engine import EngineConfig, InvalidRequestError, SamplingParams, StreamingEngine
from swift_engine.engine.cache import PageTable, SinkWindowCache, ceil_div
from swift_engine.layers.reference import reference_logits

S, W, PAGE = 4, 10, 8
P = 13  # not a multiple of the page size, and longer than the window


def make(**kw) -> StreamingEngine:
    return StreamingEngine(EngineConfig(**{"model": "tiny", "sink_tokens": S, "window_tokens": W,
                                           "page_size": PAGE, "max_pinned_tokens": 32, **kw}), progress=False)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_lp(engine: StreamingEngine, context: list[int], nxt: list[int], sinks: int) -> list[float]:
    """log p(nxt[j] | ...) of the reference streaming context + nxt with `sinks` sink tokens and W."""
    logits = reference_logits(engine.inspect(lambda c: c.model), context + nxt, sinks, W)
    lp = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
    return lp[torch.arange(len(nxt)), torch.tensor(nxt)].tolist()


def close(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-4


def pages_used(engine: StreamingEngine) -> int:
    return engine.inspect(lambda c: c.cache.num_pages - len(c.cache.free))


SYSTEM = ids(P, 7)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_pinned_stream_equals_the_reference_with_P_sinks():
    e = make()
    stream = SYSTEM + ids(60, 1)  # far past eviction (P + W = 23)
    got = e.score_sync("a", stream, pinned_tokens=P)
    assert close(got[1:], reference_lp(e, stream[:1], stream[1:], P))
    assert e.snapshot("a").sink_ids == SYSTEM and e.snapshot("a").pinned_tokens == P
    # a second session attaches to the resident copy (no prefill of it) and still equals the reference
    events = e.generate_sync("b", prompt_token_ids=SYSTEM + ids(5, 2), sampling=GREEDY, pinned_tokens=P)
    seen = SYSTEM + ids(5, 2) + [ev.token_id for ev in events]
    assert e.inspect(lambda c: c.cache.pinned.pages_saved()) == ceil_div(P, PAGE)
    nxt = ids(30, 3)
    assert close(e.score_sync("b", nxt), reference_lp(e, seen, nxt, P))
    e.shutdown()


def test_restore_rebuilds_the_same_layout_on_the_shared_pages():
    a, b = make(), make()
    a.score_sync("s", SYSTEM + ids(50, 4), pinned_tokens=P)
    snap = a.snapshot("s")
    b.score_sync("other", SYSTEM + ids(3, 5), pinned_tokens=P)  # b already holds the region
    b.restore_sync("s", snap)
    assert b.snapshot("s") == snap
    assert b.inspect(lambda c: c.cache.pinned.pages_saved()) == ceil_div(P, PAGE)
    nxt = ids(20, 6)
    assert close(b.score_sync("s", nxt), reference_lp(b, snap.sink_ids + snap.tail_ids, nxt, P))
    a.shutdown(), b.shutdown()


def test_shared_pages_are_counted_once_and_freed_by_the_last_session():
    e = make()
    region = ceil_div(P, PAGE)
    for i in range(3):
        e.generate_sync(f"s{i}", prompt_token_ids=SYSTEM + ids(W, i), sampling=GREEDY, pinned_tokens=P)
    window = sum(e.inspect(lambda c: c.sessions[f"s{i}"].table.pages) - region for i in range(3))
    assert pages_used(e) == region + window  # one copy of the pinned pages
    assert e.inspect(lambda c: c.reprefills) == 0 and e.inspect(lambda c: c.cache.pinned.pages_saved()) == 2 * region

    e.inspect(lambda c: c.scheduler.evict_session(c.sessions["s0"]))
    assert e.drop("s1")
    assert e.inspect(lambda c: list(c.cache.pinned.regions.values()))[0].tables == 1 and pages_used(e) > region
    # the evicted session comes back onto the still-resident copy, exactly
    seen = e.snapshot("s0")
    nxt = ids(8, 9)
    assert close(e.score_sync("s0", nxt), reference_lp(e, seen.sink_ids + seen.tail_ids, nxt, P))
    assert e.inspect(lambda c: list(c.cache.pinned.regions.values()))[0].tables == 2
    assert e.drop("s0") and e.drop("s2")
    assert not e.inspect(lambda c: dict(c.cache.pinned.regions)) and pages_used(e) == 0
    e.shutdown()


def test_system_prompt_is_the_pinned_region():
    e = make(max_pinned_tokens=64)
    system = {"role": "system", "content": "Answer like a pirate."}
    msgs = [system, {"role": "user", "content": "hi"}]
    e.generate_sync("chat", messages=msgs, sampling=GREEDY, pin="system")
    tok = e.tokenizer
    head = tok.encode(tok.hf.apply_chat_template([system], tokenize=False))
    snap = e.snapshot("chat")
    assert snap.pinned_tokens == len(head) > S and snap.sink_ids == head  # BOS + the rendered system message
    e.generate_sync("plain", messages=msgs, sampling=GREEDY)
    assert e.snapshot("plain").pinned_tokens is None and len(e.snapshot("plain").sink_ids) == S
    e.shutdown()


def test_a_pinned_region_over_the_limit_is_refused_naming_it():
    e = make(max_pinned_tokens=16)
    with pytest.raises(InvalidRequestError, match="max_pinned_tokens"):
        e.generate_sync("x", prompt_token_ids=ids(40, 1), sampling=GREEDY, pinned_tokens=17)
    long_system = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match=r"max_pinned_tokens\) is 16"):
        e.generate_sync("y", messages=long_system, sampling=GREEDY, pin="system")
    assert not e.has_session("x") and not e.has_session("y")
    e.shutdown()


def test_target_shape_100_sessions_hold_one_copy_of_the_pinned_pages():
    """100 sessions, one 1,024-token system prompt, W = 3,072, page 16: 19,264 pages instead of 25,600
    (page accounting of the real cache; benchmarks/pinned_memory.py runs the engine)."""
    cache = SinkWindowCache(4, 3072, 16, 26_000, (1, 1, 1), "cpu", torch.float32, max_pinned_tokens=1024)
    tables = [PageTable(sink_cap=1024) for _ in range(100)]
    cache.append(tables[0], 1024 + 3072)
    cache.pinned.publish(tables[0], "prompt")
    for t in tables[1:]:
        assert cache.pinned.attach(t, "prompt")
        cache.append(t, 3072)
    assert cache.num_pages - len(cache.free) == 64 + 100 * 192 == 19_264
    assert cache.pinned.pages_saved() == 99 * 64  # unshared: 100 * 256 = 25,600
    for t in tables:
        cache.release(t)
    assert len(cache.free) == cache.num_pages


async def test_pinned_sessions_under_page_pressure_stay_exact():
    """A pool that holds about one pinned session: turns of three sessions queue, idle ones are evicted
    (their shared copy goes when the last holder does) and come back exactly."""
    e = make(num_pages=12, max_batch_tokens=16)  # a pinned session reserves 8 pages, a plain one 7
    turns = {f"p{i}": SYSTEM + ids(12, 20 + i) for i in range(3)}

    async def first(sid, prompt):
        return [ev async for ev in e.generate(sid, prompt_token_ids=prompt, sampling=GREEDY, pinned_tokens=P)]
    outs = await asyncio.gather(*(first(sid, p) for sid, p in turns.items()))
    assert all(o[-1].finish_reason == "length" for o in outs) and e.stats().evictions >= 1
    for sid in turns:
        snap = e.snapshot(sid)
        nxt = ids(6, 30)
        assert close(await e.score(sid, nxt), reference_lp(e, snap.sink_ids + snap.tail_ids, nxt, P))
    assert e.stats().reprefills >= 3  # each came back from its retained ids, onto a copy of the region
    e.shutdown()
