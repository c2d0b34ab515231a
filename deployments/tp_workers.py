"""Ranks 1..N-1 of a tensor-parallel LLMServer replica, as Ray actors in the replica's placement group.

The deployment reserves N bundles (`placement_group_bundles`, `STRICT_PACK`: one node); Serve places
the replica itself, rank 0, in bundle 0, and rank r runs in bundle r with that bundle's resources
(Ray gives each its own GPU: every rank's device is its `cuda`). The ranks are the replica's child
actors: a replica that dies takes them with it, and a rank that dies fails the replica's health
check (StreamingEngine.is_alive), so its sessions fail over as from any dead replica.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from swift_engine import EngineConfig, run_worker


@ray.remote
class TensorParallelRank:
    def run(self, config: EngineConfig, rank: int, address: str) -> None:
        run_worker(config, rank, address)


class RayWorkers:
    def __init__(self, actors: list, runs: list):
        self.actors, self.runs = actors, runs

    def alive(self) -> bool:
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        return not done  # a rank's run ends only when it is told to stop, or fails

    def stop(self, wait_s: float) -> None:
        ray.wait(self.runs, num_returns=len(self.runs), timeout=wait_s)
        for actor in self.actors:
            ray.kill(actor)


def start_ray_workers(config: EngineConfig, address: str) -> RayWorkers:
    """The engine's `start_workers` inside a Serve replica."""
    n = config.tensor_parallel_size
    pg = ray.util.get_current_placement_group()
    if pg is None or len(pg.bundle_specs) < n:
        raise ValueError(f"tensor_parallel_size: {n} ranks need the LLMServer deployment's "
                         f"placement_group_bundles to hold {n} bundles (one per rank, STRICT_PACK)")
    actors = []
    for rank in range(1, n):
        bundle = pg.bundle_specs[rank]
        actors.append(TensorParallelRank.options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        ).remote())
    return RayWorkers(actors, [a.run.remote(config, rank, address) for rank, a in enumerate(actors, 1)])
