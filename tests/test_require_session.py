"""require_session under what a caller can do to it: cancel at each await, a closed loop, a burst of known
and forgotten sessions, a full pool. The engine stays alive, refuses only sessions it no longer knows, and
a refused or cancelled turn changes nothing."""
import asyncio

import pytest
import torch

from swift_engine import EngineConfig, StreamingEngine, UnknownSessionError

GREEDY = {"temperature": 0, "max_tokens": 3, "ignore_eos": True}


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def forget_quietly(core, session_id: str) -> None:
    """Forget an idle session as the idle bounds do, before the front end hears of it."""
    core.cache.release(core.sessions[session_id].table)
    core.resident.pop(session_id, None)
    del core.sessions[session_id]


@pytest.fixture
def engine():
    e = StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8, num_pages=30,
                                     max_batch_tokens=64), progress=False)
    yield e
    e.shutdown()


async def turn(e, sid, seed=3, require=True):
    return [ev async for ev in e.generate(sid, prompt_token_ids=ids(3, seed), sampling=GREEDY,
                                          require_session=require)]


def seen(e, sid) -> int:
    return e.inspect(lambda c, s: c.sessions[s].tokens_seen if s in c.sessions else -1, sid)


@pytest.mark.parametrize("yields", [0, 1, 2, 5])  # before the submit's reply, at it, in prefill, decoding
def test_a_cancel_at_any_await_of_a_required_turn_leaves_the_session_usable(engine, yields):
    engine.score_sync("s", ids(20, 1))

    async def cancelled_then_again():
        task = asyncio.ensure_future(turn(engine, "s"))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the aborted turn ends at the engine's next step (until then: SessionBusyError)
            if not engine.inspect(lambda c: "s" in c.sessions and c.sessions["s"].running):
                break
            await asyncio.sleep(0.01)
        return await turn(engine, "s", seed=4)
    assert len(asyncio.run(cancelled_then_again())) == 3
    assert engine.is_alive()


def test_a_refused_turn_cancelled_while_refused_changes_nothing(engine):
    engine.score_sync("gone", ids(20, 1))
    engine.inspect(forget_quietly, "gone")

    async def cancel_soon():
        task = asyncio.ensure_future(turn(engine, "gone"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, UnknownSessionError)):
            await task
    asyncio.run(cancel_soon())
    assert seen(engine, "gone") == -1 and engine.is_alive()
    assert len(asyncio.run(turn(engine, "other", require=False))) == 3


def test_a_caller_loop_closed_mid_turn_harms_only_that_caller(engine):
    engine.score_sync("s", ids(20, 1))
    loop = asyncio.new_event_loop()
    gen = engine.generate("s", prompt_token_ids=ids(3, 2), sampling={**GREEDY, "max_tokens": 50},
                          require_session=True)
    loop.run_until_complete(gen.__anext__())
    loop.close()  # the stream is still open
    engine.score_sync("t", ids(10, 5))  # another caller goes on
    assert engine.is_alive()


def test_a_burst_of_known_and_forgotten_sessions(engine):
    for i in range(8):
        engine.score_sync(f"s{i}", ids(12, i))
    for i in range(0, 8, 2):
        engine.inspect(forget_quietly, f"s{i}")

    async def burst():
        return await asyncio.gather(*[turn(engine, f"s{i}", seed=i) for i in range(8)], return_exceptions=True)
    out = asyncio.run(burst())
    for i, r in enumerate(out):
        if i % 2:
            assert isinstance(r, list) and len(r) == 3, r
        else:
            assert isinstance(r, UnknownSessionError)
            assert seen(engine, f"s{i}") == -1  # the refusal created nothing
    with pytest.raises(UnknownSessionError):
        asyncio.run(turn(engine, "never-seen"))
    assert len(asyncio.run(turn(engine, "never-seen", require=False))) == 3  # without it: a new session
    assert engine.is_alive()


def test_a_known_session_evicted_from_a_full_pool_runs_not_refused(engine):
    engine.score_sync("old", ids(40, 1))
    for i in range(4):  # fill the 30-page pool: "old" is evicted to its retained ids
        engine.score_sync(f"f{i}", ids(40, i + 2))
    assert not engine.inspect(lambda c: c.sessions["old"].table.pages)
    before = seen(engine, "old")
    events = asyncio.run(turn(engine, "old"))
    assert len(events) == 3 and events[0].reprefill_s is not None  # rebuilt from its kept ids
    assert seen(engine, "old") == before + 3 + 3
