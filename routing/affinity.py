"""Session-affinity routing decisions, as pure functions of plain data.

Routers run in every proxy and ingress replica and share no state, so they can
only agree if the decision is a deterministic function of what each of them
sees: the session id, the candidate replica ids and the replicas' last
reported stats. Nothing here imports Ray; `routing.router` adapts Ray's API.

Stats contract (what a replica returns from `record_routing_stats`):
    {"replica_id": str,        # serve.get_replica_context().replica_id.unique_id
     "free_pages": int,        # pages no session holds (idle sessions' pages are not free)
     "live_pages": int,        # pages needed now (routing.capacity: the autoscaling load)
     "total_pages": int,
     "running": int, "max_running": int,
     "resident": int,          # sessions whose cache pages the replica holds
     "host": int,              # optional: sessions whose pages sit in its host tier (use no pages)
     "sessions": list[int],    # pack_sessions(...) of both: they resume there without a re-prefill
     "epochs": list[int],      # optional: pack_epochs(...), aligned with "sessions"
     "min_free_pages": int,    # optional: pages a new session needs (default 1)
     "pinned": list[str]}      # optional: pinned_key(...) of the pinned regions it holds

Epochs are the ownership epochs of the replica's copies (the store's claim
counter; any per-session counter that grows on every move will do). When a
session moved, the old replica's stale copy lingers until fencing drops it;
the higher epoch tells the routers which copy is live.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mmh3

from routing.capacity import capacity

# Part of the wire format: replicas pack with it, routers look up with it, and
# every HRW weight depends on it. Changing it remaps every session in a fleet.
_SEED = 0x5EED_CAC4


class Kind(str, enum.Enum):
    """Why a replica was (or was not) chosen; also the metric tag value."""

    OWNER = "owner"  # a live replica holds the session's cache
    RING = "ring"  # nobody holds it: rendezvous-hash successor
    FALLBACK = "fallback"  # no session id: least loaded
    BACKOFF = "backoff"  # the holder is busy: wait for it, moving costs a re-prefill


@dataclass(frozen=True)
class Candidate:
    """A routable replica as the router sees it."""

    replica_id: str
    stats: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """Replicas to try, most preferred first.

    For BACKOFF it names the busy holder being waited for; route nothing now.
    """

    kind: Kind
    replica_ids: tuple[str, ...]


def session_key(session_id: str) -> int:
    """Stable 64-bit key of a session id (Python's hash() is salted per process)."""
    return mmh3.hash64(session_id.encode(), seed=_SEED, signed=False)[0]


def pack_sessions(session_ids: Iterable[str]) -> list[int]:
    """Compact, JSON-able set of session ids: their distinct keys, sorted for bisect."""
    return sorted({session_key(s) for s in session_ids})


def pack_epochs(epochs: Mapping[str, int]) -> list[int]:
    """Epochs of `pack_sessions(epochs)`, in the same order (session id -> epoch)."""
    by_key: dict[int, int] = {}
    for session_id, epoch in epochs.items():
        key = session_key(session_id)
        by_key[key] = max(epoch, by_key.get(key, epoch))
    return [by_key[k] for k in sorted(by_key)]


def held_epoch(stats: Mapping[str, Any], session_id: str) -> int | None:
    """Epoch of the replica's copy of the session (0 if not reported), or None."""
    keys = stats.get("sessions") or []
    key = session_key(session_id)
    i = bisect.bisect_left(keys, key)
    if i == len(keys) or keys[i] != key:
        return None
    epochs = stats.get("epochs") or []
    return int(epochs[i]) if len(epochs) == len(keys) else 0


def pinned_key(model: str, messages: Sequence[Mapping[str, str]]) -> str | None:
    """Content key of the system prompt a new chat session pins (its leading system messages), or None.
    The ingress puts it on the request; a replica reports the keys of the pinned regions it holds."""
    system = [[m["role"], m["content"]] for m in itertools.takewhile(lambda m: m["role"] == "system", messages)]
    if not system:
        return None
    return hashlib.sha256(json.dumps([model, system]).encode()).hexdigest()[:32]


def hrw_weight(session_id: str, replica_id: str) -> int:
    """Rendezvous weight of a replica for a session: the highest weight wins."""
    return mmh3.hash64(
        f"{replica_id}\x00{session_id}".encode(), seed=_SEED, signed=False
    )[0]


def rendezvous_order(session_id: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids by descending HRW weight (ties by id, so the order is total)."""
    return sorted(
        replica_ids, key=lambda r: (hrw_weight(session_id, r), r), reverse=True
    )


def _usable(c: Candidate) -> Mapping[str, Any]:
    """The candidate's stats, or {} when missing or not its own (e.g. just started).

    Empty stats mean "holds nothing, not full, not busy": a fresh replica is a
    valid ring target and never blocks anyone.
    """
    stats = c.stats or {}
    return stats if stats.get("replica_id") == c.replica_id else {}


def _busy(stats: Mapping[str, Any]) -> bool:
    """Every batch slot is taken (the engine's own limit, not Ray's queue)."""
    if "running" not in stats or "max_running" not in stats:
        return False
    return int(stats["running"]) >= int(stats["max_running"])


def decide(
    session_id: str | None,
    candidates: Sequence[Candidate],
    recent: str | None = None,
    pinned: str | None = None,
) -> Decision:
    """Pick replicas for one request; see DESIGN.md "Routing" for the rules.

    1. A live holder of the session wins: the highest epoch (a stale copy
       may linger elsewhere), ties in HRW order. If it is busy, back off,
       never move. `recent`, the replica this router sent the session to a
       moment ago, counts as a holder while no stats show one: stats lag a
       polling period, and a ring change inside that lag must not move it.
    2. No holder: the HRW-first replica not full (routing.capacity) that
       holds the session's pinned region (`pinned`, a pinned_key), so its
       prompt is not prefilled again; if none does, the HRW-first of the
       roomiest replicas: those not full with room for at least half as
       many new sessions as the replica with the most room, and those not
       reported yet (just started, or stats not here yet: never a reason to
       pile every new session onto them). So a new replica after scale-up
       takes the new sessions, while a burst within one stats period still
       spreads over replicas of similar room. If all are full, the
       HRW-first of all (it must evict). One target only, so that routers
       seeing the same stats place a session on the same replica.
    3. No session id: all replicas, least running first (ties by id).
    """
    if not session_id:
        ranked = sorted(
            candidates, key=lambda c: (int(_usable(c).get("running", 0)), c.replica_id)
        )
        return Decision(Kind.FALLBACK, tuple(c.replica_id for c in ranked))
    if not candidates:
        return Decision(Kind.RING, ())

    by_id = {c.replica_id: _usable(c) for c in candidates}
    order = rendezvous_order(session_id, by_id)
    holders = [
        (e, r) for r in order if (e := held_epoch(by_id[r], session_id)) is not None
    ]
    if not holders and recent in by_id:
        holders = [(0, recent)]
    if holders:
        holder = max(holders, key=lambda h: h[0])[1]  # first max: HRW breaks ties
        kind = Kind.BACKOFF if _busy(by_id[holder]) else Kind.OWNER
        return Decision(kind, (holder,))
    rooms = {r: capacity(by_id[r]).room for r in order}
    warm = [r for r in order if pinned and rooms[r] and pinned in (by_id[r].get("pinned") or ())]
    most = max((room for room in rooms.values() if room is not None), default=0)
    roomiest = [r for r in order if rooms[r] is None or (rooms[r] > 0 and 2 * rooms[r] >= most)]
    return Decision(Kind.RING, ((warm or roomiest or order)[0],))
