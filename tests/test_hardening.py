"""Hardening (issue 16) on the real app: real Ray, real redis-server, API keys for three tenants.

A cut turn is never committed (a few hundred cuts, the store record checked after each); one tenant at its
limits, or sending huge bodies, does not delay another; `durability: relaxed` serves through a Redis that
hangs and writes the turns through when it answers again; faults: a killed ingress replica, a Redis with
`appendfsync everysec` killed.
"""
import asyncio
import json
import os
import secrets
import signal
import statistics
import time
from urllib.parse import urlsplit

import httpx
import pytest
import ray
from ray import serve

from routing.redis_store import RedisSessionStore
from tests.redis_server import RedisServer
from tests.serve_utils import TINY_MODEL_ID as MODEL, local_app_spec, running_app

pytestmark = [pytest.mark.ray, pytest.mark.redis]

TENANTS = ("alpha", "beta", "hog")
KEYS = {t: f"{t}-key-{secrets.token_hex(12)}" for t in TENANTS}
LIMITS = {"max_request_bytes": 4 * 2**20, "max_messages": 1024, "max_concurrent_requests": 6, "body_timeout_s": 4,
          "rate_limit_per_s": 200, "rate_limit_burst": 400, "max_sessions_per_tenant": 8}
PREFIX = "hard"


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("\n".join(f"{t}:{k}" for t, k in KEYS.items()) + "\n")
    redis = RedisServer(aof=True)  # appendonly + appendfsync everysec, as the k8s Redis runs
    redis.start()
    update = {"store_url": redis.url, "store_key_prefix": PREFIX, "api_keys_file": str(keys), "limits": LIMITS,
              "durability": "relaxed", "stream_batching_interval_ms": 0,
              "engine": {**local_app_spec()["args"]["engine"]}}
    try:
        with running_app(args_update=update) as url:
            yield url, redis
    finally:
        redis.close()


def chat(messages: list[dict], **extra) -> dict:
    return {"model": MODEL, "messages": messages, "temperature": 0.0, **extra}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


async def turn(http: httpx.AsyncClient, tenant: str, sid: str, history: list[dict], max_tokens: int = 4,
               stream: bool = False) -> tuple[httpx.Response, str]:
    """One whole turn; returns the response and the reply text (retries while the session is busy)."""
    for _ in range(200):
        r = await http.post("/v1/chat/completions", json=chat(history, max_tokens=max_tokens),
                            headers={**auth(tenant), "x-session-id": sid})
        if r.status_code != 409 or r.json()["error"]["code"] != "session_busy":
            break
        await asyncio.sleep(0.02)
    assert r.status_code == 200, r.text
    return r, r.json()["choices"][0]["message"]["content"]


async def settle(sid: str) -> None:
    """Wait until the replica holding `sid` runs no turn (a cut turn aborted or committed), then a moment."""
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve").options(session_id=sid)
    for _ in range(500):
        if (await handle.engine_stats.remote())["sessions_running"] == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a commit that follows the engine's last step


async def cut(http: httpx.AsyncClient, sid: str, history: list[dict], max_tokens: int, events: int) -> int:
    """Stream a turn and close the connection after `events` SSE events; returns the events read."""
    body = chat(history, max_tokens=max_tokens, ignore_eos=True, stream=True)
    seen = 0
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={**auth("alpha"), "x-session-id": sid}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            seen += line.startswith("data:")
            if seen >= events:
                break  # leaving the block closes the connection mid-stream
    return seen


# ---- a disconnected turn is never committed -------------------------------------------------------
async def test_a_cut_turn_is_never_committed_and_resending_it_recovers(app):
    url, redis = app
    store = RedisSessionStore(redis.url, prefix=PREFIX)
    sid, history = "cuts", [user("start")]
    committed_cuts, cuts = 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        _, reply = await turn(http, "alpha", sid, history)
        history.append({"role": "assistant", "content": reply})
        for i in range(240):
            before = await store.get(f"alpha/{sid}")
            attempt = history + [user(f"cut {i}")]
            # long turns cut early must never commit; short ones cut near their end probe the last window
            long = i % 3 != 2
            await cut(http, sid, attempt, max_tokens=200 if long else 6, events=1 + i % 4 if long else 5 + i % 3)
            cuts += 1
            await settle(f"alpha/{sid}")
            after = await store.get(f"alpha/{sid}")
            if after.turns == before.turns:  # not committed: the record is what the client saw acknowledged
                assert after.model_dump(exclude={"updated_at"}) == before.model_dump(exclude={"updated_at"})
                continue
            # committed as the client left: acknowledged state; resending the same turn returns that reply
            assert not long, f"cut {i}: a turn cut after its first tokens of 200 was committed"
            committed_cuts += 1
            r, reply = await turn(http, "alpha", sid, attempt, max_tokens=6)
            assert reply == after.last_reply and (await store.get(f"alpha/{sid}")).turns == after.turns
            history = attempt + [{"role": "assistant", "content": reply}]
        _, reply = await turn(http, "alpha", sid, history + [user("after the cuts")])  # no 409: history agrees
    print(f"\n{cuts} cuts: {committed_cuts} committed as the client left (short turns cut at their end), "
          f"{cuts - committed_cuts} not committed")


