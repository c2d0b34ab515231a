"""Failover with a real redis-server store: SIGKILL a replica under traffic, exactness, Redis restarts."""
import asyncio
import os
import signal
import time

import httpx
import openai
import pytest
from ray import serve

from tests.redis_server import redis_server
from tests.serve_utils import TINY_MODEL_ID, running_app, stream_turn

pytestmark = [pytest.mark.ray, pytest.mark.redis]


@pytest.fixture(scope="module")
def app(ray_local):
    with redis_server() as redis:
        with running_app(args_update={"store_url": redis.url, "store_key_prefix": "fo"}) as url:
            yield url, redis


class Conversation:
    """A client that resends the full history each turn and retries a failed turn (same history)."""

    def __init__(self, client, sid):
        self.client, self.sid = client, sid
        self.history, self.replicas, self.tokens, self.turns = [], [], 0, 0
        self.reprefill_ms: list[float] = []
        self.first_try_failures = 0

    async def turn(self, deadline_s=120.0, **kw):
        self.history.append({"role": "user", "content": f"message {self.turns} of {self.sid}"})
        start = time.monotonic()
        while True:
            try:
                return await self._once(**kw)
            except (openai.APIError, httpx.HTTPError) as exc:
                self.first_try_failures += 1
                if time.monotonic() - start > deadline_s:
                    raise AssertionError(f"{self.sid}: turn failed for {deadline_s}s: {exc}")
                await asyncio.sleep(0.5)

    async def _once(self, max_tokens=5):
        headers, text, usage = await stream_turn(self.client, self.sid, self.history, max_tokens)
        replica = headers["x-swiftserve-replica"]
        if "x-swiftserve-reprefill-ms" in headers:
            self.reprefill_ms.append(float(headers["x-swiftserve-reprefill-ms"]))
        if usage is None:  # the stream ended with an error event: not acknowledged
            raise httpx.HTTPError("turn ended without completion")
        self.history.append({"role": "assistant", "content": text})
        self.replicas.append(replica)
        self.tokens += usage.total_tokens
        self.turns += 1
        return replica


def live_llm_servers() -> int:
    status = serve.status().applications["swiftserve"].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


async def test_sigkill_a_replica_under_traffic(app):
    url, _ = app
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    convs = [Conversation(client, f"kill-{i}") for i in range(22)]
    for _ in range(2):
        await asyncio.gather(*[c.turn() for c in convs])
    victim = convs[0].replicas[-1]
    on_victim = [c for c in convs if c.replicas[-1] == victim]
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    stats = await handle.options(session_id=convs[0].sid).engine_stats.remote()
    assert stats["replica_id"] == victim

    async def traffic():
        await asyncio.gather(*[c.turn() for c in convs])

    running = asyncio.ensure_future(traffic())
    await asyncio.sleep(0.05)
    os.kill(stats["pid"], signal.SIGKILL)
    await running
    deadline = time.monotonic() + 60
    while live_llm_servers() >= 2 and time.monotonic() - deadline < 0:
        await asyncio.sleep(0.2)  # wait until the controller has noticed the death
    failures_before = sum(c.first_try_failures for c in convs)
    await asyncio.gather(*[c.turn() for c in convs])
    assert sum(c.first_try_failures for c in convs) == failures_before  # after detection: all succeed

    async with httpx.AsyncClient(base_url=url) as http:
        for c in convs:
            info = (await http.get(f"/v1/sessions/{c.sid}")).json()
            # every acknowledged turn is in the record; the model's context holds all of them
            assert info["turns"] == c.turns == 4 and info["tokens_seen"] == c.tokens
            assert info["owner"] != victim
    moved = [ms for c in on_victim for ms in c.reprefill_ms]
    assert on_victim and len(moved) >= len(on_victim)
    print(f"\nre-prefill after SIGKILL: {len(moved)} sessions, "
          f"median {sorted(moved)[len(moved) // 2]:.1f} ms, max {max(moved):.1f} ms")


