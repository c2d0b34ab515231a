"""Admission (page reservation, LRU eviction of idle sessions) and per-step batch selection.

Eviction moves an idle session's pages to the host tier (engine/host_tier.py) when it has
room, else drops them (the session keeps its ids and re-prefills them on its next turn).

Every admitted request reserves the most pages its session can need, so a
running request never meets a full pool mid-turn: new work waits instead.

Admission is first come, first served, as vLLM's and SGLang's schedulers are: the head of the
queue waits while the pool (after evicting every session that is not admitted, queued ones
included) cannot hold its reservation, and only admitted turns, which always end, or pages
coming back from a host-tier copy, can make that room. So the head never waits on a request
behind it, and a turn that can never fit is refused at submit (`can_ever_fit`, pinned sizes).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from .cache import SinkWindowCache, running_pages
from .host_tier import HostTier
from .request import Request
from .session import Session


class Scheduler:
    def __init__(self, cache: SinkWindowCache, max_batch_tokens: int, max_running: int, host: HostTier):
        self.cache, self.host = cache, host
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.reserve = running_pages(cache.S, cache.W, cache.P, max_batch_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.evictions = 0
        self.finished = 0  # requests ended, for any reason

    def can_ever_fit(self) -> bool:
        return self.reserve <= self.cache.num_pages

    # ---- the queues: waiting (FIFO) -> running -> finished ----------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def requests(self) -> list[Request]:
        return list(self.waiting) + self.running

    def abort(self, request_id: str | None = None) -> None:
        """Mark one request (or, with None, every request) aborted; it ends at the next step."""
        for req in self.requests():
            if request_id is None or req.id == request_id:
                req.aborted = True

    def take_aborted(self) -> list[Request]:
        """Aborted requests, waiting ones removed from the queue (running ones leave through finish)."""
        gone = [r for r in self.waiting if r.aborted]
        self.waiting = deque(r for r in self.waiting if not r.aborted)
        return gone + [r for r in self.running if r.aborted]

    def take_all(self) -> list[Request]:
        """Every queued request, waiting ones removed (a failed step ends them all)."""
        everything = self.requests()
        self.waiting.clear()
        return everything

    def finish(self, req: Request, session: Session) -> None:
        if req in self.running:
            self.running.remove(req)
        session.admitted = False
        self.finished += 1

    def admit(self, sessions: "OrderedDict[str, Session]") -> list[Request]:
        """Move waiting requests to running while pages (after LRU eviction) allow. `sessions`: those
        holding pages or running (EngineCore.with_pages), least recently used first."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            session = sessions[req.session_id]
            if not self._make_room(self.reserve_of(session) - session.table.pages, sessions, session):
                break  # it waits only for admitted turns, which end, or pages on their way back from a copy
            self.waiting.popleft()
            self.running.append(req)
            session.admitted = True
            admitted.append(req)
        return admitted

    def reserve_of(self, session: Session) -> int:
        """Pages a running session may need: `reserve`, or more with a pinned region longer than S."""
        if session.S == self.cache.S:
            return self.reserve
        return running_pages(session.S, self.cache.W, self.cache.P, self.max_batch_tokens)

    def _outstanding(self, sessions) -> int:
        return sum(self.reserve_of(s) - s.table.pages for s in (sessions[r.session_id] for r in self.running))

    def _make_room(self, need: int, sessions: "OrderedDict[str, Session]", for_session: Session) -> bool:
        """Evict until the pages are free, counting pages still being copied to the host tier as
        coming (no more evictions for them); False while they are not all back yet. Any session not
        admitted is a victim, a queued one too: its turn rebuilds or reloads its pages when admitted,
        where keeping them could stall the queue's head for ever (it waits for room they hold)."""
        while len(self.cache.free) + self.host.pages_leaving() - self._outstanding(sessions) < need:
            victim = next((s for s in sessions.values() if s is not for_session and not s.admitted
                           and s.table.pages and not s.needs_reprefill), None)
            if victim is None:
                return False
            self.evict_session(victim)  # least recently used first: `sessions` is LRU-ordered
        return len(self.cache.free) - self._outstanding(sessions) >= need

    def evict_session(self, session: Session) -> None:
        """Take an idle session's pages from the pool: to the host tier when it can hold them (the
        sessions it drops for room fall to ids only), else released (its next turn re-prefills its
        retained ids). The one place pages of an idle session leave the GPU (page pressure, and any
        later policy)."""
        if not self.host.offload(session):
            self.cache.release(session.table)
            session.needs_reprefill = True
        self.evictions += 1

    def select(self) -> list[tuple[Request, int]]:
        """(request, tokens this step): all decodes first, then prefill chunks under the budget."""
        budget = self.max_batch_tokens
        batch = []
        running = [r for r in self.running if self.host.arrived(r.session_id)]  # not while pages arrive
        for req in running:
            if req.phase == "decode" and budget > 0:
                batch.append((req, 1))
                budget -= 1
        for req in running:
            if req.phase == "prefill" and budget > 0 and req.remaining > 0:
                n = min(req.remaining, budget)
                batch.append((req, n))
                budget -= n
        return batch
