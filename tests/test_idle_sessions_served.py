"""Idle sessions down the tiers: an evicted session waits in the host tier and resumes there without a
re-prefill; pushed out of it and forgotten past max_idle_sessions, its next turn is rebuilt from the
store, exactly as after a failover (real Ray Serve app, embedded store, openai client over HTTP)."""
import asyncio
import openai
import pytest
from ray import serve

from tests.serve_utils import local_app_spec, running_app, stream_turn

pytestmark = [pytest.mark.ray]

# a pool of 12 pages (a turn reserves 9, a session holds 6): a new session evicts the idle one to the host
# tier, which holds one session (6 pages of 8 KiB); the one before falls to ids, all but one are forgotten
ENGINE = {**local_app_spec()["args"]["engine"], "window_tokens": 60, "num_pages": 12, "max_batch_tokens": 32,
          "max_idle_sessions": 1, "host_cache_bytes": 6 * 8192}
HI, AGAIN = {"role": "user", "content": "hello there"}, {"role": "user", "content": "and again"}


@pytest.fixture  # one app per test: an earlier test's idle sessions would be the LRU victims here
def app(ray_local):
    with running_app(args_update={"engine": ENGINE, "store_key_prefix": "idle"}) as url:
        yield url


async def two_turns(client, sid: str, between=None) -> tuple[str, dict]:
    u1, u2 = HI, AGAIN
    _, first, _ = await stream_turn(client, sid, [u1], max_tokens=5)
    if between is not None:
        await between()
    headers, second, usage = await stream_turn(client, sid, [u1, {"role": "assistant", "content": first}, u2],
                                               max_tokens=5)
    assert usage is not None
    return first + "|" + second, headers


async def test_a_forgotten_idle_session_continues_exactly_from_the_store(app):
    client = openai.AsyncOpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)

    async def crowd():  # more sessions than the pool and the idle bound hold, on every replica (new sessions
        for i in range(60):  # go to the roomiest replica, so both must fill before either churns)
            await stream_turn(client, f"crowd-{i}", [{"role": "user", "content": f"filler {i}"}], max_tokens=3)

    control, _ = await two_turns(client, "kept")
    rebuilt, headers = await two_turns(client, "forgotten", between=crowd)
    assert "x-swiftserve-reprefill-ms" in headers  # the replica rebuilt it from the store record
    assert headers["x-swiftserve-reprefill-cause"] == "forgotten"  # here, not moved: it had forgotten the ids
    assert rebuilt == control  # before any eviction a rebuild is exact: the same greedy replies


async def test_an_evicted_session_resumes_from_the_host_tier_without_a_re_prefill(app):
    client = openai.AsyncOpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")

    async def owner_stats():
        return await handle.options(session_id="warm").engine_stats.remote()

    async def crowd():  # until a new session on its replica has evicted it (its only idle session)
        for i in range(40):
            await stream_turn(client, f"pusher-{i}", [{"role": "user", "content": f"push {i}"}], max_tokens=3)
            if (await owner_stats())["offloads"] > offloads:
                return
        raise AssertionError("no session landed on the owner's replica")

    _, first, _ = await stream_turn(client, "warm", [HI], max_tokens=5)  # alone, so the first one evicted
    offloads = (await owner_stats())["offloads"]
    await crowd()
    st = await owner_stats()
    assert st["sessions_host"] >= 1 and st["pages_used"] <= 12
    reloads = st["reloads"]
    headers, second, _ = await stream_turn(client, "warm", [HI, {"role": "assistant", "content": first}, AGAIN],
                                           max_tokens=5)
    assert "x-swiftserve-reprefill-ms" not in headers  # the same replica kept it: not rebuilt from the store
    control, _ = await two_turns(client, "control")  # after: an older idle session would be evicted first
    assert first + "|" + second == control
    for _ in range(50):  # the handle's router may still be learning the holder from stats (period 0.5 s)
        if (await owner_stats())["reloads"] == reloads + 1:
            break
        await asyncio.sleep(0.1)
    assert (await owner_stats())["reloads"] == reloads + 1
