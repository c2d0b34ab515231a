"""Pure session-affinity logic (routing.affinity): no Ray needed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from routing.affinity import (
    Candidate,
    Decision,
    Kind,
    decide,
    held_epoch,
    pack_epochs,
    pack_sessions,
    rendezvous_order,
    session_key,
)
from routing.capacity import capacity

REPO = Path(__file__).resolve().parents[1]
SESSIONS = [f"session-{i}" for i in range(2000)]


def stats(
    replica_id: str,
    sessions: Iterable[str] | dict[str, int] = (),
    free_pages: int = 100,
    running: int = 0,
    max_running: int = 8,
    **extra: Any,
) -> dict[str, Any]:
    """Stats as a replica reports them; a dict of sessions also reports epochs."""
    out = {
        "replica_id": replica_id,
        "free_pages": free_pages,
        "total_pages": 100,
        "running": running,
        "max_running": max_running,
        "resident": len(list(sessions)),
        "sessions": pack_sessions(sessions),
        **extra,
    }
    if isinstance(sessions, dict):
        out["epochs"] = pack_epochs(sessions)
    return out


def fresh(*replica_ids: str) -> list[Candidate]:
    """Candidates that have not reported stats yet."""
    return [Candidate(r, {}) for r in replica_ids]


def placement(sessions: Iterable[str], candidates: list[Candidate]) -> dict[str, str]:
    out = {}
    for s in sessions:
        d = decide(s, candidates)
        assert d.kind in (Kind.OWNER, Kind.RING) and len(d.replica_ids) == 1
        out[s] = d.replica_ids[0]
    return out


def _routers_agree(s: str, cands: list[Candidate]) -> Decision:
    """Every router (any candidate order) reaches the same decision."""
    decisions = set()
    for seed in range(6):
        shuffled = cands[:]
        random.Random(seed).shuffle(shuffled)
        decisions.add(decide(s, shuffled))
    assert len(decisions) == 1
    return decisions.pop()


# --- stable hashing --------------------------------------------------------

_CHILD = """
import json
from routing.affinity import Candidate, decide, session_key
ids = ["r-a", "r-b", "r-c", "r-d"]
cands = [Candidate(r, {}) for r in ids]
full_a = [Candidate(r, {"replica_id": r, "free_pages": 0 if r == "r-a" else 9}) for r in ids]
sessions = [f"s{i}" for i in range(300)]
print(json.dumps({
    "keys": [session_key(s) for s in sessions],
    "placement": [decide(s, cands).replica_ids[0] for s in sessions],
    "r-a full": [decide(s, full_a).replica_ids[0] for s in sessions],
}))
"""


def _child_output(salt: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_decisions_identical_across_processes_with_different_hash_salts():
    """Routers live in different processes; Python's hash() would differ there."""
    runs = [_child_output(salt) for salt in ("1", "2", "12345")]
    assert runs[0] == runs[1] == runs[2]
    here = runs[0]
    assert here["keys"] == [session_key(f"s{i}") for i in range(300)]  # and this one
    assert len(set(here["placement"])) == 4  # spreads over all replicas
    # Full r-a: its sessions go to one successor, the same in every process;
    # nobody else moves.
    for before, after in zip(here["placement"], here["r-a full"]):
        assert after == before if before != "r-a" else after != "r-a"


def test_session_key_is_pinned():
    """The key is a wire format shared by replicas and routers: pin it."""
    assert session_key("conversation-42") == session_key("conversation-42")
    assert session_key("a") != session_key("b")
    assert 0 <= session_key("a") < 2**64
    assert session_key("conversation-42") == 15931266621572128788


def test_pack_and_held_epoch_round_trip_through_json():
    held = ["alpha", "beta", "gamma", "beta"]
    st = json.loads(json.dumps(stats("r1", held)))
    assert st["sessions"] == sorted(set(st["sessions"])) and len(st["sessions"]) == 3
    assert all(held_epoch(st, s) is not None for s in held)
    assert not any(held_epoch(st, s) is not None for s in ["delta", "alphA", ""])
    assert held_epoch({}, "alpha") is None


def test_epochs_align_with_sessions_through_json():
    epochs = {f"s{i}": i * 10 for i in range(50)}
    st = json.loads(json.dumps(stats("r1", epochs)))
    assert all(held_epoch(st, s) == e for s, e in epochs.items())
    assert held_epoch(st, "other") is None
    assert held_epoch(stats("r1", ["s1"]), "s1") == 0  # no epochs reported


# --- rendezvous (HRW) ------------------------------------------------------


