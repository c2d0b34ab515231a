"""Models built without a checkpoint: the empty model a loader fills, and random weights for
tests, benchmarks, `load_format: dummy` and the embedded tiny model (same arithmetic as real weights)."""
from __future__ import annotations

import torch

from .families import ModelArgs
from .llama import CausalLM


def empty_model(args: ModelArgs, device, dtype) -> CausalLM:
    """Parameters allocated on `device`, uninitialised (built on the meta device first)."""
    with torch.device("meta"):
        model = CausalLM(args)
    model.to_empty(device=device)
    model.tie_weights()
    return model.to(dtype)


def random_model(cfg: dict, device="cpu", dtype=torch.float32, seed: int = 0) -> CausalLM:
    """Random init (normal 0.02, unit norms) of the model the HF config `cfg` describes."""
    args = ModelArgs.from_hf_config(cfg)
    model = empty_model(args, device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0 - args.norm_offset)  # unit scale whether w or (1 + w) is applied
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()
