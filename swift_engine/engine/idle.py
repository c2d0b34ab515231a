"""Bounds on idle sessions: those holding no cache pages, only their retained ids (about S + W ints).

Without a bound a replica's host memory grows with every conversation it has
ever seen. A forgotten session is no loss: the server rebuilds it from the
store on its next turn, exactly as after a failover.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from .session import Session

CHECK_EVERY_S = 1.0  # the age bound is checked at most this often (the count bound on every new session)
HOLD_S = 30.0  # a session a caller was told is known is not forgotten for this long (its turn is on the way)


class IdleBound:
    def __init__(self, max_idle_sessions: int, idle_session_ttl_s: float):
        self.max_idle, self.ttl = max_idle_sessions, idle_session_ttl_s
        self.checked_at = time.monotonic()
        self.forgotten = 0
        # short, never across a step: a caller's "known? then hold" and the engine thread's trim exclude
        # each other, so a session is never forgotten between a caller seeing it and its turn arriving
        self.lock = threading.Lock()

    def hold(self, sessions: "OrderedDict[str, Session]", session_id: str) -> bool:
        """Whether the session is known; if it is, it is kept for HOLD_S (called from any thread)."""
        with self.lock:
            session = sessions.get(session_id)
            if session is not None:
                session.held_until = time.monotonic() + HOLD_S
            return session is not None

    def trim(self, sessions: "OrderedDict[str, Session]", keep: str, in_host: Callable[[str], bool]) -> None:
        """Forget idle sessions past the count bound (least recently used first: `sessions` is
        LRU-ordered) and those idle longer than the age bound; never `keep` (being submitted) nor
        a held one (so the count may be exceeded by sessions whose turn is on its way), nor one in
        the host tier (bounded by its bytes; it falls to ids only from there)."""
        now = time.monotonic()
        if len(sessions) <= self.max_idle and now - self.checked_at < CHECK_EVERY_S:
            return
        self.checked_at = now
        with self.lock:
            idle = [sid for sid, s in sessions.items()
                    if sid != keep and not s.running and not s.table.pages and s.held_until < now
                    and not in_host(sid)]
            excess = len(idle) - self.max_idle
            for i, sid in enumerate(idle):
                if i < excess or now - sessions[sid].last_used > self.ttl:
                    del sessions[sid]
                    self.forgotten += 1
