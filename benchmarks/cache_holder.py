"""`CacheHolder`: a stand-in for the LLM replica, for routing tests and benchmarks.

It remembers which sessions' caches it holds (LRU, bounded by `capacity`) and
reports them exactly as the real LLMServer will (`record_routing_stats`,
contract in routing.affinity). A turn is a cache hit only if this replica
served the session's previous turn: if another replica served a turn in
between, the local copy is stale (the real store's epoch fencing drops it),
so it counts as a re-prefill too.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema

from deployments.autoscaling import autoscaling_stats
from routing.affinity import pack_epochs, pack_sessions


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class CacheHolder:
    def __init__(self, capacity: int = 64, max_running: int = 4, turn_s: float = 0.01):
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._capacity = capacity
        self._max_running = max_running
        self._turn_s = turn_s
        # session id -> last turn served here; order = least recently used first.
        self._last_turn: OrderedDict[str, int] = OrderedDict()
        self._running = 0

    async def __call__(self, session_id: str | None, turn: int = 0) -> dict[str, Any]:
        """Serve one turn; returns who served it and whether the cache was fresh."""
        hit = session_id is not None and self._last_turn.get(session_id) == turn - 1
        if session_id is not None:
            self._last_turn[session_id] = turn
            self._last_turn.move_to_end(session_id)
            while len(self._last_turn) > self._capacity:
                self._last_turn.popitem(last=False)
        self._running += 1
        try:
            await asyncio.sleep(self._turn_s)
        finally:
            self._running -= 1
        return {"replica_id": self._replica_id, "hit": hit}

    def record_routing_stats(self) -> dict[str, Any]:
        resident = len(self._last_turn)
        return {
            "replica_id": self._replica_id,
            "free_pages": self._capacity - resident,  # one page per session here
            "live_pages": resident,
            "total_pages": self._capacity,
            "running": self._running,
            "max_running": self._max_running,
            "resident": resident,
            "sessions": pack_sessions(self._last_turn),
            # The turn counter grows on every move: as good as the store's epoch.
            "epochs": pack_epochs(self._last_turn),
            "min_free_pages": 1,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        return autoscaling_stats(self.record_routing_stats())


def build(args: dict[str, Any]) -> Application:
    """App builder for `import_path: benchmarks.cache_holder:build`; `args` are
    CacheHolder's init kwargs."""
    return CacheHolder.bind(**args)


def app_config(
    name: str,
    num_replicas: int,
    router_class: str,
    *,
    router_kwargs: dict[str, Any] | None = None,
    stats_period_s: float = 0.2,
    capacity: int = 64,
    max_running: int = 4,
    turn_s: float = 0.01,
) -> dict[str, Any]:
    """One entry of a Serve config's `applications:` list (as in `serve deploy`)."""
    return {
        "name": name,
        "route_prefix": None,
        "import_path": "benchmarks.cache_holder:build",
        "args": {"capacity": capacity, "max_running": max_running, "turn_s": turn_s},
        "deployments": [
            {
                "name": "CacheHolder",
                "num_replicas": num_replicas,
                # Ray's queue limit equals the engine's batch slots, as in prod.
                "max_ongoing_requests": max_running,
                "request_router_config": {
                    "request_router_class": router_class,
                    "request_router_kwargs": router_kwargs or {},
                    "request_routing_stats_period_s": stats_period_s,
                },
            }
        ],
    }


def deploy(app: dict[str, Any], timeout_s: float = 60.0) -> DeploymentHandle:
    """Apply `app` as the cluster's Serve config and wait for its replica count.

    Declarative on purpose, like `serve deploy` and KubeRay: a config change
    that only touches num_replicas keeps the running replicas (and their
    caches). `serve.run` of a Python app would not: it gives every deploy a
    fresh code version, so Ray replaces all replicas. (`serve deploy` itself
    goes through the dashboard's REST API, which these runs leave off; this is
    the controller call behind it.)
    """
    serve.start(proxy_location="Disabled")  # handles only: no HTTP needed
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
    want = app["deployments"][0]["num_replicas"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {status.message}")
        deployment = status.deployments.get("CacheHolder") if status else None
        if deployment is not None and deployment.replica_states == {"RUNNING": want}:
            return serve.get_deployment_handle("CacheHolder", app_name=app["name"])
        time.sleep(0.1)
    raise TimeoutError(f"{app['name']} did not reach {want} replicas")
