"""FP8 (e4m3) KV cache on the torch path: error bounds, equivalence with a stated tolerance, sizing.

Tolerance: e4m3 keeps 3 mantissa bits, so each stored value is within 2^-4 (relative) of the
original; through attention on the tiny random models below that gives logits within 3e-2
(relative norm) of the float32 slow reference (measured 1.4e-2).
"""
import pytest
import torch
from pydantic import ValidationError

from swift_engine import EngineConfig, SamplingParams, StreamingEngine
from swift_engine.engine.cache import PageTable, SinkWindowCache
from swift_engine.engine.core import pages_for_memory
from swift_engine.engine.kv_fp8 import FP8, dequantize, quantize
from swift_engine.engine.model_runner import ModelRunner
from swift_engine.layers.reference import reference_logits
from swift_engine.models.families import ModelArgs
from swift_engine.models.random_init import random_model

CFG = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
           rope_theta=10000.0)
S, W = 4, 12


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_per_token_scales_keep_small_channels_beside_key_outliers():
    x = torch.randn(64, 2, 128, generator=torch.Generator().manual_seed(0))
    x[..., 7] *= 200  # a pre-RoPE key outlier channel
    q, scale = quantize(x)
    assert q.dtype == FP8 and scale.shape == (64, 2)
    back = dequantize(q, scale, torch.float32)
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1))  # the largest value maps to 448 and back
    normal = x.abs() >= scale[..., None] * 2**-6  # values e4m3 holds as normals
    assert normal.float().mean() > 0.99  # 200x outliers leave the ordinary channels in range...
    err = ((back - x).abs() / x.abs())[normal]
    assert err.max() <= 2**-4 + 1e-6  # ...with 3 mantissa bits of relative precision, as the outlier
    assert (dequantize(*quantize(torch.zeros(3, 5)), torch.float32) == 0).all()


def stream(model, ids, chunk, kv_cache_dtype):
    a = model.args
    cache = SinkWindowCache(S, W, 4, 64, (a.num_layers, a.num_kv_heads, a.head_dim), "cpu", torch.float32,
                            kv_cache_dtype)
    runner = ModelRunner(model, cache, EngineConfig(max_batch_tokens=chunk))
    table, out = PageTable(), []
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        out.append(runner.run([part], [cache.append(table, len(part))], [list(range(len(part)))])[0])
        cache.evict(table)
    return torch.cat(out), cache


def test_fp8_logits_match_the_reference_within_tolerance_after_eviction():
    model = random_model(CFG, "cpu", torch.float32, 0)
    ids = torch.randint(0, 97, (10 * (S + W),), generator=torch.Generator().manual_seed(2)).tolist()
    ref = reference_logits(model, ids, S, W)
    by_token, cache = stream(model, ids, 1, "fp8")
    chunked, _ = stream(model, ids, 5, "fp8")
    assert cache.k.dtype == FP8 and cache.v.dtype == FP8
    assert 1e-4 < rel(by_token, ref) < 3e-2  # really quantized, and within the stated tolerance
    # a token's stored bytes do not depend on how the stream was chunked
    assert (chunked - by_token).abs().max() <= 1e-5
    assert (by_token.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_fp8_sizing_counts_bytes_and_scales():
    a = ModelArgs.from_hf_config(dict(CFG, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               head_dim=128, num_hidden_layers=32))  # Llama-2-7B's cache shape
    auto = EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory_gb=10)
    fp8 = auto.model_copy(update={"kv_cache_dtype": "fp8"})
    n_auto, n_fp8 = pages_for_memory(auto, a), pages_for_memory(fp8, a)
    # bf16: 2 x 128 x 2 bytes per token and head; fp8: 2 x (128 + 4) bytes
    assert n_fp8 / n_auto == pytest.approx(512 / 264, rel=1e-3)
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp16")


async def test_engine_serves_from_an_fp8_cache_within_its_memory():
    gb = 0.002
    engine = StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8,
                                          kv_cache_memory_gb=gb, kv_cache_dtype="fp8"), progress=False)
    try:
        dtype, held = engine.inspect(lambda c: (c.cache.k.dtype, sum(
            t.numel() * t.element_size() for t in (c.cache.k, c.cache.v, c.cache.k_scale, c.cache.v_scale))))
        assert dtype == FP8 and gb * 2**30 * 0.99 < held <= gb * 2**30
        events = [e async for e in engine.generate("s", prompt_token_ids=list(range(1, 80)),
                                                   sampling=SamplingParams(max_tokens=40, ignore_eos=True))]
        assert sum(e.token_id is not None for e in events) == 40
        assert engine.inspect(lambda c: c.sessions["s"].table.tokens) == 4 + 48  # evicted through the fp8 pages
    finally:
        engine.shutdown()


def test_perplexity_harness_runs_the_engine_with_an_fp8_cache():
    from swift_engine.eval import ppl

    model = random_model(CFG, "cpu", torch.float32, 1)
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = ppl.build_runs(["dense", "streaming"], [16], 4, [], 120, [], ("auto", "fp8"))
    assert [r.label for r in runs] == ["dense <= 120", "streaming 4+12", "streaming 4+12, fp8 KV"]
    _, auto, fp8 = ppl.evaluate(model, ids, runs, chunk=7, progress=False)
    assert not torch.equal(auto.logprobs, fp8.logprobs)  # the fp8 run really went through an fp8 cache
    assert abs(fp8.ppl() / auto.ppl() - 1) < 1e-2
