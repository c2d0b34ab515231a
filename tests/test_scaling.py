"""Scale LLMServer 2 -> 3 mid-traffic the way `serve deploy`/KubeRay do (a config change):
our router moves no active session; Ray's ConsistentHashRouter in the same harness is measured beside it."""
import asyncio
import time

import openai
import pytest
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from tests.redis_server import free_port
from tests.serve_utils import local_app_spec, stream_turn

pytestmark = pytest.mark.ray
OURS = "routing.router:SessionAffinityRouter"
RAYS = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


def app_spec(replicas: int, router: str) -> dict:
    spec = local_app_spec()
    server = next(d for d in spec["deployments"] if d["name"] == "LLMServer")
    server["num_replicas"] = replicas
    server["request_router_config"]["request_router_class"] = router
    return spec


def deploy(spec: dict, timeout_s: float = 120) -> None:
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[spec]))
    want = next(d for d in spec["deployments"] if d["name"] == "LLMServer")["num_replicas"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(spec["name"])
        states = app.deployments["LLMServer"].replica_states if app and "LLMServer" in app.deployments else {}
        if app and app.status == "RUNNING" and states == {"RUNNING": want}:
            return
        time.sleep(0.2)
    raise TimeoutError(f"LLMServer did not reach {want} running replicas")


async def count_reprefills(url: str, router: str, sessions: int = 16) -> tuple[int, int]:
    """(re-prefills, turns) over 2 rounds of turns, a 2 -> 3 scale-up under traffic, and 3 rounds after it.
    The header counts every rebuild, whatever its cause (moved, evicted, forgotten)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    tag = router.rsplit(":", 1)[1]
    histories = {f"{tag}-{i}": [] for i in range(sessions)}
    counts = {"rebuilt": 0, "turns": 0}

    async def turn(sid):
        histories[sid].append({"role": "user", "content": f"turn {len(histories[sid]) // 2}"})
        headers, text, _ = await stream_turn(client, sid, histories[sid], max_tokens=4)
        histories[sid].append({"role": "assistant", "content": text})
        counts["rebuilt"] += "x-swiftserve-reprefill-ms" in headers
        counts["turns"] += 1

    async def rounds(n):
        for _ in range(n):
            await asyncio.gather(*[turn(sid) for sid in histories])

    await rounds(2)
    scaling = asyncio.create_task(asyncio.to_thread(deploy, app_spec(3, router)))
    while not scaling.done():
        await rounds(1)
    await scaling
    await rounds(3)
    return counts["rebuilt"], counts["turns"]


async def test_scale_up_moves_no_session_and_beats_consistent_hash(ray_local):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for router in (OURS, RAYS):
            await asyncio.to_thread(deploy, app_spec(2, router))
            results[router] = await count_reprefills(url, router)
            serve.delete("swiftserve")
    finally:
        serve.shutdown()
    ours, rays = results[OURS], results[RAYS]
    print(f"\nre-prefills per 1,000 turns across 2->3 scale-up: SessionAffinityRouter "
          f"{1000 * ours[0] / ours[1]:.1f} ({ours[0]}/{ours[1]}), ConsistentHashRouter "
          f"{1000 * rays[0] / rays[1]:.1f} ({rays[0]}/{rays[1]})")
    assert ours[0] == 0
