"""Models built without a checkpoint: the empty model a loader fills, and random weights for
tests, benchmarks, `load_format: dummy` and the embedded tiny model (same arithmetic as real weights)."""
from __future__ import annotations

import torch

from .families import ModelArgs
from .llama import CausalLM
from .tensor_parallel import split_model


def empty_model(args: ModelArgs, device, dtype, group=None) -> CausalLM:
    """Parameters allocated on `device`, uninitialised (built on the meta device first);
    with a tensor-parallel `group`, this rank's share."""
    with torch.device("meta"):
        model = CausalLM(args) if group is None else split_model(args, group)
    model.to_empty(device=device)
    model.tie_weights()
    return model.to(dtype)


def random_model(cfg: dict, device="cpu", dtype=torch.float32, seed: int = 0, group=None) -> CausalLM:
    """Random init (normal 0.02, unit norms) of the model the HF config `cfg` describes (with a
    tensor-parallel `group`: this rank's share, drawn independently per rank)."""
    args = ModelArgs.from_hf_config(cfg)
    model = empty_model(args, device, torch.float32, group)
    gen = torch.Generator(device=device).manual_seed(seed + (group.rank if group else 0))
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0 - args.norm_offset)  # unit scale whether w or (1 + w) is applied
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()