# ---- one tenant cannot starve another -------------------------------------------------------------
async def open_unfinished(url: str, tenant: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET whose chunked body never ends (the issue's starvation attack)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {KEYS[tenant]}\r\n"
                 "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader, timeout: float) -> int | None:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return None
    return int(line.split()[1]) if line else None


async def latencies(http: httpx.AsyncClient, tenant: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        assert (await http.get("/v1/models", headers=auth(tenant))).status_code == 200
        out.append(time.perf_counter() - start)
        await asyncio.sleep(0.02)
    return out


async def test_a_tenant_at_its_limits_does_not_delay_another(app):
    url, _ = app
    limit, deadline = LIMITS["max_concurrent_requests"], LIMITS["body_timeout_s"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        alone = await latencies(http, "beta", 20)
        held = [await open_unfinished(url, "hog") for _ in range(limit + 20)]
        start = time.monotonic()
        statuses = await asyncio.gather(*[status_of(r, 2.0) for r, _ in held])
        assert sorted(statuses, key=str) == [429] * 20 + [None] * limit  # the rest wait for their bodies
        busy = await latencies(http, "beta", 20)
        r = await http.get("/v1/models", headers=auth("hog"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_concurrent_requests"
        waiting = [(r, w) for (r, w), s in zip(held, statuses) if s is None]
        late = await asyncio.gather(*[status_of(r, deadline + 5) for r, _ in waiting])
        assert late == [408] * limit and time.monotonic() - start >= deadline - 0.5  # the body deadline
        for _, w in held:
            w.close()
        assert (await http.get("/v1/models", headers=auth("hog"))).status_code == 200  # slots given back
    print(f"\nbeta GET /v1/models alone: median {1000 * statistics.median(alone):.1f} ms, max "
          f"{1000 * max(alone):.1f} ms; hog at its limit ({limit} held, 20 refused): median "
          f"{1000 * statistics.median(busy):.1f} ms, max {1000 * max(busy):.1f} ms")
    assert max(busy) < 0.5 and statistics.median(busy) < 0.1


async def test_huge_bodies_are_refused_before_validation_and_others_stay_fast(app):
    url, _ = app
    messages = [user("m")] * 100_000  # 2.8 MB, under max_request_bytes, 1,500 times max_messages
    body = json.dumps(chat(messages)).encode()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        alone = await latencies(http, "beta", 10)

        async def huge() -> httpx.Response:
            return await http.post("/v1/chat/completions", content=body,
                                   headers={**auth("hog"), "content-type": "application/json"})

        refused = asyncio.gather(*[huge() for _ in range(LIMITS["max_concurrent_requests"])])
        busy = await latencies(http, "beta", 20)
        for r in await refused:
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages", r.text
            assert r.json()["error"]["param"] == "messages"
    print(f"\nbeta GET alone: median {1000 * statistics.median(alone):.1f} ms; while 6 bodies of 100k messages "
          f"({len(body) / 1e6:.1f} MB) were refused: median {1000 * statistics.median(busy):.1f} ms, "
          f"max {1000 * max(busy):.1f} ms")
    assert max(busy) < 2.0 and statistics.median(busy) < 0.2  # before: one 100k-message body alone blocked ~1 s


# ---- sessions per tenant ----------------------------------------------------------------------------
async def test_live_sessions_per_tenant_are_bounded_and_delete_frees_one(app):
    url, _ = app
    limit = LIMITS["max_sessions_per_tenant"]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for i in range(limit):
            await turn(http, "hog", f"quota-{i}", [user("hi")], max_tokens=1)
        r = await http.post("/v1/chat/completions", json=chat([user("hi")], max_tokens=1),
                            headers={**auth("hog"), "x-session-id": "quota-extra"})
        err = r.json()["error"]
        assert r.status_code == 429 and err["code"] == "session_quota_exceeded" and set(err) == {
            "message", "type", "param", "code"} and "'quota-extra'" in err["message"] and "hog/" not in err["message"]
        assert (await http.post("/v1/chat/completions", json=chat([user("one-off")], max_tokens=1),
                                headers=auth("hog"))).status_code == 200  # one-off turns store nothing
        assert (await http.delete("/v1/sessions/quota-3", headers=auth("hog"))).status_code == 200
        await turn(http, "hog", "quota-extra", [user("hi")], max_tokens=1)  # the deleted one's place


# ---- store outages: durability relaxed ----------------------------------------------------------------
async def stream_final(http: httpx.AsyncClient, tenant: str, sid: str, history: list[dict]) -> tuple[dict, str]:
    """Stream a turn; returns its final chunk (the one with finish_reason) and the reply's text."""
    body = chat(history, max_tokens=4, stream=True)
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={**auth(tenant), "x-session-id": sid}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[5:]) for line in [x async for x in r.aiter_lines()]
                  if line.startswith("data:") and line != "data: [DONE]"]
    final = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert final, chunks[-1]
    return final[0], "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


async def test_relaxed_durability_serves_through_a_hung_redis_then_writes_through(app):
    url, redis = app
    store = RedisSessionStore(redis.url, prefix=PREFIX)
    histories = {f"hang-{i}": [user(f"hello {i}")] for i in range(3)}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for sid, history in histories.items():
            r, reply = await turn(http, "beta", sid, history)
            assert r.headers["x-swiftserve-durable"] == "true" and r.json()["durable"] is True
            history.append({"role": "assistant", "content": reply})
        redis.pause()  # accepts connections, never answers
        try:
            start, took = time.monotonic(), []
            for n in range(2):
                for sid, history in histories.items():
                    history.append(user(f"during the hang {n}"))
                    t0 = time.monotonic()
                    r, reply = await turn(http, "beta", sid, history)
                    took.append(time.monotonic() - t0)
                    assert r.headers["x-swiftserve-durable"] == "false" and r.json()["durable"] is False
                    history.append({"role": "assistant", "content": reply})
            sid, history = next(iter(histories.items()))
            history.append(user("streamed during the hang"))
            final, reply = await stream_final(http, "beta", sid, history)
            assert final["durable"] is False
            history.append({"role": "assistant", "content": reply})
            r = await http.post("/v1/chat/completions", json=chat([user("new")], max_tokens=1),
                                headers={**auth("beta"), "x-session-id": "hang-new"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            hung_s = time.monotonic() - start
        finally:
            redis.resume()
        resumed = time.monotonic()
        for sid, history in histories.items():  # written through, epoch-fenced, once Redis answers
            while (record := await store.get(f"beta/{sid}")).messages_consumed != len(history):
                assert time.monotonic() - resumed < 20, (sid, record.messages_consumed, len(history))
                await asyncio.sleep(0.1)
        caught_up_s = time.monotonic() - resumed
        history.append(user("after the hang"))
        r, _ = await turn(http, "beta", sid, history)
        assert r.headers["x-swiftserve-durable"] == "true"
    print(f"\nRedis hung (SIGSTOP) {hung_s:.1f} s: 7 turns acknowledged not durable (each took "
          f"{min(took):.2f}-{max(took):.2f} s), a new session 503; records caught up {caught_up_s:.1f} s "
          "after SIGCONT")


# ---- faults -----------------------------------------------------------------------------------------
async def test_redis_with_aof_everysec_killed_keeps_every_session_going(app):
    url, redis = app
    store = RedisSessionStore(redis.url, prefix=PREFIX)
    histories = {f"aof-{i}": [user(f"hello {i}")] for i in range(4)}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for round_ in range(2):
            for sid, history in histories.items():
                _, reply = await turn(http, "alpha", sid, history)
                history.append({"role": "assistant", "content": reply})
                history.append(user(f"round {round_}"))
            if round_ == 0:
                await asyncio.sleep(1.5)  # appendfsync everysec: round 0 is on disk
        redis.stop()  # SIGKILL, right after round 1's acknowledgements
        redis.start()  # reloads the AOF
        kept = [(await store.get(f"alpha/{sid}")).turns for sid in histories]
        assert all(t >= 1 for t in kept)  # at most the last second is lost
        for sid, history in histories.items():  # every session continues: no 409, records catch up
            await turn(http, "alpha", sid, history)
            assert (await store.get(f"alpha/{sid}")).messages_consumed == len(history) + 1
    print(f"\nRedis (AOF everysec) SIGKILLed: {sum(t == 2 for t in kept)} of {len(kept)} sessions kept their "
          "last turn on disk; all continued")


async def test_a_killed_ingress_replica_is_replaced_and_sessions_continue(app):
    url, _ = app
    history = [user("before the kill")]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        _, reply = await turn(http, "alpha", "ingress-kill", history)
        history += [{"role": "assistant", "content": reply}, user("after the kill")]
        [entry] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::swiftserve#OpenAIIngress#")]
        ingress = ray.get_actor(entry["name"], namespace=entry["namespace"])
        os.kill(await ingress.__ray_call__.remote(lambda self: os.getpid()), signal.SIGKILL)
        killed, failures = time.monotonic(), 0
        while True:
            try:
                r = await http.post("/v1/chat/completions", json=chat(history, max_tokens=2),
                                    headers={**auth("alpha"), "x-session-id": "ingress-kill"})
                if r.status_code == 200:
                    break
                assert r.status_code in (502, 503, 504), r.text  # no replica yet, never a 409
            except httpx.HTTPError:
                pass
            failures += 1
            assert time.monotonic() - killed < 120, "no ingress replica came back"
            await asyncio.sleep(0.25)
    print(f"\ningress replica SIGKILLed: served again after {time.monotonic() - killed:.1f} s "
          f"({failures} refused attempts); the session continued")
