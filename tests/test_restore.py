"""Restore is exact for any S and W, a snapshot is re-split to another layout or refused, and
idle sessions are bounded by count and age."""
import time

import pytest
import torch

from swift_engine import EngineConfig, InvalidRequestError, StreamingEngine
from swift_engine.layers.reference import reference_logits


def make(S: int, W: int, **kw) -> StreamingEngine:
    return StreamingEngine(EngineConfig(model="tiny", sink_tokens=S, window_tokens=W, page_size=8, **kw),
                           progress=False)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_next(engine: StreamingEngine, retained: list[int], nxt: list[int]) -> list[float]:
    """log p(nxt[j] | ...) of the StreamingLLM reference streaming retained + nxt with the engine's S, W."""
    cfg = engine.config
    logits = reference_logits(engine.inspect(lambda c: c.model), retained + nxt, cfg.sink_tokens, cfg.window_tokens)
    lp = torch.log_softmax(logits[len(retained) - 1:-1], dim=-1)
    return lp[torch.arange(len(nxt)), torch.tensor(nxt)].tolist()


def close(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-4


@pytest.mark.parametrize("S, W", [(0, 24), (20, 12), (4, 48)])  # no sinks; sinks > page size and > W
def test_restore_equals_the_reference_over_the_retained_ids(S, W):
    """Once: with S = 0 a restored session re-prefilled nothing (1.57 off the expected log-probs)."""
    a, b = make(S, W), make(S, W)
    a.score_sync("s", ids(90, 1))
    snap = a.snapshot("s")
    assert snap.tokens_seen == 90 and len(snap.sink_ids) == S and len(snap.tail_ids) == W
    b.restore_sync("s", snap)
    assert b.snapshot("s") == snap
    nxt = ids(15, 2)
    got = b.score_sync("s", nxt)
    assert close(got, reference_next(b, snap.sink_ids + snap.tail_ids, nxt))
    a.shutdown(), b.shutdown()


def test_snapshot_without_evictions_is_re_split_to_any_layout():
    a, b = make(4, 48), make(8, 20)
    seen = ids(40, 3)  # fewer than S + W: nothing evicted, every id retained
    a.score_sync("s", seen)
    b.restore_sync("s", a.snapshot("s"))
    snap = b.snapshot("s")
    assert snap.sink_ids == seen[:8] and snap.tail_ids == seen[8:][-20:] and snap.tokens_seen == 40
    nxt = ids(10, 4)
    assert close(b.score_sync("s", nxt), reference_next(b, snap.sink_ids + snap.tail_ids, nxt))
    a.shutdown(), b.shutdown()


def test_snapshot_with_evictions_fits_a_smaller_layout_and_refuses_a_larger_one():
    """Once: a snapshot taken with S = 4 was accepted by an engine with S = 8, mixing layouts (0.68 off)."""
    a, smaller, larger = make(4, 48), make(2, 24), make(8, 48)
    a.score_sync("s", ids(120, 5))
    snap = a.snapshot("s")
    smaller.restore_sync("s", snap)
    resplit = smaller.snapshot("s")
    assert resplit.sink_ids == snap.sink_ids[:2] and resplit.tail_ids == snap.tail_ids[-24:]
    nxt = ids(10, 6)
    assert close(smaller.score_sync("s", nxt), reference_next(smaller, resplit.sink_ids + resplit.tail_ids, nxt))
    with pytest.raises(InvalidRequestError, match="4 sink and 48 window tokens.*keeps 8 sink"):
        larger.restore_sync("s", snap)
    assert not larger.has_session("s")
    for e in (a, smaller, larger):
        e.shutdown()


def test_snapshot_of_another_model_is_refused():
    a = make(4, 48)
    a.score_sync("s", ids(10, 7))
    with pytest.raises(InvalidRequestError, match="model 'other-model'"):
        a.restore_sync("s", a.snapshot("s").model_copy(update={"model": "other-model"}))
    a.shutdown()


def test_idle_sessions_are_bounded_by_count_least_recently_used_first():
    """Once: idle sessions were never forgotten (about 147 KiB each at S + W = 4096)."""
    e = make(4, 48, num_pages=30, max_batch_tokens=64, max_idle_sessions=5)
    for i in range(60):
        e.score_sync(f"s{i}", ids(40, i))
    st = e.stats()
    assert st.sessions_known <= 5 + st.sessions_resident + 1  # + the one being submitted
    assert st.sessions_resident >= 1
    known = set(e.inspect(lambda c: list(c.sessions)))
    assert {"s59", "s58", "s57"} <= known and "s0" not in known  # the most recent stay
    assert e.inspect(lambda c: c.idle.forgotten) >= 50
    e.score_sync("s0", ids(5, 0))  # a forgotten session starts afresh here; the server rebuilds it first
    assert e.snapshot("s0").tokens_seen == 5
    e.shutdown()


def test_idle_sessions_are_bounded_by_age():
    e = make(4, 48, num_pages=30, max_batch_tokens=64, idle_session_ttl_s=0.2)
    for i in range(4):
        e.score_sync(f"s{i}", ids(40, i))
    idle_before = e.inspect(lambda c: [sid for sid, s in c.sessions.items() if not s.table.pages])
    assert idle_before
    time.sleep(1.1)
    e.score_sync("late", ids(5, 9))
    assert not set(idle_before) & set(e.inspect(lambda c: list(c.sessions)))
    e.shutdown()
