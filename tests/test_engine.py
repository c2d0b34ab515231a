"""Engine behaviour on the tiny default model: batching, sessions, sampling, bad input."""
import asyncio
import time

import pytest
from pydantic import ValidationError

from benchmarks.engine_lock_wait import slow_steps
from tests.engine_faults import fail_next_step
from swift_engine import (CapacityError, EngineConfig, EngineError, HistoryMismatchError, InvalidRequestError,
                          SamplingParams, SessionBusyError, StreamingEngine, UnknownSessionError)
from swift_engine.tokenizer import IncrementalDetokenizer

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def make(**kw) -> StreamingEngine:
    return StreamingEngine(EngineConfig(**{"model": "tiny", "sink_tokens": 4, "window_tokens": 48,
                                           "page_size": 8, **kw}), progress=False)


@pytest.fixture(scope="module")
def engine():
    e = make()
    yield e
    e.shutdown()


async def run(engine, sid, **kw):
    return [ev async for ev in engine.generate(sid, **kw)]


def ids_of(events):
    return [e.token_id for e in events if e.token_id is not None]


def prompt(n, seed):
    return [(seed * 31 + i * 7) % 250 for i in range(n)]


async def test_batched_equals_alone(engine):
    alone = ids_of(await run(engine, "alone", prompt_token_ids=prompt(30, 1), sampling=GREEDY))
    results = await asyncio.gather(
        run(engine, "b0", prompt_token_ids=prompt(30, 1), sampling=GREEDY),
        *[run(engine, f"b{i}", prompt_token_ids=prompt(5 + 17 * i, i), sampling=GREEDY) for i in range(1, 6)])
    assert ids_of(results[0]) == alone
    assert len(alone) == 24


