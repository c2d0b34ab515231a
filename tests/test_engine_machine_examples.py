"""What the engine state machine (tests/engine_machine.py) found: its shrunk examples, replayed rule by rule
with the invariants checked after each (teardown drains the engine and checks every result). Each failed
before its fix."""
from tests.engine_machine import EngineMachine, one_thread  # noqa: F401 (fixture)


def replay(*steps: tuple[str, dict]) -> None:
    m = EngineMachine()
    try:
        for name, kw in steps:
            getattr(m, name)(**kw)
            m.check()
    finally:
        m.teardown()


def test_a_pinned_region_back_from_the_host_tier_keeps_its_length(one_thread):
    """c's pinned region left the pool with c (to the host tier) and came back with it, registered with 0
    tokens: d, attaching to it, ran with no sinks and wrote its ids over the shared pages."""
    replay(("make_engine", dict(num_pages=40, max_running=3, host_pages=24, ttl=None)),
           ("score", dict(sid="c", n=20, seed=0, pinned=True)),
           ("drain", {}),
           ("evict", dict(sid="c")),
           ("score", dict(sid="c", n=1, seed=0, pinned=False)),
           ("generate", dict(sid="d", n=1, seed=0, pinned=True, max_tokens=2)),
           ("drain", {}),
           ("score", dict(sid="c", n=4, seed=1, pinned=False)))


def test_a_score_after_a_prefill_cut_off_scores_its_first_token(one_thread):
    """a's score was cancelled mid-prefill: the ids fed stayed, but not the last one's logits (pending was
    cleared), so a's next score gave None for its first token, as if a had no context."""
    replay(("make_engine", dict(num_pages=18, max_running=1, host_pages=0, ttl=None)),
           ("score", dict(sid="a", n=10, seed=0, pinned=False)),
           ("step", dict(n=1)),
           ("cancel_now", dict(sid="a")),
           ("score", dict(sid="a", n=1, seed=0, pinned=False)))



def test_a_batched_decode_never_reads_a_slot_it_masks(one_thread):
    """Decode-only steps batch sequences of different lengths, padding the shorter ones' keys with pool slot 0
    and masking them out; a masked column still multiplies its value by 0, and 0 * NaN is NaN. Slot 0 held
    NaN when never written (the pool is torch.empty; here the first step failed before writing it): every
    token of the batch came out NaN."""
    replay(("make_engine", dict(num_pages=40, max_running=3, host_pages=0, ttl=None)),
           ("fail_a_step", dict(now=0)),
           ("score", dict(sid="a", n=3, seed=0, pinned=False)),
           ("step", dict(n=1)),
           ("generate", dict(sid="b", n=1, seed=1, pinned=False, max_tokens=4)),
           ("generate", dict(sid="c", n=5, seed=2, pinned=False, max_tokens=4)),
           ("drain", {}))
