"""One conversation's state on this engine: retained token ids, counters, page table."""
from __future__ import annotations

import hashlib
import json
import time
from collections import deque

from ..errors import InvalidRequestError
from ..outputs import SessionSnapshot
from .cache import PageTable


def chain_digest(digest: str, messages: list[dict]) -> str:
    """Rolling digest of consumed messages: digest(m1..mn) = H(digest(m1..mn-1) + m_n)."""
    for m in messages:
        canon = json.dumps({"role": m["role"], "content": m["content"]}, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256((digest + canon).encode()).hexdigest()
    return digest


class Session:
    """Token ids retained for re-prefilling: the first S (sinks) and the last W after them.

    `pending` is the newest token: seen, but its key/value not yet computed
    (it is fed as the first input of the next step that touches the session).
    """

    def __init__(self, session_id: str, sink_tokens: int, window_tokens: int):
        self.id = session_id
        self.S = sink_tokens  # the engine's S, or P once the session pinned a region (pin())
        self.pinned = False  # the sink region is a pinned region (engine/pinned.py)
        self.sink_ids: list[int] = []
        self.tail_ids: deque[int] = deque(maxlen=window_tokens)
        self.pending: int | None = None
        self.tokens_seen = 0
        self.turns = 0
        self.messages_consumed = 0
        self.messages_digest = ""
        self.open_turn = False
        self.table = PageTable()
        self.needs_reprefill = False  # pages were released: replay retained ids first
        self.running = False  # a turn is queued or admitted: one at a time per session
        self.admitted = False  # its turn was admitted (holds a page reservation): not evictable until it ends
        self.last_used = time.monotonic()

    def pin(self, tokens: int) -> None:
        """Make the first `tokens` ids the session's sink region (P >= S; before it sees any id)."""
        self.S = self.table.sink_cap = tokens
        self.pinned = True

    def see(self, token_id: int) -> None:
        if len(self.sink_ids) < self.S:
            self.sink_ids.append(token_id)
        else:
            self.tail_ids.append(token_id)
        self.tokens_seen += 1

    def retained(self) -> list[int]:
        return self.sink_ids + list(self.tail_ids)

    def replay_prefix(self) -> list[int]:
        """Already-seen ids the next step must feed before new tokens."""
        if self.needs_reprefill:
            return self.retained()
        return [] if self.pending is None else [self.pending]

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            session_id=self.id, sink_ids=list(self.sink_ids), tail_ids=list(self.tail_ids),
            tokens_seen=self.tokens_seen, turns=self.turns, messages_consumed=self.messages_consumed,
            messages_digest=self.messages_digest, open_turn=self.open_turn,
            pinned_tokens=self.S if self.pinned else None)

    @classmethod
    def from_snapshot(cls, snap: SessionSnapshot, sink_tokens: int, window_tokens: int) -> "Session":
        s = cls(snap.session_id, sink_tokens, window_tokens)
        if snap.pinned_tokens:  # the same pinned region, so the same layout and the same shared pages
            s.pin(snap.pinned_tokens)
        s.sink_ids, tail = resplit(snap, s.S, window_tokens)
        s.tail_ids.extend(tail)
        s.tokens_seen, s.turns = snap.tokens_seen, snap.turns
        s.messages_consumed, s.messages_digest = snap.messages_consumed, snap.messages_digest
        s.open_turn = snap.open_turn
        s.needs_reprefill = bool(s.retained())  # with S = 0 there are no sinks, but a window to re-prefill
        return s


def resplit(snap: SessionSnapshot, S: int, W: int) -> tuple[list[int], list[int]]:
    """The snapshot's ids as this engine's layout: the conversation's first S ids (sinks), then its last W.

    A snapshot that kept every id it saw re-splits to any S and W. One with a gap (ids it evicted)
    knows only its own first S' and last W' ids, so it fits an engine with S <= S' and W <= W';
    anything else is refused: mixing two layouts would silently change every later log-prob.
    """
    ids = snap.sink_ids + snap.tail_ids
    gap = snap.tokens_seen - len(ids)
    if gap < 0:
        raise InvalidRequestError(f"snapshot of {snap.session_id!r} holds {len(ids)} ids but saw {snap.tokens_seen}")
    if gap == 0:
        return ids[:S], ids[S:][-W:]
    if S > len(snap.sink_ids) or W > len(snap.tail_ids):
        raise InvalidRequestError(
            f"session {snap.session_id!r} was cached with {len(snap.sink_ids)} sink and {len(snap.tail_ids)} window "
            f"tokens and has evicted {gap}; this engine keeps {S} sink and {W} window tokens, so its cache cannot "
            "be rebuilt exactly (delete the session to start it afresh, or serve it with S and W no larger)")
    return list(snap.sink_ids[:S]), list(snap.tail_ids)[len(snap.tail_ids) - W:]
