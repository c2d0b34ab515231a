"""A hypothesis state machine over EngineCore and its Scheduler, driven as StreamingEngine's loop drives them.

Rules interleave what clients and the engine's own policies do: submit (generate, score; new and known
sessions; pinned prompts sharing one region), cancel at every phase (waiting, prefill, decode, a restore's
re-prefill), bursts, steps, eviction (page pressure and explicit), the host tier (offload and reload),
idle-cache expiry on a controlled clock, drop, snapshot/restore and failed steps. After every rule the
invariants below hold; see tests/test_engine_state_machine.py for the CI run and the long one.

Invariants:
- progress: every request ends within BOUND_TICKS of its submit (each accepted one fits the pool: submit
  refuses what never can), and a cancelled one at the next step;
- pages: used + free + leaving for the host tier == total, no page in two places, a shared pinned region's
  pages counted once and its table count right; the host tier's pages likewise; admitted turns' reservations
  covered by the free pages;
- the engine stays alive: no step raises but the ones failed on purpose;
- results: every finished score's log-probs and every finished turn's token log-probs equal the StreamingLLM
  reference's over the ids the engine's cache holds (the whole stream, or the retained ids after a rebuild).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import event, note
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from swift_engine import EngineConfig, SamplingParams
from swift_engine.engine import core as core_module
from swift_engine.engine import session as session_module
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.errors import InvalidRequestError, SessionBusyError
from swift_engine.models.random_init import random_model
from swift_engine.models.tiny import TINY_CONFIG
from tests.reference_stream import ReferenceStream

S, W, PAGE, BUDGET, MAX_PIN = 4, 12, 4, 8, 8
PAGE_BYTES = 2 * TINY_CONFIG["num_hidden_layers"] * PAGE * TINY_CONFIG["num_key_value_heads"] * 16 * 4
SESSIONS = ["a", "b", "c", "d", "e"]
SYSTEM = [200 + i for i in range(MAX_PIN)]  # every pinned prompt starts with it: their regions are shared
BOUND_TICKS = 120  # generous: 5 sessions' longest turns (36 fed + 6 decoded) at 8 tokens a step take ~30
TOLERANCE = 1e-4
_MODEL = None


def tiny_model():
    global _MODEL
    if _MODEL is None:
        _MODEL = random_model(TINY_CONFIG, "cpu", torch.float32, seed=0)
    return _MODEL


def label(text: str) -> None:
    """Note what happened in hypothesis' statistics and report; nothing when a regression test replays rules."""
    if currently_in_test_context():
        event(text) if not text.startswith("engine:") else note(text)


class Clock:
    """What engine/core.py and engine/session.py read as `time`: monotonic() is moved by the machine."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


class FailOnce:
    """The engine's runner, which raises once when told to (a failed step: device error, OOM...)."""

    def __init__(self, runner):
        self.runner, self.armed = runner, False

    def run(self, *args):
        if self.armed:
            self.armed = False
            raise RuntimeError("step failed on purpose")
        return self.runner.run(*args)

    def __getattr__(self, name):
        return getattr(self.runner, name)


class ObservedCore(EngineCore):
    """EngineCore unchanged; it notes, as each request starts, whether the session's cache is rebuilt from
    its retained ids (and which), so the reference takes the same path."""

    def _start(self, req: Request) -> None:
        s = self.sessions[req.session_id]
        self.started.append((req.id, s.needs_reprefill, s.retained(), s.S, s.tokens_seen))
        super()._start(req)


class Turn:
    """A request the machine submitted, its events, and what it checks them against."""

    def __init__(self, req: Request, tick: int):
        self.req, self.submitted_at, self.events = req, tick, []
        self.snapshot = None  # a restore's: what the session must equal once rebuilt
        self.cancelled_at: int | None = None
        self.seen_at_start: int | None = None

    @property
    def final(self):
        return self.events[-1] if self.events and self.events[-1].finish_reason else None


class EngineMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.saved_time = core_module.time, session_module.time
        core_module.time = session_module.time = self.clock
        self.turns: dict[str, Turn] = {}  # in flight, by session
        self.refs: dict[str, ReferenceStream] = {}  # the reference of each session's cache
        self.ids = itertools.count()
        self.tick_no = 0
        self.failed_on_purpose = 0

    def teardown(self):
        try:
            if hasattr(self, "core"):
                self.drain()
                c = self.core
                for what, n in (("evicted", c.scheduler.evictions), ("offloaded", c.host.offloads),
                                ("reloaded", c.host.reloads), ("host-dropped", c.host.drops),
                                ("aged", c.ageing.aged), ("shared a pinned region", c.cache.pinned.pages_saved()),
                                ("failed a step", self.failed_on_purpose), ("re-prefilled", c.reprefills)):
                    label(f"example {what}: {bool(n)}")
        finally:
            core_module.time, session_module.time = self.saved_time

    # ---- the engine --------------------------------------------------------------------------
    @initialize(num_pages=st.sampled_from([18, 24, 40]), max_running=st.integers(1, 3),
                host_pages=st.sampled_from([0, 0, 10, 24]), ttl=st.sampled_from([None, 30.0]))
    def make_engine(self, num_pages, max_running, host_pages, ttl):
        config = EngineConfig(model="tiny", sink_tokens=S, window_tokens=W, page_size=PAGE, num_pages=num_pages,
                              max_batch_tokens=BUDGET, max_running=max_running, max_pinned_tokens=MAX_PIN,
                              host_cache_bytes=host_pages * PAGE_BYTES, idle_cache_ttl_s=ttl)
        self.core = ObservedCore(config, tiny_model(), None)
        for pool in (self.core.cache.k, self.core.cache.v):  # the pool is torch.empty: whatever memory held, NaN
            pool.fill_(float("nan"))                         # at times. Made NaN always, a read of an unwritten
                                                             # slot shows in every result that depends on it
        self.core.started = []
        self.core.runner = FailOnce(self.core.runner)
        label(f"engine: num_pages={num_pages} max_running={max_running} host_pages={host_pages} ttl={ttl}")

    def tick(self) -> None:
        """One pass of StreamingEngine's loop: age idle caches, step if there is work (a failed step fails
        its requests, as the loop does; any other exception is a dead engine and fails the test)."""
        self.core.age_caches()
        if self.core.has_work():
            armed = self.core.runner.armed
            try:
                self.core.step()
            except RuntimeError as exc:
                if not armed or self.core.runner.armed or "on purpose" not in str(exc):
                    raise
                self.failed_on_purpose += 1
                self.core.fail_all(f"engine step failed: {exc}")
        self.tick_no += 1
        self.follow_starts()
        self.collect_finished()

    def follow_starts(self) -> None:
        """Requests that started this tick: a rebuilt cache is the reference over the retained ids."""
        for req_id, rebuilt, retained, sinks, seen in self.core.started:
            turn = next(t for t in self.turns.values() if t.req.id == req_id)
            turn.seen_at_start = seen
            sid = turn.req.session_id
            if rebuilt or seen == 0 or sid not in self.refs:
                assert rebuilt or seen == 0, f"{sid}: no reference and not rebuilt"
                self.refs[sid] = ReferenceStream(tiny_model(), sinks, W, retained if rebuilt else [])
        self.core.started.clear()

    def collect_finished(self) -> None:
        for sid, turn in list(self.turns.items()):
            if turn.final is None:
                continue
            del self.turns[sid]
            self.check_result(turn)

    # ---- results against the reference ---------------------------------------------------------
    def check_result(self, turn: Turn) -> None:
        req, final = turn.req, turn.final
        sid, session = req.session_id, self.core.sessions.get(req.session_id)
        assert sum(ev.finish_reason is not None for ev in turn.events) == 1, "one final event per request"
        label(f"{req.kind} ended {final.finish_reason}")
        if turn.cancelled_at is not None:
            assert final.finish_reason in ("cancelled", "error"), (req.kind, final.finish_reason)
        if turn.seen_at_start is None:  # never started: the session's cache and ids are as they were
            return
        stream = req.new_ids + req.output_ids
        seen = session.tokens_seen - turn.seen_at_start
        assert 0 <= seen <= len(stream)
        if req.kind == "reprefill" and final.finish_reason == "stop":
            assert self.core.snapshot(sid) == turn.snapshot, f"{sid}: restored, but not as snapshotted"
        if final.finish_reason not in ("stop", "length") or req.kind == "reprefill":
            if final.finish_reason == "error" or session.needs_reprefill:
                self.refs.pop(sid, None)  # its next turn rebuilds from the retained ids
            else:
                self.refs[sid].feed(stream[:seen])
            return
        assert seen == len(stream), f"{sid}: a finished {req.kind} saw {seen} of {len(stream)} ids"
        if req.kind == "score":
            self.assert_close(self.refs[sid].feed(req.new_ids), final.logprobs, sid)
        else:  # each token's log-prob against the reference's probability of that same token
            ref = self.refs[sid]
            ref.feed(req.new_ids)
            got = [ev.logprob for ev in turn.events if ev.token_id is not None]
            self.assert_close(ref.feed(req.output_ids), got, sid)

    @staticmethod
    def assert_close(want, got, sid) -> None:
        assert len(want) == len(got), (sid, len(want), len(got))
        for i, (w, g) in enumerate(zip(want, got)):
            assert (w is None) == (g is None), (sid, i, w, g)
            assert w is None or abs(w - g) <= TOLERANCE, f"{sid}: log-prob {i} is {g}, the reference says {w}"

    # ---- clients ---------------------------------------------------------------------------------
    def submit(self, req: Request, action) -> None:
        turn = Turn(req, self.tick_no)
        req.emit = turn.events.append
        busy = req.session_id in self.turns
        try:
            action(req)
        except SessionBusyError:
            assert busy, f"{req.session_id} refused as busy with nothing in flight"
            return
        assert not busy, f"{req.session_id} accepted a second request"
        self.turns[req.session_id] = turn

    def new_ids(self, n: int, seed: int, pinned: bool) -> list[int]:
        body = [(seed * 37 + i * 11) % 200 for i in range(n)]
        return SYSTEM + body if pinned else body

    @rule(sid=st.sampled_from(SESSIONS), n=st.integers(1, 20), seed=st.integers(0, 50), pinned=st.booleans())
    def score(self, sid, n, seed, pinned):
        req = Request(f"r{next(self.ids)}", sid, "score", self.new_ids(n, seed, pinned), None,
                      pinned_tokens=MAX_PIN if pinned else 0)
        self.submit(req, self.core.submit)

    @rule(sid=st.sampled_from(SESSIONS), n=st.integers(1, 20), seed=st.integers(0, 50), pinned=st.booleans(),
          max_tokens=st.integers(1, 6))
    def generate(self, sid, n, seed, pinned, max_tokens):
        req = Request(f"r{next(self.ids)}", sid, "generate", self.new_ids(n, seed, pinned), None,
                      sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      pinned_tokens=MAX_PIN if pinned else 0)
        self.submit(req, self.core.submit)

    @rule(sid=st.sampled_from(SESSIONS), n=st.integers(1, 12))
    def refused(self, sid, n):
        """A first turn pinning more than max_pinned_tokens is refused with a typed error and changes nothing
        (a later turn's pin is ignored: pinning applies to a session's first turn only)."""
        s = self.core.sessions.get(sid)
        first = s is None or not (s.tokens_seen or s.needs_reprefill)
        before = None if s is None else s.snapshot()
        req = Request(f"r{next(self.ids)}", sid, "score", self.new_ids(n + 2, 0, True), None,
                      pinned_tokens=MAX_PIN + 1)
        if not first or sid in self.turns:
            return self.submit(req, self.core.submit)
        with pytest.raises(InvalidRequestError, match="max_pinned_tokens"):
            self.core.submit(req)
        after = self.core.sessions.get(sid)
        assert (None if after is None else after.snapshot()) == before, f"{sid} changed by a refused turn"

    @rule(sids=st.lists(st.sampled_from(SESSIONS), min_size=2, max_size=5, unique=True), n=st.integers(1, 12))
    def burst(self, sids, n):
        """Next turns of several sessions at once, before any step (the stall of issue 29 #2)."""
        for i, sid in enumerate(sids):
            self.score(sid, n, i, pinned=False)

    @rule(data=st.data(), steps_first=st.integers(0, 3))
    def cancel(self, data, steps_first):
        """A client goes away after a few steps: its request may be waiting, prefilling, decoding or rebuilding."""
        for _ in range(steps_first):
            self.tick()
        live = sorted(sid for sid, t in self.turns.items() if t.cancelled_at is None)
        if live:
            self.cancel_now(data.draw(st.sampled_from(live)))

    def cancel_now(self, sid: str) -> None:
        turn = self.turns[sid]
        label(f"cancel {turn.req.kind} while {turn.req.phase}")
        turn.cancelled_at = self.tick_no
        self.core.abort(turn.req.id)
        self.tick()  # it ends at the next step, whatever its phase
        assert turn.final is not None, f"{turn.req.id} cancelled while {turn.req.phase} did not end at the next step"

    @rule(n=st.integers(1, 6))
    def step(self, n):
        for _ in range(n):
            self.tick()

    @rule()
    def drain(self):
        start = self.tick_no
        while self.core.has_work():
            self.tick()
            assert self.tick_no - start <= BOUND_TICKS, f"no progress: {self.describe()}"

    # ---- sessions ----------------------------------------------------------------------------------
    @rule(sid=st.sampled_from(SESSIONS))
    def drop(self, sid):
        known = sid in self.core.sessions
        try:
            dropped = self.core.drop(sid)
        except SessionBusyError:
            assert sid in self.turns
            return
        assert sid not in self.turns and dropped == known
        self.refs.pop(sid, None)

    @rule(sid=st.sampled_from(SESSIONS))
    def snapshot_restore(self, sid):
        session = self.core.sessions.get(sid)
        if session is None or sid in self.turns:
            return
        snap = self.core.snapshot(sid)
        req = Request(f"r{next(self.ids)}", sid, "reprefill", [], None)
        self.submit(req, lambda r: self.core.restore(r, snap))
        self.turns[sid].snapshot = snap
        self.refs.pop(sid, None)  # the restored session rebuilds from the snapshot's ids

    @rule(sid=st.sampled_from(SESSIONS))
    def evict(self, sid):
        """An idle session leaves the pool as page pressure would take it: to the host tier, else dropped."""
        s = self.core.sessions.get(sid)
        if s is None or s.admitted or not s.table.pages or s.needs_reprefill:
            return
        self.core.scheduler.evict_session(s)
        if s.needs_reprefill:
            self.refs.pop(sid, None)

    @rule(seconds=st.sampled_from([1.0, 20.0, 40.0]))
    def idle(self, seconds):
        """Time passes with the engine idle or busy: sessions idle past idle_cache_ttl_s give pages back."""
        self.clock.now += seconds
        self.core.age_caches()
        for sid, s in self.core.sessions.items():
            if s.needs_reprefill and sid not in self.turns:
                self.refs.pop(sid, None)

    @rule(now=st.integers(0, 3))
    def fail_a_step(self, now):
        """The next step that runs the model raises (rarely: failed steps end every request in flight)."""
        self.core.runner.armed = now == 0

    # ---- invariants ----------------------------------------------------------------------------------
    @invariant()
    def progress(self):
        if not hasattr(self, "core"):
            return
        for turn in self.turns.values():
            waited = self.tick_no - turn.submitted_at
            assert waited <= BOUND_TICKS, f"{turn.req.id} waited {waited} steps: {self.describe()}"

    @invariant()
    def pages_add_up(self):
        if hasattr(self, "core"):
            check_pages(self.core)
            check_host_tier(self.core)
            check_flags(self.core)

    def check(self) -> None:
        """The invariants, for a regression test replaying rules outside hypothesis."""
        self.progress()
        self.pages_add_up()

    def describe(self) -> str:
        sch = self.core.scheduler
        return (f"waiting={[r.id for r in sch.waiting]} running={[(r.id, r.phase) for r in sch.running]} "
                f"free={len(self.core.cache.free)} leaving={self.core.host.pages_leaving()}")


