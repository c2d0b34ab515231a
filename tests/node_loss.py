"""The Ray failure-domain chaos run: a lost worker node. A head and 2 worker nodes on this machine
(tests/ray_nodes.py), the Serve config k8s renders for cpu-dev deployed with `serve deploy` (tiny model,
Redis store, 3 LLMServers at most 2 a node, 2 ingresses one a node, proxy on the head), 16 sessions of
traffic through the openai client; then a worker node is killed whole, and later a fresh one joins.

Counted: time to detection (GCS marks the node dead; Serve drops its replicas), time to the first
acknowledged turn of a session that lived there, failed attempts, acknowledged turns lost (store records
against what clients were told), sessions that go on (all, re-prefilled on a survivor), and the time for
the deployment to scale onto the node that joins.

In pytest: tests/test_node_loss.py (off by default: ~3-4 min on 2 cores). As a script, N runs in a row:

    python -m tests.node_loss --runs 3 --out benchmarks/results/cpu/node_loss.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import openai
import yaml

from routing.redis_store import RedisSessionStore
from tests.chaos_traffic import Traffic
from tests.ray_nodes import ROOT, LocalRayCluster
from tests.redis_server import free_port, redis_server
from tests.serve_utils import local_app_spec

RENDERED = ROOT / "k8s" / "overlays" / "cpu-dev" / "rayservice.yaml"
PREFIX = "nodeloss"


def serve_config(store_url: str, port: int) -> dict:
    """The serveConfigV2 k8s renders for cpu-dev, for one machine: tiny model, this Redis, a free port, the
    proxy on the head only (every node's proxy would want the same port), replicas spread over 2 nodes."""
    config = yaml.safe_load(yaml.safe_load(RENDERED.read_text())["spec"]["serveConfigV2"])
    config["proxy_location"] = "HeadOnly"
    config["http_options"] |= {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"] |= {k: local_app_spec()["args"][k] for k in ("model_id", "engine")}
    app["args"] |= {"store_url": store_url, "store_key_prefix": PREFIX}
    options = {d["name"]: d for d in app["deployments"]}
    options["LLMServer"] |= {"num_replicas": 3, "max_replicas_per_node": 2}
    options["OpenAIIngress"] |= {"num_replicas": 2, "max_replicas_per_node": 1}
    return config


async def until(check, timeout_s: float, what: str, period_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (result := await asyncio.to_thread(check)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(period_s)
    return result


def running(cluster: LocalRayCluster, deployment: str) -> list[dict]:
    return [r for r in cluster.replicas(deployment) if r.get("state") == "RUNNING"]


async def node_loss_run(cluster: LocalRayCluster, url: str, store_url: str, sessions: int = 16) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    traffic = Traffic(client, sessions, prefix=f"{PREFIX}-{time.monotonic_ns() % 10**6}")
    task = asyncio.ensure_future(traffic.run())
    try:
        await until(lambda: all(c.turns >= 2 for c in traffic.convs), 120, "every session has 2 turns")
        replica_node = {r["replica_id"]: r["node_id"] for r in running(cluster, "LLMServer")}
        by_node: dict[str, int] = {}
        for node_id in replica_node.values():
            by_node[node_id] = by_node.get(node_id, 0) + 1
        victim = max(cluster.nodes[1:], key=lambda n: by_node.get(cluster.node_id(n), 0))
        victim_id = cluster.node_id(victim)
        last = {c.sid: [a for a in traffic.attempts if a.sid == c.sid and a.ok][-1].replica for c in traffic.convs}
        affected = {sid for sid, replica in last.items() if replica_node.get(replica) == victim_id}
        killed = await asyncio.to_thread(victim.kill)
        await until(lambda: cluster.is_dead(victim), 120, "the GCS marks the node dead")
        node_dead_s = time.monotonic() - killed
        await until(lambda: not any(r["node_id"] == victim_id for r in running(cluster, "LLMServer")), 120,
                    "Serve drops the replicas of the dead node")
        serve_noticed_s = time.monotonic() - killed

        victim_replicas = {r for r, node in replica_node.items() if node == victim_id}

        def moved_ok() -> list:  # turns the survivors answered (one in flight may have been resent by the ingress)
            return [a for a in traffic.attempts
                    if a.ok and a.sid in affected and a.end > killed and a.replica not in victim_replicas]
        await until(lambda: {a.sid for a in moved_ok()} == affected, 180, "every affected session has a turn")
    finally:
        traffic.stop.set()
        await task
    await traffic.final_round()
    first = {sid: min((a for a in moved_ok() if a.sid == sid), key=lambda a: a.end) for sid in affected}
    figures = {"sessions": sessions, "affected_sessions": len(affected), "replicas_on_victim": by_node.get(victim_id),
               "node_dead_s": round(node_dead_s, 2), "serve_dropped_replicas_s": round(serve_noticed_s, 2),
               "first_affected_ok_turn_s": round(min((a.end for a in first.values()), default=0) - killed, 2),
               "last_affected_first_ok_turn_s": round(max((a.end for a in first.values()), default=0) - killed, 2),
               "failed_attempts_after_kill": len(traffic.failures(killed, time.monotonic())),
               "error_kinds": sorted({a.error.split(":")[0] for a in traffic.failures(killed, time.monotonic())}),
               "affected_reprefilled": sum(a.reprefill_ms is not None for a in first.values()),
               # a turn that had committed on the dead node but whose reply never arrived: its retry is
               # answered with the committed reply (no second run, so no re-prefill header)
               "affected_replayed": sum(a.reprefill_ms is None and retried(traffic, a, killed)
                                        for a in first.values()),
               "turns_acknowledged": sum(c.turns for c in traffic.convs)}
    return figures | await store_check(traffic, store_url, affected, victim_replicas)


def retried(traffic: Traffic, ok, since: float) -> bool:
    """Whether `ok` followed a failed attempt of the same session after `since` (the same turn, resent)."""
    return any(a.sid == ok.sid and not a.ok and since < a.end <= ok.start for a in traffic.attempts)


async def store_check(traffic: Traffic, store_url: str, affected: set[str], dead: set[str]) -> dict:
    store = RedisSessionStore(store_url, prefix=PREFIX)
    try:
        records = {c.sid: await store.get(c.sid) for c in traffic.convs}
    finally:
        await store.close()
    stored = {sid: (r.turns, r.messages_consumed) if r else (0, 0) for sid, r in records.items()}
    return {"acknowledged_turns_lost": sum(max(0, c.turns - stored[c.sid][0]) for c in traffic.convs),
            "history_mismatches": len(traffic.mismatches()),
            "sessions_continued": sum(stored[c.sid] == (c.turns, len(c.history)) for c in traffic.convs),
            "affected_owned_by_survivor": sum(records[sid] is not None and records[sid].owner not in dead
                                              for sid in affected)}


async def scale_back(cluster: LocalRayCluster) -> dict:
    """A fresh worker joins: the replica Serve could not place (at most 2 a node) starts there."""
    start = time.monotonic()
    node = await asyncio.to_thread(cluster.add_worker)
    joined = time.monotonic() - start
    node_id = cluster.node_id(node)
    await until(lambda: len(running(cluster, "LLMServer")) == 3 and
                any(r["node_id"] == node_id for r in running(cluster, "LLMServer")), 240,
                "a LLMServer replica runs on the new node")
    return {"node_joined_s": round(joined, 1), "replica_on_new_node_s": round(time.monotonic() - start, 1)}


async def deployed(cluster: LocalRayCluster, timeout_s: float = 300) -> None:
    await until(lambda: len(running(cluster, "LLMServer")) == 3 and len(running(cluster, "OpenAIIngress")) == 2,
                timeout_s, "the application runs", period_s=1.0)


def one_run(sessions: int = 16) -> dict:
    """Cluster, Redis, deploy, traffic, node loss, a node back; everything is stopped on the way out."""
    cluster = LocalRayCluster()
    try:
        with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            cluster.start_head()
            for _ in range(2):
                cluster.add_worker()
            port = free_port()
            config = Path(tmp) / "serve.yaml"
            config.write_text(yaml.safe_dump(serve_config(redis.url, port)))
            cluster.serve_deploy(config)
            asyncio.run(deployed(cluster))
            up_s = time.monotonic() - started
            figures = asyncio.run(node_loss_run(cluster, f"http://127.0.0.1:{port}", redis.url, sessions))
            return {"cluster_and_app_up_s": round(up_s, 1)} | figures | asyncio.run(scale_back(cluster))
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for _ in range(args.runs):
        runs.append(one_run(args.sessions))
        print(json.dumps(runs[-1], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"runs": runs}, indent=1))
    bad = [r for r in runs if r["acknowledged_turns_lost"] or r["sessions_continued"] != r["sessions"]]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
