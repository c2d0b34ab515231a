"""What the engine publishes after each step for routing, autoscaling, metrics and health.

The engine thread builds a fresh, immutable `EngineView` after every step (and
after queued calls ran); readers on other threads take the current one without
waiting for the engine, whatever step is running.
"""
from __future__ import annotations

from dataclasses import dataclass

import time

from .core import EngineCore
from .idle_cache import live_weight


@dataclass(frozen=True)
class EngineStats:
    pages_total: int
    pages_free: int
    pages_used: int
    pages_evictable: int  # held by idle sessions: LRU eviction can free them
    pages_live: int       # needed now: running sessions' pages, idle ones' weighted by age (idle_cache.live_weight)
    pages_to_admit: int   # free pages (after eviction) a session needs to start a turn
    sessions_resident: int
    sessions_known: int
    sessions_running: int
    queue_depth: int
    evictions: int
    reprefills: int
    tokens_generated: int


@dataclass(frozen=True)
class EngineView:
    stats: EngineStats
    resident: tuple[str, ...]  # sessions holding cache pages or running


def view_of(core: EngineCore) -> EngineView:
    """One pass over the sessions (engine thread only)."""
    resident, with_pages, evictable, running, live = [], 0, 0, 0, 0.0
    now, ttl = time.monotonic(), core.config.idle_cache_ttl_s
    for sid, s in core.sessions.items():
        if s.table.pages or s.running:
            resident.append(sid)
        with_pages += bool(s.table.pages)
        if s.running:
            running += 1
            live += s.table.pages
        elif s.table.pages:
            evictable += s.table.pages
            live += s.table.pages * live_weight(now - s.last_used, ttl)
    cache, sched = core.cache, core.scheduler
    stats = EngineStats(
        pages_total=cache.num_pages, pages_free=len(cache.free), pages_used=cache.num_pages - len(cache.free),
        pages_evictable=evictable, pages_live=round(live), pages_to_admit=sched.reserve,
        sessions_resident=with_pages,
        sessions_known=len(core.sessions), sessions_running=running, queue_depth=len(sched.waiting),
        evictions=sched.evictions, reprefills=core.reprefills, tokens_generated=core.tokens_generated)
    return EngineView(stats, tuple(resident))
