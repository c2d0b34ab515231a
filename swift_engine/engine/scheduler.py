"""Admission (page reservation, LRU eviction of idle sessions) and per-step batch selection.

Every admitted request reserves the most pages its session can need, so a
running request never meets a full pool mid-turn: new work waits instead.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from .cache import SinkWindowCache, running_pages
from .request import Request
from .session import Session


class Scheduler:
    def __init__(self, cache: SinkWindowCache, max_batch_tokens: int, max_running: int):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.reserve = running_pages(cache.S, cache.W, cache.P, max_batch_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.evictions = 0

    def can_ever_fit(self) -> bool:
        return self.reserve <= self.cache.num_pages

    def admit(self, sessions: "OrderedDict[str, Session]") -> list[Request]:
        """Move waiting requests to running while pages (after LRU eviction) allow."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            table = sessions[req.session_id].table
            if not self._make_room(self.reserve - table.pages, sessions):
                break
            self.waiting.popleft()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _outstanding(self, sessions) -> int:
        return sum(self.reserve - sessions[r.session_id].table.pages for r in self.running)

    def _make_room(self, need: int, sessions: "OrderedDict[str, Session]") -> bool:
        while len(self.cache.free) - self._outstanding(sessions) < need:
            victim = next((s for s in sessions.values()
                           if not s.running and s.table.pages and not s.needs_rebuild), None)
            if victim is None:
                return False
            self.cache.release(victim.table)  # least recently used first: `sessions` is LRU-ordered
            victim.needs_rebuild = True
            self.evictions += 1
        return True

    def select(self) -> list[tuple[Request, int]]:
        """(request, tokens this step): all decodes first, then prefill chunks under the budget."""
        budget = self.max_batch_tokens
        batch = []
        for req in self.running:
            if req.phase == "decode" and budget > 0:
                batch.append((req, 1))
                budget -= 1
        for req in self.running:
            if req.phase == "prefill" and budget > 0 and req.remaining > 0:
                n = min(req.remaining, budget)
                batch.append((req, n))
                budget -= n
        return batch
