"""Bounds on idle sessions: those holding no cache pages, only their retained ids (about S + W ints).

Without a bound a replica's host memory grows with every conversation it has
ever seen. A forgotten session is no loss: the server rebuilds it from the
store on its next turn, exactly as after a failover.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .session import Session

CHECK_EVERY_S = 1.0  # the age bound is checked at most this often (the count bound on every new session)


class IdleBound:
    def __init__(self, max_idle_sessions: int, idle_session_ttl_s: float):
        self.max_idle, self.ttl = max_idle_sessions, idle_session_ttl_s
        self.checked_at = time.monotonic()
        self.forgotten = 0
        self.gone: list[str] = []  # forgotten since the engine process last told its front end

    def trim(self, sessions: "OrderedDict[str, Session]", ids_only: int, keep: str,
             in_host: Callable[[str], bool]) -> None:
        """Forget idle sessions past the count bound (`ids_only`: those known without pages or a host
        copy) and those idle longer than the age bound, least recently used first (`sessions` is
        LRU-ordered); never `keep` (being submitted), nor one in the host tier (bounded by its bytes;
        it falls to ids only from there). A caller that believed a forgotten session known learns it
        from its submit (Request.require_session: UnknownSessionError) and restores it. The walk stops at the first it keeps: it costs what it forgets, not what is known."""
        now = time.monotonic()
        if ids_only <= self.max_idle and now - self.checked_at < CHECK_EVERY_S:
            return
        self.checked_at = now
        excess, gone = ids_only - self.max_idle, []
        for sid, s in sessions.items():
            if sid == keep or s.running or s.table.pages or in_host(sid):
                continue
            if excess <= 0 and now - s.last_used <= self.ttl:
                break  # the rest were used more recently
            gone.append(sid)
            excess -= 1
        for sid in gone:
            del sessions[sid]
        self.forgotten += len(gone)
        self.gone += gone
