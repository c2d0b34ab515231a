"""durability: relaxed with min_replicas_acked on a Sentinel store: while the replicas cannot answer WAIT, turns
are acknowledged as not yet durable (as with an unreachable store), and once they answer the pending records
are written through and turns are durable again, with nothing missing from the store."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from routing.redis_store import RedisSessionStore
from tests.sentinel_chaos import PREFIX, sentinel_app
from tests.sentinel_cluster import sentinel_cluster
from tests.serve_utils import stream_turn

pytestmark = [pytest.mark.ray, pytest.mark.redis]


async def turn(client, history: list[dict], text: str) -> bool:
    """One acknowledged turn; returns its `durable` flag."""
    history.append({"role": "user", "content": text})
    final: dict = {}
    _, reply, usage = await stream_turn(client, "relaxed-1", history, max_tokens=4, final=final)
    assert usage is not None, "relaxed durability acknowledges the turn"
    history.append({"role": "assistant", "content": reply})
    return final["durable"]


async def test_a_replica_stall_is_not_yet_durable_then_written_through(ray_local):
    with sentinel_cluster(replicas=1) as cluster, sentinel_app(cluster, 1, {"durability": "relaxed"}) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        history: list[dict] = []
        assert await turn(client, history, "before") is True
        (replica,) = cluster.replicas()
        replica.pause()
        try:
            assert [await turn(client, history, f"stalled {i}") for i in range(3)] == [False] * 3
        finally:
            replica.resume()
        deadline = time.monotonic() + 30
        while not await turn(client, history, "after"):  # the write-through lands, then turns are durable
            assert time.monotonic() < deadline, "never durable again"
            await asyncio.sleep(0.3)
        store = RedisSessionStore(cluster.url, prefix=PREFIX)
        try:
            record = await store.get("relaxed-1")
        finally:
            await store.close()
        assert record.messages_consumed == len(history)  # every turn acknowledged meanwhile is there
