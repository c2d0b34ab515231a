"""Ranks 1..N-1 of a tensor-parallel engine: load this rank's share, then run rank 0's steps.

No scheduler, sessions or sampling here: rank 0 decides every step and sends its plan
(token ids, page lists, slots, the host tier's copies); this rank writes its KV heads into the
same slots of its own page pool, moves its own pages to and from the host tier as rank 0's did,
and joins the forward's collectives. `spawn_workers` runs the ranks as local
processes (CPU tests, benchmarks, a bare GPU box); deployments/tp_workers.py runs them as Ray
actors in the replica's placement group. Either is a `start_workers(config, address)`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from ..config import EngineConfig
from ..models.families import ModelArgs
from ..models.loader import load_engine_model, read_config, resolve_model_dir
from ..models.progress import thread_lock_only
from ..models.tensor_parallel import check_tensor_parallel
from .cache_fit import fit_cache_to_model
from .core import kv_cache_for
from .host_tier import HostTier
from .model_runner import ModelRunner
from .tp_group import TensorParallelGroup, Workers, free_address

StartWorkers = Callable[[EngineConfig, str], Workers]  # (config, rendezvous address) -> ranks 1..N-1


def run_worker(config: EngineConfig, rank: int, address: str) -> None:
    """A rank's whole life: join the group, load, run steps until rank 0 sends None."""
    group = TensorParallelGroup(rank, config.tensor_parallel_size, address, config.device)
    if group.device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // group.size))
    try:
        model = load_engine_model(config, progress=False, group=group)
        config = fit_cache_to_model(config, model.args)
        cache = kv_cache_for(config, model)
        runner, host = ModelRunner(model, cache, config), HostTier(cache, config.host_cache_bytes)
        while (step := group.receive_step()) is not None:
            ops, *plan = step
            host.replay(ops)  # rank 0's host-tier copies, on this rank's own heads' pages
            runner.run(*plan)
    finally:
        group.close()


def start_rank0(config: EngineConfig, start_workers: StartWorkers | None = None) -> TensorParallelGroup:
    """Start ranks 1..N-1 (local processes unless `start_workers` is given) and join them as rank 0."""
    check_tensor_parallel(ModelArgs.from_hf_config(read_config(resolve_model_dir(config.model))),
                          config.tensor_parallel_size)  # before any rank starts
    address = free_address()
    workers = (start_workers or spawn_workers)(config, address)
    group = TensorParallelGroup(0, config.tensor_parallel_size, address, config.device)
    group.workers = workers
    return group


def rank_device(device: str, rank: int) -> str:
    """Local processes of one host: rank r on the r-th GPU after the configured one."""
    if device == "cpu":
        return device
    base = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


class ProcessWorkers:
    def __init__(self, procs: list):
        self.procs = procs

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stop(self, wait_s: float) -> None:
        for p in self.procs:
            p.join(timeout=wait_s)
            if p.is_alive():
                p.kill()


def _process_main(config: EngineConfig, rank: int, address: str) -> None:
    thread_lock_only()  # for its progress bars (it ends with os._exit)
    run_worker(config, rank, address)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the rank has left the group: skip interpreter teardown (seconds with torch loaded)


def spawn_workers(config: EngineConfig, address: str) -> ProcessWorkers:
    # forkserver: one fresh process imports torch and the engine once (no CUDA, no threads), then
    # forks each rank from it: ranks start in well under a second instead of an import each
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    procs = []
    for rank in range(1, config.tensor_parallel_size):
        cfg = config.model_copy(update={"device": rank_device(config.device, rank)})
        procs.append(ctx.Process(target=_process_main, args=(cfg, rank, address), daemon=True,
                                 name=f"swift-tp-rank{rank}"))
        procs[-1].start()
    return ProcessWorkers(procs)
