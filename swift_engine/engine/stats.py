"""What the engine publishes after each step for routing, autoscaling, metrics and health.

The engine thread builds a fresh, immutable `EngineView` after every step (and
after queued calls ran); readers on other threads take the current one without
waiting for the engine, whatever step is running.
"""
from __future__ import annotations

from dataclasses import dataclass

from .core import EngineCore


@dataclass(frozen=True)
class EngineStats:
    pages_total: int
    pages_free: int
    pages_used: int
    pages_evictable: int  # held by idle sessions: LRU eviction can free them
    pages_to_admit: int   # free pages (after eviction) a session needs to start a turn
    sessions_resident: int
    sessions_known: int
    sessions_running: int
    queue_depth: int
    evictions: int
    pages_shared: int     # pages sessions would hold on top without sharing pinned regions (engine/pinned.py)
    reprefills: int
    tokens_generated: int


@dataclass(frozen=True)
class EngineView:
    stats: EngineStats
    resident: tuple[str, ...]  # sessions holding cache pages or running
    pinned: tuple[str, ...]    # content hashes (pinned_hash) of the pinned regions held


def view_of(core: EngineCore) -> EngineView:
    """One pass over the sessions (engine thread only)."""
    resident, with_pages, evictable, running = [], 0, 0, 0
    for sid, s in core.sessions.items():
        if s.table.pages or s.running:
            resident.append(sid)
        with_pages += bool(s.table.pages)
        if s.running:
            running += 1
        else:
            evictable += s.table.pages
    cache, sched = core.cache, core.scheduler
    stats = EngineStats(
        pages_total=cache.num_pages, pages_free=len(cache.free), pages_used=cache.num_pages - len(cache.free),
        pages_evictable=evictable, pages_to_admit=sched.reserve,
        sessions_resident=with_pages,
        sessions_known=len(core.sessions), sessions_running=running, queue_depth=len(sched.waiting),
        evictions=sched.evictions, pages_shared=cache.pinned.pages_saved(), reprefills=core.reprefills, tokens_generated=core.tokens_generated)
    return EngineView(stats, tuple(resident), tuple(cache.pinned.regions))