def test_hrw_adding_a_replica_moves_only_sessions_to_the_new_one():
    before = placement(SESSIONS, fresh("r1", "r2", "r3"))
    after = placement(SESSIONS, fresh("r1", "r2", "r3", "r4"))
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "r4" for s in moved)
    # About 1/4 move (the new replica's fair share), never a reshuffle.
    assert 0.18 < len(moved) / len(SESSIONS) < 0.32


def test_hrw_removing_a_replica_moves_only_its_sessions():
    before = placement(SESSIONS, fresh("r1", "r2", "r3", "r4"))
    after = placement(SESSIONS, fresh("r1", "r2", "r4"))
    for s in SESSIONS:
        if before[s] != "r3":
            assert after[s] == before[s]


def test_order_is_independent_of_candidate_order():
    ids = ["r1", "r2", "r3", "r4", "r5"]
    for s in SESSIONS[:50]:
        shuffled = ids[:]
        random.Random(s).shuffle(shuffled)
        assert rendezvous_order(s, shuffled) == rendezvous_order(s, ids)


# --- holders ---------------------------------------------------------------


def test_holder_wins_over_ring():
    ids = ["r1", "r2", "r3"]
    for s in SESSIONS[:100]:
        ring_choice = rendezvous_order(s, ids)[0]
        holder = next(r for r in ids if r != ring_choice)
        cands = [Candidate(r, stats(r, [s] if r == holder else [])) for r in ids]
        assert decide(s, cands) == Decision(Kind.OWNER, (holder,))


def test_scale_up_with_stats_moves_no_held_session():
    """Adding a replica only moves sessions that have no holder."""
    old = ["r1", "r2", "r3"]
    home = placement(SESSIONS, fresh(*old))
    held = SESSIONS[::2]  # the rest have been evicted
    cands = [Candidate(r, stats(r, [s for s in held if home[s] == r])) for r in old]
    cands.append(Candidate("r4", {}))  # just started: no stats yet
    after = placement(SESSIONS, cands)
    assert all(after[s] == home[s] for s in held)
    unheld_moved = [s for s in SESSIONS if s not in held and after[s] != home[s]]
    assert unheld_moved and all(after[s] == "r4" for s in unheld_moved)


def test_several_holders_resolve_to_the_same_one_everywhere():
    """A stale copy can linger on a second replica; every router must pick one."""
    for s in SESSIONS[:50]:
        cands = [Candidate(r, stats(r, [s])) for r in ("r1", "r2", "r3")]
        first = decide(s, cands)
        assert first.kind is Kind.OWNER
        assert first.replica_ids[0] == rendezvous_order(s, ["r1", "r2", "r3"])[0]
        assert decide(s, list(reversed(cands))) == first


def test_newest_copy_wins_over_a_stale_one():
    """Otherwise a moved session would bounce back to its stale copy (two re-prefills)."""
    ids = ["r1", "r2", "r3"]
    for s in SESSIONS[:50]:
        stale, live, other = rendezvous_order(s, ids)  # the stale copy ranks first
        cands = [
            Candidate(stale, stats(stale, {s: 3})),
            Candidate(live, stats(live, {s: 4})),
            Candidate(other, stats(other)),
        ]
        assert _routers_agree(s, cands) == Decision(Kind.OWNER, (live,))


def test_recent_placement_holds_until_stats_catch_up():
    """A new replica joins before stats show where turn 0 went: do not follow the ring."""
    ids = ["r1", "r2", "r3"]
    for s in SESSIONS[:50]:
        first, second, third = rendezvous_order(s, ids)
        cands = [Candidate(r, stats(r)) for r in ids]
        assert decide(s, cands, recent=second) == Decision(Kind.OWNER, (second,))
        # Stats showing a holder win over the router's memory.
        cands[ids.index(first)] = Candidate(first, stats(first, [s]))
        assert decide(s, cands, recent=second) == Decision(Kind.OWNER, (first,))
        # A remembered replica that is gone is ignored.
        assert decide(s, fresh(first, third), recent=second).replica_ids == (first,)
        # A busy remembered replica means wait, as for any holder.
        busy = [Candidate(r, stats(r, running=8 if r == second else 0)) for r in ids]
        assert decide(s, busy, recent=second) == Decision(Kind.BACKOFF, (second,))


def test_busy_holder_means_backoff_not_move():
    s = "chatty"
    cands = [
        Candidate("r1", stats("r1", [s], running=8, max_running=8)),
        Candidate("r2", stats("r2")),
        Candidate("r3", stats("r3")),
    ]
    assert decide(s, cands) == Decision(Kind.BACKOFF, ("r1",))
    cands[0] = Candidate("r1", stats("r1", [s], running=7, max_running=8))
    assert decide(s, cands) == Decision(Kind.OWNER, ("r1",))


# --- full replicas ---------------------------------------------------------


