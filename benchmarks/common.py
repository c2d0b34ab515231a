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
from swift_engine.engine.cache import PageTable, SinkWindowCache
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.models.loader import random_model
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
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "small-0.2b": SMALL}


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
class PageLevelPlan:
    """Proposed cache.py change (NOTES-gpu.md): an AppendPlan that carries page lists and builds
    the per-token slot lists only when asked (the torch path asks; the GPU path never does).
    cache.append today builds S+W Python ints per session per step (~0.6-1.2 ms at 4096)."""

    __slots__ = (
        "P",
        "new_sinks",
        "old_window",
        "sink_len",
        "sink_pages",
        "window_len",
        "window_pages",
        "window_start",
        "write_slots",
    )

    def __init__(self, write_slots, new_sinks, old_window, table: PageTable, P: int):
        self.write_slots, self.new_sinks, self.old_window, self.P = write_slots, new_sinks, old_window, P
        self.sink_pages, self.sink_len = list(table.sink_pages), table.sink_len
        self.window_pages, self.window_start, self.window_len = list(table.window_pages), table.window_start, \
            table.window_len

    @property
    def sink_slots(self):
        P = self.P
        return [self.sink_pages[i // P] * P + i % P for i in range(self.sink_len)]

    @property
    def window_slots(self):
        P, ws = self.P, self.window_start
        return [self.window_pages[(ws + i) // P] * P + (ws + i) % P for i in range(self.window_len)]


class PageLevelCache(SinkWindowCache):
    def append(self, table: PageTable, n: int):
        from swift_engine.errors import CapacityError

        if self.pages_for(table, n) > len(self.free):
            raise CapacityError("KV page pool exhausted (scheduler reservation violated)")
        old_window = table.window_len
        new_sinks = min(n, self.S - table.sink_len)
        write = [self._push_sink(table) for _ in range(new_sinks)]
        write += [self._push_window(table) for _ in range(n - new_sinks)]
        return PageLevelPlan(write, new_sinks, old_window, table, self.P)


def use_page_level_plans(enabled: bool = True) -> None:
    """Make EngineCore build PageLevelCache (the proposed cache.py behaviour) from now on."""
    import swift_engine.engine.core as core_mod

    core_mod.SinkWindowCache = PageLevelCache if enabled else SinkWindowCache


class BatchedSampling:
    """Proposed core.py change (NOTES-gpu.md), demonstrated without editing core.py: sample every
    greedy row of a step in one pass (one log_softmax/argmax over [B, V], one device->host copy)
    instead of one sample() call, with its own syncs, per request. Patches core's `sample` so
    rows precomputed for this step are looked up; anything else falls through to the original."""

    def __init__(self, core: EngineCore):
        import swift_engine.engine.core as core_mod

        self.core, self.mod, self.orig_run, self.orig_sample = core, core_mod, core.runner.run, core_mod.sample
        self.cache: dict[int, tuple[int, float]] = {}
        core.runner.run = self.run
        core_mod.sample = self.sample

    def run(self, chunks, plans, logit_rows):
        out = self.orig_run(chunks, plans, logit_rows)
        rows = [o[-1] for o in out if len(o)]
        self.cache.clear()
        if rows:
            lg = torch.stack(rows).float()
            lp = torch.log_softmax(lg, dim=-1)
            ids = lg.argmax(-1)
            vals = torch.stack([ids.float(), lp.gather(1, ids[:, None])[:, 0]]).tolist()
            k = 0
            for o in out:
                if len(o):
                    self.cache[o[-1:].data_ptr()] = (int(vals[0][k]), vals[1][k])
                    k += 1
        return out

    def sample(self, logits, params, generators):
        if len(params) == 1 and params[0].greedy and logits.data_ptr() in self.cache:
            tok, lp = self.cache[logits.data_ptr()]
            return [tok], [lp]
        return self.orig_sample(logits, params, generators)

    def close(self):
        del self.core.runner.run  # back to the class method (no reference cycle through the runner)
        self.mod.sample = self.orig_sample
        self.core = self.orig_run = None


def make_model(shape: str | dict, dtype=torch.bfloat16, seed: int = 0):
    cfg = SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(seed)
    return random_model(cfg, "cuda", dtype, seed)


def make_core(model, S: int, W: int, tokens_capacity: int, max_batch_tokens: int = 512,
              max_running: int = 64, page_size: int = 16, page_level: bool = True,
              max_prompt_tokens: int = 1 << 22) -> EngineCore:
    """An EngineCore over `model` whose page pool holds `tokens_capacity` tokens (+ reserves)."""
    use_page_level_plans(page_level)
    pages = tokens_capacity // page_size + max_running * (max_batch_tokens // page_size + 4) + 64
    cfg = EngineConfig(model="random", device="cuda", dtype="bfloat16" if model.lm_head.weight.dtype ==
                       torch.bfloat16 else "float32", sink_tokens=S, window_tokens=W, page_size=page_size,
                       num_pages=pages, max_batch_tokens=max_batch_tokens, max_running=max_running,
                       **({"max_prompt_tokens": max_prompt_tokens}
                          if "max_prompt_tokens" in EngineConfig.model_fields else {}))
    return EngineCore(cfg, model, None)


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def submit_generate(core: EngineCore, sid: str, prompt: list[int], max_tokens: int) -> Request:
    # events are dropped: a benchmark that kept them would make Python's GC slower step after step
    req = Request(f"r-{sid}-{time.monotonic_ns()}", sid, "generate", list(prompt), emit=lambda ev: None,
                  sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
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
