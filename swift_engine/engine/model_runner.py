"""Runs one batched model step: flattened tokens of all scheduled sessions.

Two backends with one contract: `torch` (layers/attention.py, any device, the CPU
default) and `triton` (engine/gpu_runner.py: Triton kernels, fused forward, CUDA
graphs for decode), chosen automatically on CUDA when the shape is supported; and,
for load tests only, `simulated` (engine/simulated_runner.py: no model runs).
"""
from __future__ import annotations

import logging

import torch

from ..config import EngineConfig
from ..layers.attention import TorchSinkWindowAttention, plan_sequence
from ..layers.rotary import RotaryTable, inv_frequencies, model_rotary
from ..models.families import beyond_llama_block
from ..models.llama import CausalLM
from .cache import AppendPlan, SinkWindowCache
from .simulated_runner import SimulatedRunner

logger = logging.getLogger(__name__)


def select_backend(requested: str, model: CausalLM, device: torch.device, fp8_cache: bool = False) -> str:
    """'auto' -> triton on CUDA when the kernels support the shape, else torch."""
    if requested == "torch":
        return "torch"
    from ..layers.triton_attention import fp8_unsupported, supported
    from ..layers.triton_ops import INTERPRET

    why = supported(model.args.head_dim, model.lm_head.weight.dtype)
    if why is None and fp8_cache:
        why = fp8_unsupported(device)
    beyond = beyond_llama_block(model.args)
    if why is None and beyond:
        why = f"the fused GPU forward does not implement {model.args.family}'s {', '.join(beyond)}"
    if requested == "triton":
        if why is not None:
            raise ValueError(f"attention_backend='triton' is not available: {why}")
        if device.type != "cuda" and not INTERPRET:
            raise ValueError("attention_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1)")
        return "triton"
    if requested != "auto":
        raise ValueError(f"attention_backend: expected auto, torch or triton, got {requested!r}")
    if device.type == "cuda" and why is not None:
        logger.warning("attention_backend auto: the torch path runs on CUDA because %s", why)
    return "triton" if device.type == "cuda" and why is None else "torch"


class ModelRunner:
    def __init__(self, model: CausalLM, cache: SinkWindowCache, config: EngineConfig):
        a = model.args
        self.model, self.cache = model, cache
        self.sim = SimulatedRunner(config, a.vocab_size) if config.load_format == "simulated" else None
        self.device = self.sim.device if self.sim else model.lm_head.weight.device  # a simulated model is on meta
        self.backend = "simulated" if self.sim else select_backend(config.attention_backend, model, self.device,
                                                                   cache.fp8)
        positions = cache.max_sinks + cache.W + config.max_batch_tokens + 1  # cache positions + one chunk
        self.gpu = None
        if self.backend == "triton":  # float32 tables for the kernels (whole-head rotary only)
            from .gpu_runner import GpuRunner

            self.rope = RotaryTable(inv_frequencies(a.head_dim, a.rope_theta, a.rope_scaling), positions,
                                    self.device, torch.float32)
            self.gpu = GpuRunner(model, cache, config, self.rope)
        else:
            self.rope = model_rotary(a, positions, self.device, model.lm_head.weight.dtype)

    @torch.no_grad()
    def run(self, chunks: list[list[int]], plans: list[AppendPlan],
            logit_rows: list[list[int]]) -> list[torch.Tensor]:
        """chunks[i]: token ids of sequence i; logit_rows[i]: chunk rows whose logits are wanted.

        Returns float32 logits [len(logit_rows[i]), V] per sequence.
        """
        if self.sim is not None:
            return self.sim.run(chunks, plans, logit_rows)
        if self.gpu is not None:
            return self.gpu.run(chunks, plans, logit_rows)
        seqs, start = [], 0
        for chunk, plan in zip(chunks, plans):
            seqs.append(plan_sequence(plan, start, self.cache.W, self.device))
            start += len(chunk)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        write = torch.tensor([s for p in plans for s in p.write_slots], dtype=torch.long, device=self.device)
        attn = TorchSinkWindowAttention(self.cache, self.rope, seqs, write, self.model.args.attn_scale,
                                        self.model.args.attn_softcap)
        hidden = self.model(ids, attn)
        rows = torch.tensor([s.start + r for s, rs in zip(seqs, logit_rows) for r in rs],
                            dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden[rows]) if len(rows) else hidden.new_empty(0, 0)
        return list(torch.split(logits, [len(r) for r in logit_rows]))