def test_full_replica_is_skipped_and_every_router_picks_the_same_successor():
    ids = ["r1", "r2", "r3", "r4"]
    for s in SESSIONS[:100]:
        first, second, third, _ = rendezvous_order(s, ids)
        cands = [Candidate(r, stats(r, free_pages=0 if r == first else 5)) for r in ids]
        assert _routers_agree(s, cands) == Decision(Kind.RING, (second,))
        # The successor full too: the next one, the same everywhere.
        cands = [
            Candidate(r, stats(r, free_pages=0 if r in (first, second) else 5))
            for r in ids
        ]
        assert _routers_agree(s, cands) == Decision(Kind.RING, (third,))


def test_full_uses_reported_pages_per_session():
    s = SESSIONS[0]
    first, second = rendezvous_order(s, ["r1", "r2"])
    cands = [
        Candidate(first, stats(first, free_pages=3, min_free_pages=4)),
        Candidate(second, stats(second, free_pages=4, min_free_pages=4)),
    ]
    assert decide(s, cands) == Decision(Kind.RING, (second,))


def test_full_holder_still_owns_its_session():
    s = SESSIONS[1]
    first, second = rendezvous_order(s, ["r1", "r2"])
    cands = [Candidate(first, stats(first)), Candidate(second, stats(second, [s], 0))]
    assert decide(s, cands) == Decision(Kind.OWNER, (second,))


def test_all_full_falls_back_to_ring_order():
    s = SESSIONS[2]
    ids = ["r1", "r2", "r3"]
    cands = [Candidate(r, stats(r, free_pages=0)) for r in ids]
    assert decide(s, cands) == Decision(Kind.RING, (rendezvous_order(s, ids)[0],))


# --- stale / missing stats -------------------------------------------------


def test_missing_stats_hold_nothing_and_are_not_full():
    s = SESSIONS[3]
    ids = ["r1", "r2"]
    first = rendezvous_order(s, ids)[0]
    assert decide(s, fresh(*ids)) == Decision(Kind.RING, (first,))


@pytest.mark.parametrize("reported_as", ["someone-else", None])
def test_stats_not_from_this_replica_are_ignored(reported_as: str | None):
    s = SESSIONS[4]
    first, second = rendezvous_order(s, ["r1", "r2"])
    foreign = stats(first, [s], free_pages=0, running=8, max_running=8)
    foreign["replica_id"] = reported_as
    cands = [Candidate(first, foreign), Candidate(second, stats(second))]
    # Neither its holding, its fullness nor its business counts.
    assert decide(s, cands) == Decision(Kind.RING, (first,))


# --- no session ------------------------------------------------------------


@pytest.mark.parametrize("session_id", [None, ""])
def test_no_session_goes_least_running_first(session_id: str | None):
    cands = [
        Candidate("r1", stats("r1", running=3)),
        Candidate("r2", stats("r2", running=1)),
        Candidate("r3", {}),  # no stats: counts as idle
        Candidate("r0", stats("r0", running=1)),
    ]
    assert decide(session_id, cands) == Decision(
        Kind.FALLBACK, ("r3", "r0", "r2", "r1")
    )


def test_new_session_goes_to_a_replica_with_most_room_and_idle_pages_are_not_room():
    """After scale-up the new, empty replica takes new sessions; a replica whose pages all belong to
    idle sessions reports no free pages, so it is full for placing, and only the HRW order is left
    when every replica is full."""
    ids = ["r1", "r2", "r3"]
    old_full = stats("r1", free_pages=0, live_pages=90, min_free_pages=10)
    cands = [Candidate("r1", old_full), Candidate("r2", stats("r2", free_pages=25, min_free_pages=10)),
             Candidate("r3", stats("r3", free_pages=95, min_free_pages=10))]
    assert {decide(s, cands).replica_ids for s in SESSIONS[:200]} == {("r3",)}  # room 9 beats room 2
    # similar room (5 to 9 sessions): the HRW order decides, so a burst spreads over all three
    similar = [Candidate(r, stats(r, free_pages=50 + 20 * i, min_free_pages=10)) for i, r in enumerate(ids)]
    assert all(decide(s, similar).replica_ids == (rendezvous_order(s, ids)[0],) for s in SESSIONS[:200])
    assert capacity(old_full).full and capacity(old_full).occupancy == 0.9 and capacity({}).room is None


def test_a_replica_not_reported_yet_shares_new_sessions_by_hrw_rather_than_taking_them_all():
    ids = ["r1", "r2"]
    cands = [Candidate("r1", stats("r1", free_pages=1000, min_free_pages=82)), Candidate("r2", {})]
    assert all(decide(s, cands).replica_ids == (rendezvous_order(s, ids)[0],) for s in SESSIONS[:200])
