"""What a durable commit costs: commit latency with and without WAIT for replicas, in one run.

A real Sentinel deployment on loopback (1 primary, 2 replicas, 3 Sentinels; tests/sentinel_cluster.py),
RedisSessionStore through redis+sentinel://, records of a full S + W = 4096-id session (configs/gpu.yaml).
Modes alternate in rounds so drift on a shared machine hits each alike. Per mode: p50 / p99 / mean of
one commit at a time, and of `--concurrency` sessions committing at once (a busy replica).

    python benchmarks/commit_latency.py [--commits 2000] [--concurrency 16] [--acks 0 1 2]

Writes results/<device>/commit_latency.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import common as C

from routing.redis_store import RedisSessionStore
from routing.store import SessionRecord
from tests.sentinel_cluster import sentinel_cluster

TAIL = 4092  # configs/gpu.yaml: S = 4, W = 4092


async def commit_times(store: RedisSessionStore, records: list[SessionRecord], commits: int) -> list[float]:
    """Milliseconds per commit; len(records) sessions commit concurrently, commits in all."""
    times: list[float] = []

    async def one_session(record: SessionRecord, n: int) -> None:
        for i in range(n):
            start = time.perf_counter()
            await store.commit(record.model_copy(update={"turns": i}))
            times.append(1000 * (time.perf_counter() - start))

    per = max(1, commits // len(records))
    await asyncio.gather(*[one_session(r, per) for r in records])
    return times


async def sessions(store: RedisSessionStore, n: int, tag: str) -> list[SessionRecord]:
    out = []
    for i in range(n):
        claim = await store.claim(f"{tag}-{i}", "bench")
        out.append(claim.record.model_copy(update={"sink_ids": [1, 2, 3, 4], "tail_ids": list(range(TAIL)),
                                                   "tokens_seen": 100_000}))
    return out


def summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": q[98], "mean_ms": statistics.fmean(ms)}


async def run(args: argparse.Namespace, url: str) -> dict:
    stores = {a: RedisSessionStore(url, prefix="bench", min_replicas_acked=a, replica_ack_timeout_s=2.0)
              for a in args.acks}
    samples: dict[str, list[float]] = {}
    try:
        for concurrency in (1, args.concurrency):
            recs = {a: await sessions(s, concurrency, f"a{a}c{concurrency}") for a, s in stores.items()}
            for a, s in stores.items():  # warm-up: connections, script cache
                await commit_times(s, recs[a], concurrency * 5)
            for _ in range(args.rounds):
                for a, s in stores.items():
                    key = f"acks={a} concurrency={concurrency}"
                    samples.setdefault(key, []).extend(
                        await commit_times(s, recs[a], args.commits // args.rounds))
    finally:
        for s in stores.values():
            await s.close()
    return {key: summary(ms) for key, ms in samples.items()} | {"_samples": samples}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, ms in results["_samples"].items():
        xs = sorted(ms)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        s = results[key]
        ax.plot(xs, ys, label=f"{key}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms",
                linestyle="-" if key.endswith("concurrency=1") else "--")
    ax.set_xscale("log")
    ax.set_xlabel("commit latency (ms, log)")
    ax.set_ylabel("fraction of commits")
    ax.set_title("Commit of a 4096-id session record, Redis behind Sentinel (loopback)\n"
                 "acks = min_replicas_acked (WAIT for that many replicas)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = C.results_dir() / "commit_latency.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=2000, help="per mode and concurrency")
    ap.add_argument("--rounds", type=int, default=10, help="modes alternate this many times")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--acks", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with sentinel_cluster(replicas=max(2, *args.acks)) as cluster:
        results = asyncio.run(run(args, cluster.url))
    for key, s in results.items():
        if not key.startswith("_"):
            print(f"{key:28s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  mean {s['mean_ms']:7.2f} ms")
    plot(results)
    samples = results.pop("_samples")
    C.save("commit_latency", {"args": vars(args), "record_ids": 4 + TAIL, "setup": "1 primary, "
                              f"{max(2, *args.acks)} replicas, 3 Sentinels on loopback, redis-server 7.0",
                              "results": results, "samples_n": {k: len(v) for k, v in samples.items()}})


if __name__ == "__main__":
    main()
