"""Idle caches age out of the pool: a resident session idle longer than `idle_cache_ttl_s` gives its pages back.

Without it a replica stays as full as its busiest moment: OpenAI-style clients never delete a
conversation, so its pages would stay until page pressure evicts them, and autoscaling, which
counts pages, would never scale down. The session keeps its retained ids (the store keeps its
record), so its next turn rebuilds the cache; Scheduler.evict_session is the one way out.
"""
from __future__ import annotations

from collections import OrderedDict

from .scheduler import Scheduler
from .session import Session

CHECK_EVERY_S = 1.0  # the engine thread looks at most this often (and wakes this often when idle)


def live_weight(idle_s: float, ttl_s: float | None) -> float:
    """How much of an idle session's pages count as needed now: all of them for the first half of the
    TTL (a conversation idle a little while is likely to come back), then fading linearly to none at
    the TTL, when they are given back; so the autoscaling need falls before the pages leave."""
    if ttl_s is None:
        return 1.0
    return min(1.0, max(0.0, 2.0 * (1.0 - idle_s / ttl_s)))


class CacheAgeing:
    def __init__(self, ttl_s: float | None):
        self.ttl = ttl_s
        self.checked_at = 0.0
        self.aged = 0

    def age(self, sessions: "OrderedDict[str, Session]", scheduler: Scheduler, now: float) -> None:
        """Give back the pages of sessions idle longer than the TTL (engine thread, between steps).

        `sessions` (those holding pages or running) is in submission order, so the walk stops at the
        first idle session still young: cheap at any number of sessions. A turn submitted earlier but
        finished later than its neighbour can hold the neighbour back by at most that turn's length."""
        if self.ttl is None or now - self.checked_at < CHECK_EVERY_S:
            return
        self.checked_at = now
        for s in sessions.values():
            if s.running or not s.table.pages or s.needs_reprefill:
                continue
            if now - s.last_used < self.ttl:
                return
            scheduler.evict_session(s)
            self.aged += 1