async def test_snapshot_restore_is_exact_before_eviction():
    a, b = make(), make()
    turn1 = dict(prompt_token_ids=prompt(10, 3), sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    turn2 = dict(prompt_token_ids=prompt(6, 4), sampling=SamplingParams(max_tokens=8, ignore_eos=True))
    await run(a, "s", **turn1)
    snap = a.snapshot("s")
    assert snap.tokens_seen == 15 and snap.tokens_seen < 4 + 48
    expected = ids_of(await run(a, "s", **turn2))
    seconds = await b.restore("s", snap)
    assert seconds < 5
    assert ids_of(await run(b, "s", **turn2)) == expected
    assert b.snapshot("s") == a.snapshot("s")
    a.shutdown(), b.shutdown()


async def test_lru_eviction_when_pool_full():
    e = make(num_pages=30, max_batch_tokens=64)  # a reservation is 8 + 8 + 1 pages; a session holds 8
    for sid in ["old", "mid", "new"]:
        await run(e, sid, prompt_token_ids=prompt(40, len(sid)), sampling=GREEDY)
    st = e.stats()
    assert st.evictions >= 1 and st.sessions_known == 3
    assert "old" not in e.resident_sessions() and "new" in e.resident_sessions()
    snap = e.snapshot("old")  # still obtainable for the store
    assert snap.tokens_seen == 64
    events = await run(e, "old", prompt_token_ids=[5], sampling=GREEDY)
    assert events[-1].finish_reason == "length" and e.stats().reprefills >= 1
    e.shutdown()


async def test_pages_bounded_in_a_long_session():
    e = make(window_tokens=60, max_batch_tokens=512)
    steady = e.inspect(lambda core: core.cache.steady_pages)
    pages = lambda core: core.sessions["long"].table.pages  # noqa: E731
    for i in range(100):
        await e.score("long", prompt(500, i))
        assert e.inspect(pages) <= steady
    assert e.snapshot("long").tokens_seen == 50_000
    assert e.stats().pages_used == e.inspect(pages)
    e.shutdown()


async def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    x = ids_of(await run(engine, "seed-a", prompt_token_ids=prompt(8, 2), sampling=p))
    y = ids_of(await run(engine, "seed-b", prompt_token_ids=prompt(8, 2), sampling=p))
    z = ids_of(await run(engine, "seed-c", prompt_token_ids=prompt(8, 2), sampling=p.model_copy(update={"seed": 8})))
    assert x == y and x != z


async def test_stop_token_and_stop_string(engine):
    free = await run(engine, "free", prompt_token_ids=prompt(8, 5), sampling=GREEDY)
    toks = ids_of(free)
    cut = await run(engine, "cut", prompt_token_ids=prompt(8, 5),
                    sampling=GREEDY.model_copy(update={"stop_token_ids": [toks[5]]}))
    assert ids_of(cut) == toks[:toks.index(toks[5]) + 1] and cut[-1].finish_reason == "stop"
    text = "".join(ev.text for ev in free)
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stopped = await run(engine, "stopped", prompt_token_ids=prompt(8, 5),
                        sampling=GREEDY.model_copy(update={"stop": [stop]}))
    assert "".join(ev.text for ev in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_multibyte_text_deltas(engine):
    text = "héllo 世界 🙂!"
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text)  # some characters span several tokens
    detok = IncrementalDetokenizer(engine.tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


async def test_messages_are_rendered_incrementally(engine):
    tok = engine.tokenizer
    u1, a1, u2 = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                  {"role": "user", "content": "more"})
    whole = tok.encode(tok.hf.apply_chat_template([u1, a1, u2], add_generation_prompt=True, tokenize=False))
    parts = tok.render_messages([u1], True) + tok.encode("yo") + [tok.end_of_turn_id] + \
        tok.render_messages([u2], False)
    assert parts == whole

    first = await run(engine, "chat", messages=[u1], sampling=SamplingParams(max_tokens=4))
    reply = {"role": "assistant", "content": "".join(ev.text for ev in first)}
    seen = engine.snapshot("chat").tokens_seen
    second = await run(engine, "chat", messages=[u1, reply, u2], sampling=SamplingParams(max_tokens=4))
    snap = engine.snapshot("chat")
    new_prompt = len(tok.render_messages([u2], False)) + (1 if first[-1].token_id not in tok.eos_token_ids else 0)
    assert second[-1].usage.prompt_tokens == new_prompt
    assert snap.tokens_seen == seen + new_prompt + len(ids_of(second))
    assert snap.messages_consumed == 4 and snap.turns == 2
    with pytest.raises(HistoryMismatchError):
        await run(engine, "chat", messages=[u2, reply, u1], sampling=GREEDY)


async def test_long_prefill_does_not_stall_decodes():
    e = make(max_batch_tokens=32, window_tokens=400)
    order = []

    async def watch(sid, **kw):
        async for ev in e.generate(sid, **kw):
            order.append(sid)

    await asyncio.gather(watch("decoder", prompt_token_ids=prompt(4, 1), sampling=SamplingParams(max_tokens=40, ignore_eos=True)),
                         watch("bulk", prompt_token_ids=prompt(600, 2), sampling=SamplingParams(max_tokens=1, ignore_eos=True)))
    # the 600-token prompt needs ~19 steps of 32 tokens; decodes kept flowing meanwhile
    assert order.index("bulk") >= 15
    e.shutdown()


async def test_cancel_frees_request_and_keeps_session_consistent(engine):
    agen = engine.generate("cancel", prompt_token_ids=prompt(10, 9), sampling=SamplingParams(max_tokens=500, ignore_eos=True))
    got = 0
    async for _ in agen:
        got += 1
        if got == 3:
            break
    await agen.aclose()
    for _ in range(100):
        if engine.stats().sessions_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().sessions_running == 0 and engine.stats().queue_depth == 0
    snap = engine.snapshot("cancel")
    assert 13 <= snap.tokens_seen < 510
    after = await run(engine, "cancel", prompt_token_ids=[1, 2], sampling=GREEDY)
    assert after[-1].finish_reason == "length"


async def test_bad_input_is_a_typed_error_and_engine_keeps_serving(engine):
    with pytest.raises(InvalidRequestError, match="at least one token"):
        await run(engine, "bad", prompt_token_ids=[])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        await run(engine, "bad", prompt_token_ids=[1, 10**6])
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        await run(engine, "bad", prompt_token_ids=[1], sampling={"max_tokens": 0})
    with pytest.raises(ValidationError, match="max_tokens"):
        SamplingParams(max_tokens=-3)
    with pytest.raises(ValidationError, match="window_tokens"):
        EngineConfig(window_tokens=0)
    with pytest.raises(UnknownSessionError, match="nobody"):
        engine.snapshot("nobody")
    snap = (await run(engine, "donor", prompt_token_ids=[3, 4], sampling=GREEDY)) and engine.snapshot("donor")
    with pytest.raises(InvalidRequestError, match="snapshot is of session"):
        await engine.restore("someone-else", snap)
    assert "bad" not in engine.resident_sessions()
    ok = await run(engine, "good", prompt_token_ids=[1, 2, 3], sampling=GREEDY)
    assert len(ids_of(ok)) == 24


async def test_one_turn_at_a_time_per_session(engine):
    first = engine.generate("busy", prompt_token_ids=[1, 2], sampling=SamplingParams(max_tokens=5000, ignore_eos=True))
    await first.__anext__()
    with pytest.raises(SessionBusyError):
        await run(engine, "busy", prompt_token_ids=[3])
    await first.aclose()
    while engine.stats().sessions_running:
        await asyncio.sleep(0.01)
    assert (await run(engine, "busy", prompt_token_ids=[3], sampling=GREEDY))[-1].finish_reason == "length"


async def test_a_failing_step_fails_its_requests_not_the_engine():
    e = make()
    turn1 = dict(prompt_token_ids=prompt(12, 1), sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    turn2 = dict(prompt_token_ids=prompt(5, 2), sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    await run(e, "clean", **turn1)
    expected = ids_of(await run(e, "clean", **turn2))
    await run(e, "faulty", **turn1)
    e.inspect(fail_next_step)
    with pytest.raises(EngineError, match="injected device fault"):
        await run(e, "faulty", **turn2)
    # the session reprefills from its retained ids and continues exactly
    assert ids_of(await run(e, "faulty", **turn2)) == expected
    assert e.snapshot("faulty") == e.snapshot("clean").model_copy(update={"session_id": "faulty"})
    e.shutdown()


async def test_readers_and_submissions_do_not_wait_for_a_slow_step():
    """No lock across a step: while a (deliberately slow) prefill step runs, has_session, stats,
    resident sessions, health and an idle session's snapshot answer at once, and a new turn is
    queued without blocking the caller's event loop."""
    e = make()
    await run(e, "idle", prompt_token_ids=prompt(6, 3), sampling=SamplingParams(max_tokens=2, ignore_eos=True))
    started = slow_steps(e, 1.5)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    long_turn = asyncio.ensure_future(run(e, "long", prompt_token_ids=prompt(40, 4), sampling=one))
    assert await asyncio.to_thread(started.wait, 10)
    waits = []
    for _ in range(50):
        t0 = time.perf_counter()
        assert e.has_session("idle") and e.has_session("long") and not e.has_session("nobody")
        assert e.stats().pages_total > 0 and "idle" in e.resident_sessions() and e.is_alive()
        assert e.snapshot("idle").tokens_seen == 8
        waits.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    other_turn = asyncio.ensure_future(run(e, "other", prompt_token_ids=prompt(5, 5), sampling=one))
    await asyncio.sleep(0.01)
    loop_blocked = time.perf_counter() - t0
    assert not long_turn.done(), "the slow step should still be running"
    waits.sort()
    assert waits[len(waits) // 2] < 1e-3 and waits[-1] < 0.1, waits  # the step takes 1.5 s
    assert loop_blocked < 0.5
    assert (await long_turn)[-1].finish_reason == "length"
    assert (await other_turn)[-1].finish_reason == "length"
    assert e.stats().sessions_running == 0 and e.stats().queue_depth == 0
    e.shutdown()


async def test_calls_after_shutdown_fail_at_once():
    e = make()
    e.shutdown()
    assert not e.is_alive()
    with pytest.raises(CapacityError, match="shut down"):
        await asyncio.wait_for(run(e, "s", prompt_token_ids=[1, 2]), 10)
    with pytest.raises(CapacityError, match="shut down"):
        e.drop("nobody")
