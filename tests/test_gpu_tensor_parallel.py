"""Tensor parallelism on GPUs (NCCL, Triton kernels, CUDA graphs per rank): TP = 2 (and 4 where
the host has 4 GPUs) gives the one-GPU engine's log-probs and greedy tokens, float32 to 1e-4
(summation order differs across ranks) and bfloat16 to 5e-2. Skipped without enough GPUs."""
import asyncio

import pytest
import torch

from tests.test_gpu import BASE
from tests.test_tensor_parallel import engine, flat, scenario, write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
CONFIG = {**BASE, "vocab_size": 262, "bos_token_id": 256, "eos_token_id": 257}  # the byte tokenizer's ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp-gpu"), CONFIG)


def run(checkpoint, tp: int, dtype: str) -> dict:
    e = engine(checkpoint, tp, device="cuda", dtype=dtype, attention_backend="triton", page_size=16)
    try:
        assert e.inspect(lambda c: c.runner.device.type) == "cuda"
        return asyncio.run(scenario(e))
    finally:
        e.shutdown()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_on_gpus_equals_one_gpu(checkpoint, tp, dtype, tol):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA GPUs")
    one, split = run(checkpoint, 1, dtype), run(checkpoint, tp, dtype)
    for case in one:
        ref, got = flat(one[case]), flat(split[case])
        worst = max(abs(a - b) for a, b in zip(ref, got, strict=True))
        if dtype == "float32":
            assert worst <= tol, f"{case}: TP={tp} differs from one GPU by {worst:.2e}"
    if dtype == "bfloat16":  # greedy ties may flip in bf16: compare the first case's log-probs only
        worst = max(abs(a - b) for a, b in zip(flat(one["prefill"]), flat(split["prefill"]), strict=True))
        assert worst <= tol
