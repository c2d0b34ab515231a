"""A chat turn is rendered (history check, template, tokens) in the front end, not the engine process
where every session's step waits; a render made against a session state that has since changed is never
used (engine/turn_render.py)."""
import threading

import pytest

from swift_engine import EngineConfig, HistoryMismatchError, SamplingParams, StreamingEngine
from swift_engine.engine.request import Request

FOUR = SamplingParams(max_tokens=4, ignore_eos=True)
U1, U2 = {"role": "user", "content": "hi there"}, {"role": "user", "content": "and more"}


@pytest.fixture
def engine():
    e = StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8), progress=False)
    yield e
    e.shutdown()


async def chat(engine, sid, messages):
    events = [ev async for ev in engine.generate(sid, messages=messages, sampling=FOUR)]
    return {"role": "assistant", "content": "".join(ev.text for ev in events)}


async def test_turns_are_rendered_off_the_engine_thread(engine, monkeypatch):
    tok, threads = engine.tokenizer, []
    real = tok.render_messages

    def recording(*a, **kw):
        threads.append(threading.current_thread())
        return real(*a, **kw)

    monkeypatch.setattr(tok, "render_messages", recording)
    reply = await chat(engine, "s", [U1])
    await chat(engine, "s", [U1, reply, U2])
    assert len(threads) == 2  # both turns rendered here, in the front end: not in the engine process
    assert engine.snapshot("s").messages_consumed == 4


async def test_a_render_for_an_older_state_of_the_session_is_not_used(engine):
    stale = engine._prerender("s", [U1], "none")  # rendered as the session's first turn
    assert stale is not None and stale.state.first_turn
    await chat(engine, "s", [U1])  # meanwhile its first turn ran: the same messages no longer extend it
    req = Request("r", "s", "generate", [], emit=None, sampling=FOUR)
    with pytest.raises(HistoryMismatchError):
        engine._client.call("submit", req, [U1], stale).result(10)


async def test_errors_are_raised_as_before_when_the_caller_cannot_render(engine):
    assert engine._prerender("s", [{"role": "user"}], "none") is None  # no content: submit says why
    with pytest.raises(Exception, match="content"):
        await chat(engine, "s", [{"role": "user"}])
    reply = await chat(engine, "s", [U1])
    with pytest.raises(HistoryMismatchError):
        await chat(engine, "s", [U2, reply, U1])