async def test_a_dead_engine_process_fails_its_turns_at_once_and_its_replica_is_replaced(app):
    """The engine process of one replica is SIGKILLed while its turns stream: each of them fails with an
    error within 5 s (no hang), /health turns the replica out, Serve replaces it, and every session
    continues on its next turn with all its acknowledged turns."""
    url, _ = app
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    convs = [Conversation(client, f"engine-{i}") for i in range(10)]
    await asyncio.gather(*[c.turn() for c in convs])
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    stats = await handle.options(session_id=convs[0].sid).engine_stats.remote()
    victim = stats["replica_id"]
    on_victim = [c for c in convs if c.replicas[-1] == victim]
    assert on_victim

    async def long_turn(c):
        history = c.history + [{"role": "user", "content": "a long answer, please"}]
        try:
            async with client.chat.completions.with_streaming_response.create(
                    model=TINY_MODEL_ID, messages=history, stream=True, max_tokens=2000,
                    extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
                    extra_headers={"x-session-id": c.sid}) as resp:
                async for chunk in await resp.parse():
                    if chunk.usage:
                        return time.monotonic(), "acknowledged"
        except (openai.APIError, httpx.HTTPError):
            pass
        return time.monotonic(), "failed"

    streams = [asyncio.ensure_future(long_turn(c)) for c in on_victim]
    await asyncio.sleep(1.0)  # the turns are streaming
    killed_at = time.monotonic()
    os.kill(stats["engine_pid"], signal.SIGKILL)
    ended = await asyncio.wait_for(asyncio.gather(*streams), 60)
    assert [outcome for _, outcome in ended] == ["failed"] * len(on_victim)
    assert max(at for at, _ in ended) - killed_at < 5
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the health check turns the replica out; Serve starts another
        replicas = {(await handle.options(session_id=c.sid).engine_stats.remote())["replica_id"] for c in convs}
        if victim not in replicas and live_llm_servers() >= 2:
            break
        await asyncio.sleep(1)
    else:
        raise AssertionError("the replica with a dead engine was not replaced")
    await asyncio.gather(*[c.turn() for c in convs])  # every session continues
    async with httpx.AsyncClient(base_url=url) as http:
        for c in convs:
            info = (await http.get(f"/v1/sessions/{c.sid}")).json()
            assert info["turns"] == c.turns == 2 and info["tokens_seen"] == c.tokens


async def test_failover_is_exact_before_eviction(app):
    """A short session rebuilt on another replica continues exactly as if nothing happened."""
    url, _ = app
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    a, b = Conversation(client, "exact-a"), Conversation(client, "exact-b")
    # same content in both sessions (the session id is not part of the prompt)
    for conv in (a, b):
        conv.history.append({"role": "user", "content": "same words"})
        await conv._once(max_tokens=6)
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    await handle.options(session_id="exact-b").drop_cached.remote("exact-b")  # lose b's cache
    for conv in (a, b):
        conv.history.append({"role": "user", "content": "and more"})
        await conv._once(max_tokens=8)
    assert b.reprefill_ms and not a.reprefill_ms
    assert a.history[-1] == b.history[-1]


async def test_redis_restart_under_traffic(app):
    url, redis = app
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    convs = [Conversation(client, f"redis-{i}") for i in range(8)]
    await asyncio.gather(*[c.turn() for c in convs])
    redis.stop()
    outcomes = []

    async def attempt(c):
        c.history.append({"role": "user", "content": "while redis is down"})
        try:
            await c._once()
            outcomes.append((c, True))
        except (openai.APIError, httpx.HTTPError):
            c.history.pop()
            outcomes.append((c, False))

    pending = asyncio.ensure_future(asyncio.gather(*[attempt(c) for c in convs]))
    await asyncio.sleep(1.0)
    redis.start()
    await pending
    async with httpx.AsyncClient(base_url=url) as http:
        for c, ok in outcomes:
            info = (await http.get(f"/v1/sessions/{c.sid}")).json()
            if ok:  # reported successful => committed
                assert info["turns"] >= 1 and info["messages_consumed"] == len(c.history)
    # resident sessions keep working after the restart
    await asyncio.gather(*[c.turn() for c in convs])
    assert all(c.turns >= 2 for c in convs)
