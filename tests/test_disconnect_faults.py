"""Clients that disconnect at any point of a turn harm no one: the real app on a local Ray (2 LLMServer
replicas, tiny model, a small page pool and host tier so sessions are evicted all the time, a real
redis-server store). 16 conversations; some turns are cut by closing the connection before the first
byte, while the (long) prompt is prefilled, or after a few streamed tokens; the others go through the
openai client. Afterwards: every other turn succeeded, no cut turn was committed (the store's turn and
message counts), /health stayed green throughout, no replica was replaced and none is left busy.

CI runs ~150 turns; `pytest tests/test_disconnect_faults.py --disconnect-turns=600` runs a longer one."""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import httpx
import openai
import pytest
from ray import serve

from tests.redis_server import redis_server
from tests.serve_utils import TINY_MODEL_ID as MODEL, local_app_spec, running_app, stream_turn

pytestmark = [pytest.mark.ray, pytest.mark.redis]

SESSIONS = 16
CI_TURNS = 150
# pages of 16 tokens: a turn reserves 11, a session holds up to 5, so a replica's 40 pages hold its ~8
# sessions only while most are idle: sessions are evicted (to the 16-page host tier, or dropped) all the time
ENGINE = {**local_app_spec()["args"]["engine"], "window_tokens": 60, "num_pages": 40, "max_batch_tokens": 64,
          "max_running": 4, "host_cache_bytes": 16 * 8192}
CUTS = ["before_first_byte", "mid_prefill", "mid_decode"]
LONG_PROMPT = 1200  # bytes (byte-level tokenizer: tokens): ~19 prefill steps of 64
BUSY_RETRY_S = 15.0  # a turn right after a cut may find the cut one still being aborted: 409 session_busy


@pytest.fixture(scope="module")
def app(ray_local):
    with redis_server() as redis:
        with running_app(args_update={"engine": ENGINE, "store_url": redis.url, "store_key_prefix": "cut"}) as url:
            yield url


class Conversation:
    def __init__(self, sid: str, rng: random.Random):
        self.sid, self.rng = sid, rng
        self.history: list[dict] = []
        self.turns = self.busy_retries = 0
        self.cuts: Counter[str] = Counter()
        self.replicas: set[str] = set()
        self.log: list[str] = []  # what this client did, for a failure's message

    def message(self, n: int = 0) -> dict:
        filler = "" if not n else " " + "".join(self.rng.choice("abcdefgh ") for _ in range(n))
        return {"role": "user", "content": f"turn {self.turns} of {self.sid}{filler}"}

    async def turn(self, client: openai.AsyncOpenAI) -> None:
        """One turn through the openai client; it must succeed (a session still aborting is retried)."""
        history = self.history + [self.message()]
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                headers, text, usage = await stream_turn(client, self.sid, history, max_tokens=6)
                break
            except openai.APIStatusError as exc:
                if exc.code != "session_busy" or time.monotonic() > deadline:
                    raise AssertionError(f"{self.sid} turn {self.turns}: {exc.status_code} {exc.message}; "
                                         f"before: {self.log}") from exc
                self.busy_retries += 1
                await asyncio.sleep(0.1)
        assert usage is not None, f"{self.sid} turn {self.turns} ended without its final chunk"
        self.history = history + [{"role": "assistant", "content": text}]
        self.replicas.add(headers["x-swiftserve-replica"])
        self.turns += 1
        self.log.append("turn")

    async def cut(self, url: str, where: str) -> None:
        """A turn whose client goes away at `where`; its history is not kept (the turn is not committed)."""
        body = {"model": MODEL, "messages": self.history + [self.message(LONG_PROMPT if where == "mid_prefill" else 0)],
                "stream": True, "max_tokens": 400, "temperature": 0.0, "ignore_eos": True}
        headers = {"x-session-id": self.sid}
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # closed with it: a real disconnect
            if where == "mid_decode":
                async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
                    await read_events(resp, self.rng.randint(1, 4))
            else:  # the response's headers come with the first token: cancelled while waiting for them
                send = asyncio.ensure_future(http.send(http.build_request("POST", "/v1/chat/completions", json=body,
                                                                          headers=headers), stream=True))
                await asyncio.sleep(self.rng.uniform(0, 0.01) if where == "before_first_byte"
                                    else self.rng.uniform(0.02, 0.2))
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    resp = await send
                    where += " (after its first byte)"
                    await resp.aclose()  # too late to cut before the first byte: cut after it
        self.cuts[where.split()[0]] += 1
        self.log.append(where)


