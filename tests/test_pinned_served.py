"""Pinned system prompts served end to end (real local Ray, 2 replicas, real redis-server, the openai
client over HTTP): new sessions go where their prompt is held, a rebuilt session keeps its layout,
a prompt over the limit is a 400 naming it, a changed system prompt is a 409."""
import asyncio

import openai
import pytest
from ray import serve

from tests.redis_server import redis_server
from tests.serve_utils import TINY_MODEL_ID as MODEL, local_app_spec, running_app, stream_turn

pytestmark = [pytest.mark.ray, pytest.mark.redis]

# W = 24 and a 45-token pinned region (BOS + system turn): two turns run far past eviction
ENGINE = {**local_app_spec()["args"]["engine"], "window_tokens": 24, "max_pinned_tokens": 64}
SYSTEM = {"role": "system", "content": "You are a terse pirate. Say arr."}


@pytest.fixture(scope="module")
def app(ray_local):
    with redis_server() as redis:
        with running_app(args_update={"store_url": redis.url, "store_key_prefix": "pin", "engine": ENGINE}) as url:
            yield url


@pytest.fixture
def client(app):  # one per test: an async client is bound to its test's event loop
    return openai.AsyncOpenAI(base_url=app + "/v1", api_key="unused", max_retries=0)


async def turn(client, sid, history, max_tokens=6):
    headers, text, usage = await stream_turn(client, sid, history, max_tokens)
    assert usage is not None, f"{sid}: the turn ended with an error"
    history.append({"role": "assistant", "content": text})
    return headers["x-swiftserve-replica"], headers.get("x-swiftserve-reprefill-ms")


async def stats(sid):
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    return await handle.options(session_id=sid).engine_stats.remote()


async def test_new_sessions_go_to_the_replica_holding_their_prompt(client):
    first, _ = await turn(client, "warm-0", [SYSTEM, {"role": "user", "content": "hello"}])
    await asyncio.sleep(2.5)  # the replica's routing stats (period 0.5 s) now list the prompt
    for i in range(1, 7):  # HRW alone sends about half of these to the other replica
        replica, _ = await turn(client, f"warm-{i}", [SYSTEM, {"role": "user", "content": f"hi {i}"}])
        assert replica == first, i
    st = await stats("warm-0")
    assert st["pages_shared"] >= 6 * 3, st  # six sessions on one copy of its 3 pages


async def test_a_rebuilt_pinned_session_continues_exactly(client):
    """b loses its cache past eviction; the store's record pins the same region, so b equals a."""
    a = [SYSTEM, {"role": "user", "content": "same words"}]
    b = [dict(m) for m in a]
    for sid, history in (("fo-a", a), ("fo-b", b)):
        await turn(client, sid, history, max_tokens=20)
    await asyncio.sleep(2.5)  # this handle's router learns fo-b's holder from routing stats (period 0.5 s)
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    await handle.options(session_id="fo-b").drop_cached.remote("fo-b")
    for sid, history in (("fo-a", a), ("fo-b", b)):
        history.append({"role": "user", "content": "and more, much more"})
        _, reprefill = await turn(client, sid, history, max_tokens=20)
        assert (reprefill is not None) == (sid == "fo-b")
    assert a[-1] == b[-1]


async def test_a_system_prompt_over_the_limit_is_a_400_naming_it(client):
    long = {"role": "system", "content": "x" * 80}
    with pytest.raises(openai.BadRequestError, match=r"max_pinned_tokens\) is 64"):
        await client.chat.completions.create(model=MODEL, messages=[long, {"role": "user", "content": "hi"}],
                                          max_tokens=2, extra_headers={"x-session-id": "too-long"})
    reply = await client.chat.completions.create(model=MODEL, messages=[long, {"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_body={"pin": "none"})
    assert reply.choices[0].finish_reason == "length"


async def test_completions_pin_their_first_tokens_and_changed_prompts_are_409(client):
    reply = await client.completions.create(model=MODEL, prompt="abcdefghijklmnopqrstuvwxyz", max_tokens=2,
                                         extra_body={"pinned_tokens": 20}, extra_headers={"x-session-id": "cmp"})
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="max_pinned_tokens"):
        await client.completions.create(model=MODEL, prompt="a" * 100, max_tokens=2, extra_body={"pinned_tokens": 90})
    history = [SYSTEM, {"role": "user", "content": "one"}]
    await turn(client, "changed", history)
    changed = [{"role": "system", "content": "You are a polite butler."}] + history[1:] + [
        {"role": "user", "content": "two"}]
    with pytest.raises(openai.ConflictError):
        await client.chat.completions.create(model=MODEL, messages=changed, max_tokens=2,
                                          extra_headers={"x-session-id": "changed"})
