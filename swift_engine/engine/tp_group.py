"""The tensor-parallel process group of one engine (torch.distributed, one process per rank).

Model collectives (all-reduce, all-gather) run on the default group: nccl on CUDA, gloo on
the CPU. Rank 0's step plan goes to the other ranks over a second, gloo group on the CPU:
it is pickled Python (token ids, page lists), and over NCCL it would first be copied to the
GPU (vLLM keeps a CPU group for the same reason). One engine per process: torch.distributed's
default group is process-wide.
"""
from __future__ import annotations

import datetime
import socket
from typing import Protocol

import torch
import torch.distributed as dist

# Ranks 1..N-1 wait on the control group for rank 0's next step for as long as the engine idles.
IDLE_TIMEOUT = datetime.timedelta(days=365)


class Workers(Protocol):
    """Ranks 1..N-1 as their launcher runs them (processes, Ray actors)."""

    def alive(self) -> bool: ...

    def stop(self, wait_s: float) -> None:
        """Wait up to wait_s for the ranks to end (told to stop), then end those left."""


def free_address() -> str:
    """A TCP rendezvous address on this host (a replica's ranks share one node: STRICT_PACK)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class TensorParallelGroup:
    def __init__(self, rank: int, size: int, init_method: str, device: str):
        self.rank, self.size = rank, size
        self.device = torch.device(device)
        if self.device.index is not None:  # "cuda" alone: a Ray rank's only GPU, already current
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.workers: Workers | None = None  # rank 0 only: set by the launcher
        self.broken = False  # a step failed part-way: ranks may disagree on where they are
        self.closed = False

    # ---- model collectives -------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank 0's columns first."""
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])  # ranks' tensors back to back (gloo's form)
        dist.all_gather_single(out, x.contiguous())
        return out.unflatten(0, (self.size, -1)).movedim(0, -2).flatten(-2)

    # ---- the step plan (rank 0 -> the others) ------------------------------
    def send_step(self, step) -> None:
        dist.broadcast_object_list([step], src=0, group=self.control)

    def receive_step(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # ---- life ----------------------------------------------------------------
    def alive(self) -> bool:
        return not (self.broken or self.closed) and (self.workers is None or self.workers.alive())

    def close(self) -> None:
        """Rank 0: tell the other ranks to stop (None step), then leave the group."""
        if self.closed:
            return
        told = False
        if self.rank == 0 and self.alive():
            try:
                self.send_step(None)
                told = True
            except RuntimeError:  # a rank is gone already
                pass
        self.closed = True
        dist.destroy_process_group()  # before waiting for the others: their own leaving waits on ours
        if self.workers is not None:  # ranks not told wait for a step forever: end them now
            self.workers.stop(wait_s=30 if told else 0)


class StepBroadcaster:
    """Rank 0's model runner: sends each step's plan to the other ranks, then runs its own share.
    Every rank runs the same plan, so the collectives inside the forward line up. The plan carries
    the host tier's copies since the last step (engine/host_tier.py): each rank moves its own pages."""

    def __init__(self, runner, group: TensorParallelGroup, host):
        self.runner, self.group, self.device, self.host = runner, group, runner.device, host
        host.ops = []

    def run(self, chunks, plans, logit_rows):
        if self.group.broken:  # fail fast: the other ranks may be stuck in the failed step's collectives
            raise RuntimeError("a tensor-parallel step failed earlier: this engine must be restarted")
        try:
            ops, self.host.ops = self.host.ops, []
            self.group.send_step((ops, chunks, plans, logit_rows))
            return self.runner.run(chunks, plans, logit_rows)
        except Exception:
            self.group.broken = True  # the replica fails as a whole (health check), sessions fail over
            raise