def check_pages(core: EngineCore) -> None:
    """Every pool page is in exactly one place: a session's table (a pinned region's shared pages once),
    the free list, or on its way to the host tier; and the admitted turns' reservations fit."""
    cache, owner = core.cache, {}
    tables = {key: 0 for key in cache.pinned.regions}
    for sid, s in core.sessions.items():
        t = s.table
        if t.pinned_hash is not None:
            region = cache.pinned.regions[t.pinned_hash]
            assert t.sink_pages == region.pages, f"{sid}: sink pages are not its region's"
            tables[t.pinned_hash] += 1
        for p in t.sink_pages:
            key = ("pinned", t.pinned_hash) if t.pinned_hash else ("session", sid)
            assert owner.setdefault(p, key) == key, f"page {p} is {owner[p]}'s and {key}'s"
        for p in t.window_pages:
            assert owner.setdefault(p, ("session", sid)) == ("session", sid), f"page {p}: {owner[p]} and {sid}"
        # a session to rebuild holds no pages (eviction passes over it), but in its turn's start (a shared
        # pinned region attached, nothing fed yet)
        assert not (s.needs_reprefill and t.pages) or s.admitted, f"{sid} holds pages it is to rebuild"
    assert tables == {k: r.tables for k, r in cache.pinned.regions.items()}, "pinned regions' table counts"
    free = list(cache.free)
    leaving = [p for _, pages in core.host.leaving for p in pages]
    places = list(owner) + free + leaving
    assert sorted(places) == list(range(cache.num_pages)), (
        f"pages: {len(owner)} used + {len(free)} free + {len(leaving)} leaving != {cache.num_pages} (or twice)")
    sch = core.scheduler
    owed = sum(sch.reserve_of(s) - s.table.pages for s in (core.sessions[r.session_id] for r in sch.running))
    assert owed <= len(free) + len(leaving), f"admitted turns may need {owed} pages, {len(free)} free"


def check_host_tier(core: EngineCore) -> None:
    host = core.host
    pages = list(host.free) + [p for e in host.entries.values() for p in e.pages]
    assert sorted(pages) == list(range(host.num_pages)), "host pages: free + held != total (or twice)"
    for sid, entry in host.entries.items():
        s = core.sessions.get(sid)
        assert s is entry.session, f"host tier holds {sid}, which the engine does not know as such"
        assert not s.table.pages and not s.needs_reprefill, f"{sid} both in the host tier and not"


def check_flags(core: EngineCore) -> None:
    sch = core.scheduler
    queued = {r.session_id for r in sch.waiting}
    admitted = {r.session_id for r in sch.running}
    assert not queued & admitted and len(sch.running) <= sch.max_running
    for sid, s in core.sessions.items():
        assert s.running == (sid in queued | admitted), f"{sid}: running={s.running}"
        assert s.admitted == (sid in admitted), f"{sid}: admitted={s.admitted}"
        # between turns a session's cache continues with its pending id, or is rebuilt from its retained ids
        assert s.running or not s.tokens_seen or s.pending is not None or s.needs_reprefill, f"{sid} lost its pending id"


@pytest.fixture
def one_thread():
    """The tiny model's ops are too small for threads; on a loaded 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
