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
    pages_evictable: int  # held by idle sessions (LRU eviction can free them) or on their way to the host tier
    pages_live: int       # needed now: running sessions' pages, idle ones' weighted by age (idle_cache.live_weight)
    pages_to_admit: int   # free pages (after eviction) a session needs to start a turn
    sessions_resident: int  # tiers (engine/host_tier.py): cache pages in the pool,
    sessions_host: int      # pages copied to the host tier,
    sessions_ids_only: int  # retained ids only (re-prefilled on their next turn)
    sessions_known: int
    sessions_running: int
    queue_depth: int
    evictions: int  # sessions whose pages left the pool: offloaded to the host tier or dropped
    offloads: int   # ... of them to the host tier
    reloads: int    # host tier -> pool, instead of a re-prefill
    host_drops: int  # host tier full: its least recently offloaded session fell to ids only
    host_cache_bytes_used: int
    host_cache_bytes_total: int
    pages_shared: int     # pages sessions would hold on top without sharing pinned regions (engine/pinned.py)
    reprefills: int
    tokens_generated: int


@dataclass(frozen=True)
class EngineView:
    stats: EngineStats
    resident: tuple[str, ...]  # sessions holding cache pages or running
    held: tuple[str, ...]      # those and the sessions in the host tier (cheap to resume here)
    pinned: tuple[str, ...]    # content hashes (pinned_hash) of the pinned regions held


def view_of(core: EngineCore) -> EngineView:
    """One pass over the sessions holding pages or running (engine thread only): ids-only ones are
    counted, not walked (a replica knows up to max_idle_sessions of them)."""
    sessions = core.with_pages()
    resident, with_pages, evictable, running, live = list(sessions), 0, 0, 0, 0.0
    now, ttl, host = time.monotonic(), core.config.idle_cache_ttl_s, core.host
    for s in sessions.values():
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
        pages_evictable=evictable + host.pages_leaving(), pages_live=round(live), pages_to_admit=sched.reserve,
        sessions_resident=with_pages, sessions_host=len(host.entries),
        sessions_ids_only=len(core.sessions) - with_pages - len(host.entries),
        sessions_known=len(core.sessions), sessions_running=running, queue_depth=len(sched.waiting),
        evictions=sched.evictions, offloads=host.offloads, reloads=host.reloads, host_drops=host.drops,
        host_cache_bytes_used=host.bytes_used, host_cache_bytes_total=host.num_pages * host.page_bytes,
        pages_shared=cache.pinned.pages_saved(), reprefills=core.reprefills, tokens_generated=core.tokens_generated)
    held = tuple(dict.fromkeys((*resident, *host.entries)))  # a queued turn may still be in the host tier
    return EngineView(stats, tuple(resident), held, tuple(cache.pinned.regions))
