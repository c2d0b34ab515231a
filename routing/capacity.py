"""One definition of a replica's capacity, for the router (where a new session goes) and the autoscaling
policy (how many replicas are needed): both read the same routing stats fields through this one function.

Fields (see routing.affinity for the whole stats contract):
    "free_pages": int      # pages no session holds
    "live_pages": int      # pages needed now: running sessions', idle ones' weighted by age
    "total_pages": int, "min_free_pages": int  # pool size; pages a new session needs (default 1)

Pages of idle sessions are not free for placing a new session: taking them evicts a conversation
that may come back (a re-prefill). Once idle sessions age out (engine idle_cache_ttl_s) their pages
are free again, and they no longer count as live.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Capacity:
    room: int | None  # new sessions that fit in free pages; None: not reported yet (a replica just started)
    occupancy: float  # live pages / total pages: the autoscaling load of the replica

    @property
    def full(self) -> bool:
        """Placing a new session here would evict someone else's cache."""
        return self.room == 0


def capacity(stats: Mapping[str, Any]) -> Capacity:
    if "free_pages" not in stats:
        return Capacity(room=None, occupancy=0.0)
    total = int(stats.get("total_pages", 0))
    room = int(stats["free_pages"]) // max(1, int(stats.get("min_free_pages", 1)))
    return Capacity(room=room, occupancy=int(stats.get("live_pages", 0)) / total if total > 0 else 0.0)
