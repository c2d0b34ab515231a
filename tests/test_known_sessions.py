"""The engine thread's per-step walks (published view, eviction victim, idle-cache ageing) go over the
sessions holding pages or running, not every session known: they must still see exactly what a walk
over all of them would (benchmarks/known_sessions.py measures the cost)."""
import time

from swift_engine.config import EngineConfig
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.engine.stats import view_of
from swift_engine.models.random_init import random_model
from swift_engine.models.tiny import TINY_CONFIG
from swift_engine.sampling import SamplingParams

PAGE_BYTES = 2 * TINY_CONFIG["num_hidden_layers"] * 8 * TINY_CONFIG["num_key_value_heads"] * 16 * 4


def core(**kw) -> EngineCore:
    cfg = EngineConfig(**{"model": "tiny", "sink_tokens": 4, "window_tokens": 48, "page_size": 8, "num_pages": 30,
                          "max_batch_tokens": 64, "host_cache_bytes": 8 * PAGE_BYTES, **kw})
    return EngineCore(cfg, random_model(TINY_CONFIG, "cpu", cfg.torch_dtype, 0), None)


def turn(c: EngineCore, sid: str, n: int = 40, max_tokens: int = 4) -> Request:
    req = Request(f"{sid}-{time.monotonic_ns()}", sid, "generate", [(7 * i + len(sid)) % 250 + 3 for i in range(n)],
                  emit=lambda ev: None, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    c.submit(req)
    return req


def run(c: EngineCore, *reqs: Request) -> None:
    while any(r.phase != "done" for r in reqs):
        c.step()


def walked(c: EngineCore) -> dict:
    """What a walk over every known session counts."""
    ss = c.sessions.values()
    return dict(resident=[sid for sid, s in c.sessions.items() if s.running or s.table.pages],
                sessions_resident=sum(bool(s.table.pages) for s in ss), sessions_host=len(c.host.entries),
                sessions_ids_only=sum(not s.table.pages and not c.host.holds(s.id) for s in ss),
                sessions_running=sum(s.running for s in ss),
                pages_evictable=sum(s.table.pages for s in ss if not s.running) + c.host.pages_leaving())


def seen(c: EngineCore) -> dict:
    v = view_of(c)
    st = v.stats
    return dict(resident=list(v.resident), sessions_resident=st.sessions_resident, sessions_host=st.sessions_host,
                sessions_ids_only=st.sessions_ids_only, sessions_running=st.sessions_running,
                pages_evictable=st.pages_evictable)


def test_the_view_counts_every_tier_as_a_walk_over_all_sessions_would():
    c = core()
    for i in range(6):  # the pool keeps ~1 idle session: the others go to the host tier, then to ids only
        run(c, turn(c, f"s{i}"))
        assert seen(c) == walked(c)
    st = view_of(c).stats
    assert st.sessions_resident and st.sessions_host and st.sessions_ids_only  # every tier is populated
    running = turn(c, "s1", n=3, max_tokens=6)  # an ids-only session's turn: running, re-prefilled
    c.step()
    assert seen(c) == walked(c) and "s1" in seen(c)["resident"]
    run(c, running)
    assert c.drop("s0") and seen(c) == walked(c)


def test_eviction_takes_the_least_recently_used_session_with_pages_past_the_ids_only_ones():
    c = core(host_cache_bytes=0, max_idle_sessions=100, num_pages=24)  # a turn reserves 17, a session holds 6
    for sid in ("a", "b", "c"):  # c's turn evicts a: then a is ids only, b and c hold pages (b the older)
        run(c, turn(c, sid))
    assert not c.sessions["a"].table.pages and c.sessions["b"].table.pages and c.sessions["c"].table.pages
    run(c, turn(c, "d"))
    assert not c.sessions["b"].table.pages and c.sessions["c"].table.pages  # b went, not c
    assert list(c.with_pages()) == ["c", "d"]


def test_at_the_idle_bound_each_new_session_forgets_the_oldest_ids_only_one():
    c = core(host_cache_bytes=0, max_idle_sessions=3)
    for i in range(8):
        run(c, turn(c, f"s{i}"))
    ids_only = [sid for sid, s in c.sessions.items() if not s.table.pages]
    assert len(ids_only) <= 3 + 1 and c.idle.forgotten >= 8 - 3 - len(c.with_pages()) - 1
    assert "s0" not in c.sessions and ids_only == sorted(ids_only, key=lambda s: int(s[1:]))  # oldest forgotten first
