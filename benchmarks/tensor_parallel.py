"""Benchmark helpers for tensor-parallel engines (`--tp N` of decode_latency.py and many_sessions.py).

The engine is split over N GPUs of this host: this process is rank 0 (EngineCore, as in the
single-GPU benchmarks), ranks 1..N-1 are local processes (swift_engine's own launcher), all on
random weights of the shape. The all-reduce share is measured with the PyTorch profiler: the
device time of NCCL kernels (all-reduces after attention and MLP, the embedding's all-reduce
and the LM head's all-gather) on rank 0 over a few decode steps.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common as C
import torch
from torch.profiler import ProfilerActivity, profile

from swift_engine.engine.core import EngineCore
from swift_engine.engine.tp_worker import start_rank0
from swift_engine.models.loader import load_engine_model


def make_tp_core(shape: str, tp: int, S: int, W: int, tokens_capacity: int, **kw) -> EngineCore:
    """C.make_core's engine over `tp` GPUs (cuda:0 .. cuda:tp-1), random weights of `shape`."""
    ckpt = Path(tempfile.mkdtemp(prefix=f"tp-{shape}-"))
    (ckpt / "config.json").write_text(json.dumps(C.SHAPES[shape]))
    cfg = C.core_config(S, W, tokens_capacity, model=str(ckpt), load_format="dummy", dtype="bfloat16",
                        tensor_parallel_size=tp, **kw)
    group = start_rank0(cfg)
    return EngineCore(cfg, load_engine_model(cfg, progress=False, group=group), None)


def close(core: EngineCore) -> None:
    core.runner.group.close()
    C.free()


def collective_ms(core: EngineCore, steps: int) -> float:
    """Rank 0's NCCL kernel time per engine step (ms), profiled over `steps` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.key.lower().startswith("nccl") and ":" not in e.key[:5]]
    return sum(e.device_time_total for e in kernels) / 1e3 / steps
