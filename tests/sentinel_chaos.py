"""The Redis failure-domain chaos run: a 3-replica app on a Sentinel-managed Redis, under chat traffic,
while the primary is SIGKILLed (twice; Sentinel promotes a replica) and the replicas are SIGSTOPped (WAIT
times out). Counted: acknowledged turns lost, turns failed per fault and for how long, sessions that go on.

In pytest: tests/test_sentinel_chaos.py (short). Longer, N runs in a row, figures to JSON:

    python -m tests.sentinel_chaos --runs 3 --sessions 16 --out benchmarks/results/cpu/sentinel_chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import yaml
from ray import serve

from deployments.app import app_from_config
from routing.redis_store import RedisSessionStore
from tests.chaos_traffic import Traffic
from tests.redis_server import free_port
from tests.sentinel_cluster import SentinelCluster, sentinel_cluster
from tests.serve_utils import LOCAL_CONFIG, local_app_spec

PREFIX = "chaos"
# commit_timeout_s stays at its default (5 s): ~13 commit attempts, which outlast a promotion (2-3 s
# here) and a replica stall shorter than ~12 s (13 WAITs of 0.5 s plus the backoff)
STORE_ARGS = {"durability": "strict", "min_replicas_acked": 1, "replica_ack_timeout_s": 0.5}


@contextmanager
def sentinel_app(cluster: SentinelCluster, replicas: int = 3, args: dict | None = None) -> Iterator[str]:
    """serve.run the local app (tiny model) with `replicas` LLMServers on the Sentinel store (STORE_ARGS, updated
    by `args`); yields its URL."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["applications"][0] = spec = local_app_spec()
    next(d for d in spec["deployments"] if d["name"] == "LLMServer")["num_replicas"] = replicas
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        app, _ = app_from_config(f.name, {"store_url": cluster.url, "store_key_prefix": PREFIX,
                                             **STORE_ARGS, **(args or {})})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="swiftserve", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


async def kill_primary(cluster: SentinelCluster, traffic: Traffic, settle_s: float) -> dict:
    """SIGKILL the primary, let Sentinel promote, restart the dead node as a replica; the fault's figures."""
    await asyncio.sleep(settle_s)
    killed = time.monotonic()
    victim = await asyncio.to_thread(cluster.kill_primary)
    new, promotion_s = await asyncio.to_thread(cluster.wait_promoted, victim)
    await asyncio.to_thread(cluster.rejoin, victim)  # a restarted pod; WAIT needs a replica again
    await asyncio.sleep(settle_s)
    return fault_figures(traffic, "kill primary", killed, time.monotonic()) | {
        "promotion_s": round(promotion_s, 2), "old": victim.name, "new": new.name}


async def stall_replicas(cluster: SentinelCluster, traffic: Traffic, stall_s: float, settle_s: float) -> dict:
    """SIGSTOP every replica for `stall_s`: WAIT times out, so strict durability acknowledges nothing."""
    await asyncio.sleep(settle_s)
    replicas = cluster.replicas()
    stopped = time.monotonic()
    for node in replicas:
        node.pause()
    try:
        await asyncio.sleep(stall_s)
    finally:
        for node in replicas:
            node.resume()
    resumed = time.monotonic()
    await asyncio.sleep(settle_s)
    # a turn acknowledged between the stop (plus a margin for replies on their way) and the resume
    # was acknowledged without a replica: exactly what min_replicas_acked forbids
    acked_while_stalled = traffic.acknowledged(stopped + 1.0, resumed)
    return fault_figures(traffic, "stop replicas", stopped, time.monotonic()) | {
        "stall_s": stall_s, "acknowledged_while_stalled": len(acked_while_stalled)}


def fault_figures(traffic: Traffic, fault: str, start: float, end: float) -> dict:
    failed = traffic.failures(start, end)
    after = [a for a in traffic.attempts if a.ok and a.start >= start]
    overlapping = [a.end - a.start for a in traffic.attempts if a.ok and a.end >= start and a.start <= end]
    return {"fault": fault, "failed_turn_attempts": len(failed),
            "failed_for_s": round(max((a.end for a in failed), default=start) - start, 2),
            "first_ok_turn_started_after_s": round(min((a.end for a in after), default=end) - start, 2),
            "slowest_ok_turn_s": round(max(overlapping, default=0.0), 2),
            "errors": dict(Counter(a.error.split(":")[0] for a in failed)),
            "error_samples": sorted({a.error[:160] for a in failed})[:4]}


async def stored_turns(cluster: SentinelCluster, sids: list[str]) -> dict[str, tuple[int, int]]:
    store = RedisSessionStore(cluster.url, prefix=PREFIX)
    try:
        records = {sid: await store.get(sid) for sid in sids}
    finally:
        await store.close()
    return {sid: (r.turns, r.messages_consumed) if r else (0, 0) for sid, r in records.items()}


async def chaos_run(url: str, cluster: SentinelCluster, sessions: int = 16, kills: int = 2,
                    stall_s: float = 15.0, settle_s: float = 2.0) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    traffic = Traffic(client, sessions, prefix=f"{PREFIX}-{time.monotonic_ns() % 10**6}")
    started = time.monotonic()
    running = asyncio.ensure_future(traffic.run())
    try:
        faults = [await kill_primary(cluster, traffic, settle_s) for _ in range(kills)]
        faults.append(await stall_replicas(cluster, traffic, stall_s, settle_s))
    finally:
        traffic.stop.set()
        await running
    await traffic.final_round()
    stored = await stored_turns(cluster, [c.sid for c in traffic.convs])
    lost = sum(max(0, c.turns - stored[c.sid][0]) for c in traffic.convs)
    return {"sessions": sessions, "seconds": round(time.monotonic() - started, 1),
            "turns_acknowledged": sum(c.turns for c in traffic.convs),
            "turn_attempts_failed": sum(not a.ok for a in traffic.attempts),
            "failed_after_start_s": sorted(round(a.end - started, 1) for a in traffic.attempts if not a.ok)[:40],
            "error_samples": sorted({a.error[:160] for a in traffic.attempts if not a.ok})[:4],
            "acknowledged_turns_lost": lost, "history_mismatches": len(traffic.mismatches()),
            "sessions_continued": sum(stored[c.sid] == (c.turns, len(c.history)) for c in traffic.convs),
            "faults": faults}


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--stall-s", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, namespace="swiftserve-chaos")
    runs = []
    try:
        for i in range(args.runs):
            with sentinel_cluster(replicas=2) as cluster, sentinel_app(cluster) as url:
                runs.append(asyncio.run(chaos_run(url, cluster, args.sessions, args.kills, args.stall_s)))
            print(json.dumps(runs[-1], indent=1), flush=True)
    finally:
        ray.shutdown()
    if args.out:
        args.out.write_text(json.dumps({"store_args": STORE_ARGS, "runs": runs}, indent=1))
    bad = [r for r in runs if r["acknowledged_turns_lost"] or r["sessions_continued"] != r["sessions"]]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