async def read_events(resp: httpx.Response, n: int) -> None:
    """Read n streamed events (tokens), then return: the caller closes the connection mid-decode. A 409
    session_busy (the previous cut turn still being aborted) started nothing: nothing to cut."""
    if resp.status_code == 409 and b"session_busy" in await resp.aread():
        return
    assert resp.status_code == 200, await resp.aread()
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            assert "[DONE]" not in line, "a cut turn of 400 tokens ended before the cut"
            n -= 1
            if n <= 0:
                return


async def watch_health(url: str, stop: asyncio.Event, failures: list) -> int:
    checks = 0
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while not stop.is_set():
            try:
                resp = await http.get("/health")
                if resp.status_code != 200:
                    failures.append((time.monotonic(), resp.status_code, resp.text))
            except httpx.HTTPError as exc:
                failures.append((time.monotonic(), type(exc).__name__, str(exc)))
            checks += 1
            await asyncio.sleep(0.25)
    return checks


async def replicas_and_pids() -> dict[str, int]:
    """Every LLMServer replica's id and process id (calls without a session id go to any replica)."""
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    seen: dict[str, int] = {}
    for _ in range(60):
        stats = await handle.engine_stats.remote()
        seen[stats["replica_id"]] = stats["pid"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"found only {seen} of 2 replicas")


async def converse(conv: Conversation, client, url: str, turns: int) -> None:
    for i in range(turns):
        action = "turn" if i in (0, turns - 1) else conv.rng.choices(["turn", *CUTS], [6, 1, 1, 1])[0]
        if action == "turn":
            await conv.turn(client)
        else:
            await conv.cut(url, action)


async def test_disconnects_at_any_point_harm_no_one(app, pytestconfig):
    url, total = app, pytestconfig.getoption("--disconnect-turns") or CI_TURNS
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = await replicas_and_pids()
    convs = [Conversation(f"cut-{i}-{total}", random.Random(i)) for i in range(SESSIONS)]
    stop, unhealthy = asyncio.Event(), []
    health = asyncio.ensure_future(watch_health(url, stop, unhealthy))
    start = time.monotonic()
    try:
        await asyncio.gather(*(converse(c, client, url, -(-total // SESSIONS)) for c in convs))
    finally:
        stop.set()
        checks = await health
    cuts = sum((c.cuts for c in convs), Counter())
    print(f"\n{sum(c.turns for c in convs)} turns and {sum(cuts.values())} cuts {dict(cuts)} in "
          f"{time.monotonic() - start:.0f} s; {sum(c.busy_retries for c in convs)} session_busy retries; "
          f"{checks} health checks")
    assert not unhealthy and checks > 0
    assert all(cuts[w] for w in CUTS), cuts
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for c in convs:  # the store holds the turns that succeeded, and none of the cut ones
            info = (await http.get(f"/v1/sessions/{c.sid}")).json()
            assert (info["turns"], info["messages_consumed"]) == (c.turns, 2 * c.turns), (c.sid, info)
    assert await replicas_and_pids() == before, "a replica was replaced"
    assert set().union(*(c.replicas for c in convs)) <= set(before)
    await no_turn_left_running()


async def no_turn_left_running(timeout_s: float = 20.0) -> None:
    """Every cut turn was aborted: both engines end up with nothing running or queued."""
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [await handle.engine_stats.remote() for _ in range(12)]
        busy = {s["replica_id"]: (s["sessions_running"], s["queue_depth"]) for s in stats
                if s["sessions_running"] or s["queue_depth"]}
        if not busy:
            return
        assert time.monotonic() < deadline, f"turns left running: {busy}"
        await asyncio.sleep(0.5)
