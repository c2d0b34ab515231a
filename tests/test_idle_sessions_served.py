"""A replica forgets idle sessions past max_idle_sessions; their next turn is rebuilt from the store,
exactly as after a failover (real Ray Serve app, embedded store, openai client over HTTP)."""
import openai
import pytest

from tests.serve_utils import local_app_spec, running_app, stream_turn

pytestmark = [pytest.mark.ray]

# a pool of 12 pages (a turn reserves 9) holds two sessions: the others are evicted to ids, all but one forgotten
ENGINE = {**local_app_spec()["args"]["engine"], "window_tokens": 60, "num_pages": 12, "max_batch_tokens": 32,
          "max_idle_sessions": 1}


@pytest.fixture(scope="module")
def app(ray_local):
    with running_app(args_update={"engine": ENGINE, "store_key_prefix": "idle"}) as url:
        yield url


async def two_turns(client, sid: str, between=None) -> tuple[str, dict]:
    u1, u2 = {"role": "user", "content": "hello there"}, {"role": "user", "content": "and again"}
    _, first, _ = await stream_turn(client, sid, [u1], max_tokens=5)
    if between is not None:
        await between()
    headers, second, usage = await stream_turn(client, sid, [u1, {"role": "assistant", "content": first}, u2],
                                               max_tokens=5)
    assert usage is not None
    return first + "|" + second, headers


async def test_a_forgotten_idle_session_continues_exactly_from_the_store(app):
    client = openai.AsyncOpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)

    async def crowd():  # more sessions than the pool and the idle bound hold, on every replica
        for i in range(16):
            await stream_turn(client, f"crowd-{i}", [{"role": "user", "content": f"filler {i}"}], max_tokens=3)

    control, _ = await two_turns(client, "kept")
    rebuilt, headers = await two_turns(client, "forgotten", between=crowd)
    assert "x-swiftserve-reprefill-ms" in headers  # the replica rebuilt it from the store record
    assert headers["x-swiftserve-reprefill-cause"] == "forgotten"  # here, not moved: it had forgotten the ids
    assert rebuilt == control  # before any eviction a rebuild is exact: the same greedy replies
