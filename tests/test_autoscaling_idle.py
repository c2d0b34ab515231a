"""Autoscaling that follows conversations, on a real local cluster (tiny model, embedded store, openai client):
fill one replica with idle sessions -> scale-up -> new sessions land on the new replica -> idle past the TTL
-> back to the minimum -> every session's next turn succeeds with its history. Prints the timeline and the
re-prefills by cause (what the README's "Routing and autoscaling" quotes)."""
import asyncio
import time
from collections import Counter

import httpx
import openai
import pytest
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from tests.redis_server import free_port
from tests.serve_utils import local_app_spec, stream_turn

pytestmark = pytest.mark.ray
TTL_S = 20.0  # idle_cache_ttl_s: short, so the whole story takes about two minutes
# S + W = 64 tokens: a session holds 5-6 pages of 16, a turn reserves 9; 40 pages hold 6-7 idle sessions
ENGINE = {"window_tokens": 60, "page_size": 16, "num_pages": 40, "max_batch_tokens": 32, "idle_cache_ttl_s": TTL_S}
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64,
    "metrics_interval_s": 0.5, "look_back_period_s": 1.0,  # the cache-pressure signal every 0.5 s (see README)
    # drain by ageing: a replica goes only after the need stayed low for a TTL (Ray has no hook to pick it)
    "upscale_delay_s": 1.0, "downscale_delay_s": TTL_S,
    "policy": {"policy_function": "deployments.autoscaling:CacheAwarePolicy",
               "policy_kwargs": {"target_cache_occupancy": 0.75, "target_running_fraction": 0.75}},
}


def app_spec() -> dict:
    spec = local_app_spec()
    spec["args"]["engine"].update(ENGINE)
    spec["args"]["store_key_prefix"] = "autoscale-idle"
    server = next(d for d in spec["deployments"] if d["name"] == "LLMServer")
    server.pop("num_replicas")
    server["autoscaling_config"] = AUTOSCALING
    return spec


def running_replicas() -> int:
    app = serve.status().applications.get("swiftserve")
    if not app or "LLMServer" not in app.deployments:
        return 0
    return app.deployments["LLMServer"].replica_states.get("RUNNING", 0)


async def wait_replicas(n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while running_replicas() != n:
        assert time.monotonic() < deadline, f"LLMServer did not reach {n} running replicas"
        await asyncio.sleep(0.25)


class Conversations:
    def __init__(self, url: str):
        self.client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.AsyncClient(base_url=url, timeout=30)
        self.history: dict[str, list[dict]] = {}
        self.home: dict[str, str] = {}  # replica of the session's last turn
        self.causes: Counter[str] = Counter()
        self.start = time.monotonic()
        self.timeline: list[str] = []

    def log(self, what: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.start:6.1f} s  {what}")

    async def turn(self, sid: str) -> str:
        history = self.history.setdefault(sid, [])
        history.append({"role": "user", "content": f"{sid} turn {len(history) // 2}: " + "tell me more " * 12})
        final: dict = {}
        headers, text, usage = await stream_turn(self.client, sid, history, max_tokens=4, final=final)
        assert usage is not None and usage.completion_tokens > 0
        history.append({"role": "assistant", "content": text})
        self.home[sid] = headers["x-swiftserve-replica"]
        if "x-swiftserve-reprefill-ms" in headers:  # the final chunk says it again
            cause = headers["x-swiftserve-reprefill-cause"]
            assert final["reprefill"] == {"ms": float(headers["x-swiftserve-reprefill-ms"]), "cause": cause}
            self.causes[cause] += 1
        else:
            assert "reprefill" not in final and final["durable"] is True
        return self.home[sid]

    async def stored_turns(self, sid: str) -> int:
        resp = await self.http.get(f"/v1/sessions/{sid}")
        resp.raise_for_status()
        return resp.json()["turns"]


async def test_replica_count_follows_conversations_and_every_session_continues(ray_local):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        _get_global_client().deploy_apps(ServeDeploySchema(applications=[app_spec()]))
        await wait_replicas(1, 120)
        c = Conversations(f"http://127.0.0.1:{port}")
        c.log("1 replica running")
        server = serve.get_deployment_handle("LLMServer", "swiftserve")

        # 1. fill the only replica with conversations that then sit idle, until it has no room for another
        first = []
        while len(first) < 10:
            sid = f"first-{len(first)}"
            first.append(sid)
            old = await c.turn(sid)
            st = await server.engine_stats.remote()
            if st["pages_free"] < st["pages_to_admit"]:
                break
        c.log(f"{len(first)} idle sessions fill {old[:8]}: {st['pages_used']}/{st['pages_total']} pages")
        assert st["pages_free"] < st["pages_to_admit"] and st["evictions"] == 0

        # 2. occupancy (no ongoing requests) scales it up
        await wait_replicas(2, 60)
        c.log("scaled up to 2 replicas")

        # 3. new sessions go to the new replica: the old one's pages belong to recently active sessions
        later = [f"later-{i}" for i in range(3)]
        homes = [await c.turn(sid) for sid in later]
        last_turn = time.monotonic()
        c.log(f"{len(later)} new sessions on {sorted({h[:8] for h in homes})}")
        assert old not in homes

        # 4. everything idle: caches age out, the policy's need follows them down to the minimum
        await wait_replicas(1, 3 * TTL_S + 30)
        idle = time.monotonic() - last_turn
        c.log(f"scaled down to 1 replica, the removed one's sessions idle {idle:.1f} s (TTL {TTL_S:.0f} s): "
              f"{'no cache' if idle >= TTL_S else 'caches'} lost to the scale-down")
        await asyncio.sleep(max(0.0, last_turn + TTL_S + 2 - time.monotonic()))  # every cache aged out
        survivor = (await server.engine_stats.remote())["replica_id"]

        # 5. every session's next turn succeeds with its whole history; each rebuild says why
        assert not c.causes
        before = dict(c.home)
        for sid in first + later:
            assert await c.turn(sid) == survivor
            assert await c.stored_turns(sid) == 2
        c.log(f"{len(first) + len(later)} next turns succeeded on {survivor[:8]}; "
              f"re-prefills by cause: {dict(c.causes)}")
        print("\n" + "\n".join(c.timeline))
        stayed = sum(home == survivor for home in before.values())
        assert c.causes == Counter(evicted=stayed, moved=len(before) - stayed)
    finally:
        serve.shutdown()
