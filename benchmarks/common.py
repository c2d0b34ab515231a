"""Shared pieces of the GPU benchmarks: model shapes, engine construction with random weights,
a Hugging Face model sharing the same weights, timing, floor, result files.

Every benchmark measures its baselines in the same process and run as our path
(DESIGN.md: HF eager's absolute time swings ~2x between runs).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swift_engine.config import EngineConfig
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.models.loader import load_model, read_config, resolve_model_dir
from swift_engine.models.random_init import random_model
from swift_engine.sampling import SamplingParams

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
                 intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False)
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 tie_word_embeddings=False)
# ~0.2B: for streaming a million tokens within a benchmark's time
SMALL = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=1024,
             intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
             tie_word_embeddings=False)
# the local default's shape (configs/local.yaml: SmolLM2-135M-Instruct; tied embeddings, GQA 9/3)
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True)
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "small-0.2b": SMALL, "smollm2-135m": SMOLLM2_135M}


# ---- results ---------------------------------------------------------------------
def gpu_tag() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for tag in ("h200", "h100", "a100", "l40s", "a10"):
        if tag in name.lower():
            return tag
    return name.lower().replace(" ", "_")


def results_dir() -> Path:
    d = Path(os.environ.get("SWIFTSERVE_RESULTS") or ROOT / "benchmarks" / "results" / gpu_tag())
    d.mkdir(parents=True, exist_ok=True)
    return d


def env_info() -> dict:
    import transformers

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gb=round(p.total_memory / 2**30, 1))
    return info


def save(name: str, data: dict) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"env": env_info(), **data}, indent=1, default=float))
    print(f"wrote {path}")
    return path


# ---- timing ------------------------------------------------------------------------
def cuda_time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median device time of fn() over reps, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth_gbs(gib: float = 2.0, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes read + written (the floor's denominator)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=reps)
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(args, tokens: int, elem: int = 2) -> int:
    return 2 * args.num_layers * args.num_kv_heads * args.head_dim * tokens * elem


def floor_ms(wbytes: int, kvbytes: int, gbs: float) -> float:
    return (wbytes + kvbytes) / (gbs * 1e9) * 1e3


# ---- the engine ----------------------------------------------------------------------
def shape_config(shape: str) -> dict:
    """HF config of a benchmark shape, or of a real model by name or path (e.g. smollm2-135m-instruct)."""
    return SHAPES[shape] if shape in SHAPES else read_config(resolve_model_dir(shape))


def make_model(shape: str | dict, dtype=torch.bfloat16, seed: int = 0):
    """Random weights of a benchmark shape; real weights for a model name or path."""
    if isinstance(shape, str) and shape not in SHAPES:
        return load_model(resolve_model_dir(shape), "cuda", dtype)
    cfg = SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(seed)
    return random_model(cfg, "cuda", dtype, seed)


def make_core(model, S: int, W: int, tokens_capacity: int, max_batch_tokens: int = 512,
              max_running: int = 64, page_size: int = 16, max_prompt_tokens: int = 1 << 22, **config) -> EngineCore:
    """An EngineCore over `model` whose page pool holds `tokens_capacity` tokens (+ reserves);
    `config`: further EngineConfig fields."""
    dtype = "bfloat16" if model.lm_head.weight.dtype == torch.bfloat16 else "float32"
    cfg = core_config(S, W, tokens_capacity, max_batch_tokens, max_running, page_size, max_prompt_tokens,
                      model="random", dtype=dtype, **config)
    return EngineCore(cfg, model, None)


def core_config(S: int, W: int, tokens_capacity: int, max_batch_tokens: int = 512, max_running: int = 64,
                page_size: int = 16, max_prompt_tokens: int = 1 << 22, **config) -> EngineConfig:
    """make_core's EngineConfig (also for tensor-parallel engines, benchmarks/tensor_parallel.py)."""
    pages = tokens_capacity // page_size + max_running * (max_batch_tokens // page_size + 4) + 64
    return EngineConfig(device="cuda", sink_tokens=S, window_tokens=W, page_size=page_size, num_pages=pages,
                        max_batch_tokens=max_batch_tokens, max_running=max_running,
                        max_prompt_tokens=max_prompt_tokens, **config)


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def submit_generate(core: EngineCore, sid: str, prompt: list[int], max_tokens: int,
                    sampling: SamplingParams | None = None) -> Request:
    """A generate request of `max_tokens` (greedy unless `sampling` says otherwise; eos ignored)."""
    # events are dropped: a benchmark that kept them would make Python's GC slower step after step
    sampling = (sampling or SamplingParams()).model_copy(update=dict(max_tokens=max_tokens, ignore_eos=True))
    req = Request(f"r-{sid}-{time.monotonic_ns()}", sid, "generate", list(prompt), emit=lambda ev: None,
                  sampling=sampling)
    core.submit(req)
    return req


def step_until(core: EngineCore, cond, limit: int = 1_000_000) -> int:
    n = 0
    while not cond() and n < limit:
        core.step()
        n += 1
    return n


def time_decode_steps(core: EngineCore, steps: int) -> float:
    """Wall ms per engine step (every running request decoding); sampling syncs each step."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def dense_forward_ms(hf, ids: list[int], reps: int, warmup: int) -> float:
    """Device time of one dense SDPA forward over `ids` (no cache, last logits only): the
    sliding-window-recompute step and the dense-prefill baseline."""
    x = torch.tensor([ids], device="cuda")
    set_attn(hf, "sdpa")

    def forward():
        with torch.no_grad():
            hf(input_ids=x, use_cache=False, logits_to_keep=1)
    return cuda_time_ms(forward, reps=reps, warmup=warmup)


def hf_sharing(model, hf_cfg: dict, attn: str = "eager"):
    """A transformers LlamaForCausalLM whose parameters are our model's tensors (no copy)."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = attn
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    sd = {k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False, assign=True)
    dev = model.lm_head.weight.device
    try:
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg, device=dev)
    except TypeError:  # newer transformers: no device argument
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg).to(dev)
    for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
        assert t.device == dev, f"{name} left on {t.device}"
    return hf.eval()


def set_attn(hf, attn: str) -> None:
    hf.config._attn_implementation = attn
    for m in hf.modules():
        if hasattr(m, "config") and m.config is not hf.config and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = attn


def free(*objs) -> None:
    import gc

    for o in objs:
        del o
    gc.collect()
    torch.cuda.empty_cache()


def log(*a) -> None:
    print(*a, flush=True)


def line_plot(name: str, xs: list, lines: list[tuple[str, list, dict]], xlabel: str, ylabel: str, title: str,
              ylog: bool = False) -> Path:
    """results_dir()/<name>.png: one line per (label, ys, matplotlib style), x on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, ys, style in lines:
        ax.plot(xs, ys, label=label, **{"marker": "o", **style})
    ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path
