"""Host tier under tensor parallelism (CPU, gloo): every rank copies its own heads' pages out and back, so
a session that went through the host tier continues on 2 ranks exactly as on one."""
import pytest

from swift_engine import EngineConfig, StreamingEngine
from tests.test_tensor_parallel import CONFIG, TOL, flat, ids, write_checkpoint

SAMPLING = dict(temperature=0.0, max_tokens=5, ignore_eos=True, top_logprobs=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp-host"), CONFIG)


def engine(checkpoint, tp: int) -> StreamingEngine:
    # a pool of 24 pages: the third session's turn sends the first to the host tier
    cfg = EngineConfig(model=str(checkpoint), dtype="float32", page_size=8, sink_tokens=4, window_tokens=28,
                       num_pages=24, max_batch_tokens=32, host_cache_bytes="1MiB", tensor_parallel_size=tp)
    return StreamingEngine(cfg, progress=False)


async def scenario(e: StreamingEngine) -> tuple[list, dict]:
    async def turn(sid: str, prompt: list[int]) -> list:
        return [(ev.token_id, ev.logprob, ev.top_logprobs)
                async for ev in e.generate(sid, prompt_token_ids=prompt, sampling=SAMPLING)]
    out = [await turn(f"s{i}", ids(40, i)) for i in range(4)]  # past S + W: not a prefix of anything
    # back from the host tier, while other sessions' pages (written since) sit where theirs were
    out += [await turn("s0", ids(6, 10)), await turn("s1", ids(6, 11)), await turn("s3", ids(6, 12))]
    out.append(await e.score("s0", ids(8, 13)))
    st = e.stats()
    return out, dict(offloads=st.offloads, reloads=st.reloads, reprefills=st.reprefills)


@pytest.fixture(scope="module")
def runs(checkpoint):
    import asyncio

    results = {}
    for tp in (1, 2):
        e = engine(checkpoint, tp)
        try:
            results[tp] = asyncio.run(scenario(e))
        finally:
            e.shutdown()
    return results


def test_tp2_through_the_host_tier_equals_tp1(runs):
    (one, st1), (two, st2) = runs[1], runs[2]
    assert st1 == st2 and st1["reloads"] >= 2 and st1["reprefills"] == 0  # the same tier traffic, no rebuilds
    a, b = flat(one), flat(two)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= TOL
