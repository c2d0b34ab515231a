"""SessionAffinityRouter on a real local Ray Serve cluster (CacheHolder replicas)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from benchmarks.cache_holder import app_config, deploy
from routing.router import RecentPlacements
from tests.redis_server import free_port

pytestmark = pytest.mark.ray

ROUTER = "routing.router:SessionAffinityRouter"
APP = "affinity-test"
# Two batch slots per replica and 20 concurrent sessions: owners are busy most
# of the time, so a router that spilled busy sessions elsewhere would be caught.
MAX_RUNNING = 2

Turn = tuple[str, int, str, bool]  # session, turn index, replica id, cache hit


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        # a free dashboard port: without one Ray's dashboard process takes 8265 (include_dashboard=False too)
        ray.init(num_cpus=2, include_dashboard=False, dashboard_port=free_port(), log_to_driver=False)
    yield
    serve.shutdown()
    if started:
        ray.shutdown()


def config(num_replicas: int):
    return app_config(
        APP,
        num_replicas,
        ROUTER,
        # No memory of its own placements: as if every turn came through a
        # different proxy, so only the replicas' stats keep sessions in place.
        router_kwargs={"recent_ttl_s": 0.0},
        stats_period_s=0.2,
        max_running=MAX_RUNNING,
        turn_s=0.02,
    )


async def converse(
    handle: DeploymentHandle, session: str, turns: range, log: list[Turn]
) -> None:
    for t in turns:
        r = await handle.options(session_id=session).remote(session, t)
        log.append((session, t, r["replica_id"], r["hit"]))


def replicas_by_session(log: list[Turn]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for session, _, replica, _ in log:
        out[session].add(replica)
    return out


def reprefills(log: list[Turn]) -> list[Turn]:
    return [x for x in log if x[1] > 0 and not x[3]]


async def test_sessions_stay_on_their_holder_through_scale_up(cluster):
    handle = deploy(config(2))
    sessions = [f"sess-{i}" for i in range(20)]
    log: list[Turn] = []

    await asyncio.gather(*(converse(handle, s, range(3), log) for s in sessions))
    placed = replicas_by_session(log)
    assert all(len(r) == 1 for r in placed.values()), placed
    assert reprefills(log) == []
    old_replicas = set().union(*placed.values())
    assert len(old_replicas) == 2  # HRW spreads 20 sessions over both

    # Let a stats round (0.2 s) reach the router so every session has a holder.
    await asyncio.sleep(1.0)

    # Scale 2 -> 3 while every session keeps talking, until after it is done.
    scaled = asyncio.Event()

    async def keep_talking(session: str) -> None:
        t = 3
        while not scaled.is_set():
            await converse(handle, session, range(t, t + 1), log)
            t += 1
            await asyncio.sleep(0.05)
        await converse(handle, session, range(t, t + 3), log)

    async def scale_up() -> None:
        await asyncio.to_thread(deploy, config(3))
        scaled.set()

    await asyncio.gather(scale_up(), *(keep_talking(s) for s in sessions))

    placed = replicas_by_session(log)
    assert all(len(r) == 1 for r in placed.values()), placed  # zero moves
    assert reprefills(log) == []
    assert len(log) >= 20 * 6

    # New sessions see the new replica: it takes its HRW share of them.
    fresh = [f"new-{i}" for i in range(20)]
    new_log: list[Turn] = []
    await asyncio.gather(*(converse(handle, s, range(2), new_log) for s in fresh))
    placed_new = replicas_by_session(new_log)
    assert all(len(r) == 1 for r in placed_new.values()), placed_new
    assert reprefills(new_log) == []
    all_replicas = set().union(*placed_new.values())
    assert all_replicas - old_replicas, "no new session reached the new replica"


async def test_requests_without_session_go_to_least_loaded(cluster):
    handle = deploy(config(2))
    results = await asyncio.gather(*(handle.remote(None) for _ in range(16)))
    assert not any(r["hit"] for r in results)
    # Two slots per replica and 16 at once: one replica alone cannot have taken them.
    assert len({r["replica_id"] for r in results}) == 2


def test_recent_placements_expire_and_stay_bounded():
    recent = RecentPlacements(ttl_s=5.0, max_entries=2)
    recent.put("a", "r1", now=0.0)
    assert recent.get("a", now=5.0) == "r1"
    assert recent.get("a", now=5.1) is None
    recent.put("b", "r2", now=1.0)
    recent.put("c", "r3", now=2.0)
    assert recent.get("a", now=2.0) is None  # evicted: least recently placed
    assert (recent.get("b", now=2.0), recent.get("c", now=2.0)) == ("r2", "r3")
