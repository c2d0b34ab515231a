"""Routing with pinned prompts (routing.affinity.decide): a new session prefers a non-full replica that
holds its pinned prompt; a full one is skipped; a session with a holder never moves."""
from routing.affinity import Candidate, decide, pack_sessions, pinned_key, rendezvous_order

REPLICAS = ["r0", "r1", "r2", "r3"]
KEY = pinned_key("m", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


def stats(rid, *, pinned=(), sessions=(), free=100):
    return Candidate(rid, {"replica_id": rid, "free_pages": free, "min_free_pages": 10, "running": 0,
                           "max_running": 8, "sessions": pack_sessions(sessions), "pinned": list(pinned)})


def test_pinned_key_is_the_leading_system_messages_only():
    assert KEY == pinned_key("m", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}])
    assert KEY != pinned_key("m", [{"role": "system", "content": "be long"}, {"role": "user", "content": "hi"}])
    assert KEY != pinned_key("other-model", [{"role": "system", "content": "be brief"}])
    assert pinned_key("m", [{"role": "user", "content": "hi"}]) is None


def test_a_new_session_prefers_the_replica_holding_its_prompt():
    for i in range(20):
        sid = f"new-{i}"
        holder = rendezvous_order(sid, REPLICAS)[-1]  # the replica HRW ranks last
        cands = [stats(r, pinned=[KEY] if r == holder else []) for r in REPLICAS]
        assert decide(sid, cands, pinned=KEY).replica_ids == (holder,)
        assert decide(sid, cands[::-1], pinned=KEY).replica_ids == (holder,)  # every router agrees
        assert decide(sid, cands).replica_ids == (rendezvous_order(sid, REPLICAS)[0],)  # no prompt: HRW


def test_a_full_holder_is_skipped_and_a_held_session_never_moves():
    sid = "s"
    order = rendezvous_order(sid, REPLICAS)
    full = [stats(r, pinned=[KEY], free=5 if r == order[-1] else 100) for r in REPLICAS]
    assert decide(sid, full, pinned=KEY).replica_ids == (order[0],)  # HRW-first among the open holders
    owner = order[-1]
    held = [stats(r, pinned=[KEY] if r != owner else [], sessions=[sid] if r == owner else []) for r in REPLICAS]
    assert decide(sid, held, pinned=KEY).replica_ids == (owner,)
