"""Re-prefills per 1,000 turns across scale-up and scale-down, per router.

Runs the same workload against SessionAffinityRouter and Ray's experimental
ConsistentHashRouter (as shipped: 2 fallback replicas when the owner is busy;
and strict: none), one after the other on one local Ray cluster, with
CacheHolder replicas (benchmarks/cache_holder.py):

- `--slots` conversations run concurrently; each slot talks one session of
  `--turns` turns after another (new session ids keep arriving, as in a chat
  service), with `--think-ms` between turns;
- 2 replicas for `--phase-turns` turns, then scale 2 -> 3 while traffic
  continues, `--phase-turns` more turns, scale 3 -> 2 while traffic
  continues, `--phase-turns` more turns;
- a re-prefill is a turn, other than a session's first, served by a replica
  that did not hold a fresh copy of that session's cache (CacheHolder says so
  per turn).

Scaling edits the Serve config (num_replicas only), as `serve deploy` or
KubeRay would, so surviving replicas keep their caches.

The driver holds the only router, so SessionAffinityRouter's memory of its
own placements sees every turn; `session_affinity_stats_only` turns that
memory off, as for a fleet of proxies where each turn may take another one.

    python -m benchmarks.routing_reprefills [--slots 16 --turns 32 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from benchmarks.cache_holder import app_config, deploy

_CH = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (class, kwargs)
    "session_affinity": ("routing.router:SessionAffinityRouter", {}),
    "session_affinity_stats_only": (
        "routing.router:SessionAffinityRouter",
        {"recent_ttl_s": 0.0},
    ),
    "consistent_hash": (_CH, {}),
    "consistent_hash_strict": (_CH, {"num_fallback_replicas": 0}),
}
OUT = Path(__file__).parent / "results" / "cpu" / "routing_reprefills.json"


@dataclass(frozen=True)
class Turn:
    session: str
    index: int
    replica: str
    hit: bool
    phase: str

    @property
    def reprefill(self) -> bool:
        return self.index > 0 and not self.hit


class Traffic:
    """Concurrent conversations that keep going until told to stop."""

    def __init__(self, handle: DeploymentHandle, args: argparse.Namespace):
        self.handle, self.args = handle, args
        self.log: list[Turn] = []
        self.phase = "2"
        self.stop = asyncio.Event()
        self._ids = itertools.count()

    async def slot(self) -> None:
        while not self.stop.is_set():
            session = f"s{next(self._ids)}"
            for t in range(self.args.turns):
                if self.stop.is_set():
                    return
                r = await self.handle.options(session_id=session).remote(session, t)
                self.log.append(Turn(session, t, r["replica_id"], r["hit"], self.phase))
                await asyncio.sleep(self.args.think_ms / 1000)

    async def until(self, turns: int) -> None:
        while len(self.log) < turns:
            await asyncio.sleep(0.01)


async def scenario(router: str, args: argparse.Namespace) -> dict[str, Any]:
    name = f"reprefill-{router}"
    router_class, router_kwargs = ROUTERS[router]

    def config(n: int) -> dict[str, Any]:
        return app_config(
            name,
            n,
            router_class,
            router_kwargs=router_kwargs,
            stats_period_s=args.stats_period_s,
            capacity=args.capacity,
            max_running=args.max_running,
            turn_s=args.turn_ms / 1000,
        )

    traffic = Traffic(deploy(config(2)), args)
    slots = [asyncio.create_task(traffic.slot()) for _ in range(args.slots)]
    started = time.monotonic()
    # (phase while scaling, target replicas, phase after): traffic never pauses.
    for scaling, target, after in (("2->3", 3, "3"), ("3->2", 2, "2 again")):
        await traffic.until(len(traffic.log) + args.phase_turns)
        traffic.phase = scaling
        await asyncio.to_thread(deploy, config(target))
        traffic.phase = after
    await traffic.until(len(traffic.log) + args.phase_turns)
    traffic.stop.set()
    await asyncio.gather(*slots)
    elapsed = time.monotonic() - started

    log = traffic.log
    reprefills = [t for t in log if t.reprefill]
    replicas_by_phase: dict[str, set] = {}
    for t in log:
        replicas_by_phase.setdefault(t.phase, set()).add(t.replica)
    return {
        "router": router_class,
        "router_kwargs": router_kwargs,
        "turns": len(log),
        "sessions": len({t.session for t in log}),
        "reprefills": len(reprefills),
        "reprefills_per_1000_turns": round(1000 * len(reprefills) / len(log), 2),
        "turns_by_phase": dict(Counter(t.phase for t in log)),
        "reprefills_by_phase": dict(Counter(t.phase for t in reprefills)),
        "replicas_serving_by_phase": {p: len(r) for p, r in replicas_by_phase.items()},
        "seconds": round(elapsed, 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results = {r: await scenario(r, args) for r in args.routers}
    ours = results.get("session_affinity", {}).get("reprefills_per_1000_turns")
    return {
        "benchmark": "routing_reprefills",
        "ray_version": ray.__version__,
        "args": vars(args) | {"out": str(args.out)},
        "results": results,
        # How many times more re-prefills each other router did (None: we did none).
        "ratio_over_session_affinity": {
            name: round(r["reprefills_per_1000_turns"] / ours, 2) if ours else None
            for name, r in results.items()
            if name != "session_affinity"
        },
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=16, help="concurrent conversations")
    p.add_argument("--turns", type=int, default=32, help="turns per session")
    p.add_argument("--phase-turns", type=int, default=200, help="turns per phase")
    p.add_argument("--think-ms", type=float, default=20.0)
    p.add_argument("--turn-ms", type=float, default=10.0, help="replica time per turn")
    p.add_argument("--max-running", type=int, default=4, help="batch slots per replica")
    p.add_argument("--capacity", type=int, default=256, help="sessions per replica")
    p.add_argument("--stats-period-s", type=float, default=0.2)
    p.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = asyncio.run(main(args))
    finally:
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["results"].items():
        print(
            f"{name:>22}: {r['reprefills_per_1000_turns']:7.2f} re-prefills / 1000 turns"
            f"  ({r['reprefills']} of {r['turns']} turns, {r['sessions']} sessions)"
        )
    for name, x in report["ratio_over_session_affinity"].items():
        print(f"ratio {name} / session_affinity:", "inf (ours: 0)" if x is None else x)
    print("wrote", args.out)
