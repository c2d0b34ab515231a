"""Load a checkpoint of a supported family (local dir or hub id) or build one with random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..errors import UnsupportedModelError
from .families import ModelArgs
from .llama import CausalLM
from .random_init import empty_model, random_model
from .resolve import BUNDLED, bundled_models, resolve_model_dir  # noqa: F401 - their old home
from .tensor_parallel import shard_tensor


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# HF recomputes these buffers; old Llama checkpoints still carry them
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_tensors(name: str, tensor: torch.Tensor, args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor as (our parameter name, tensor) pairs: fused projections are split."""
    prefix, _, leaf = name.rpartition(".")
    prefix, _, module = prefix.rpartition(".")
    if module not in args.fused:
        return [(name, tensor)]
    if module == "qkv_proj":  # Phi-3: q, k, v rows back to back
        sizes, names = [args.num_heads * args.head_dim] + [args.num_kv_heads * args.head_dim] * 2, \
            ["q_proj", "k_proj", "v_proj"]
    else:  # gate_up_proj: gate rows, then up rows
        sizes, names = [tensor.shape[0] // 2] * 2, ["gate_proj", "up_proj"]
    if sum(sizes) != tensor.shape[0]:
        raise UnsupportedModelError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows; expected {sum(sizes)}")
    return [(f"{prefix}.{n}.{leaf}", part) for n, part in zip(names, torch.split(tensor, sizes))]


def load_engine_model(config, progress: bool = True, group=None) -> CausalLM:
    """The model an EngineConfig names, as its load_format says (a tensor-parallel rank: its share)."""
    if config.load_format == "simulated":  # no weights: the step table's shape (engine/simulated_runner.py)
        from .step_table import load_step_table, shape_model

        return shape_model(load_step_table(config.simulated.step_table), config.torch_dtype,
                           config.simulated.vocab_size)
    model_dir = resolve_model_dir(config.model)
    if config.load_format == "dummy":
        return random_model(read_config(model_dir), config.device, config.torch_dtype, group=group)
    return load_model(model_dir, config.device, config.torch_dtype, progress, group)


def load_model(model_dir: Path, device="cpu", dtype=torch.float32, progress: bool = True,
               group=None) -> CausalLM:
    """Strict: every checkpoint tensor lands in a parameter of the same shape and every parameter is
    loaded, else UnsupportedModelError names the tensor (a dropped bias would silently change logits).
    With a tensor-parallel `group`, this rank's share (models/tensor_parallel.py)."""
    args = ModelArgs.from_hf_config(read_config(model_dir))
    model = empty_model(args, device, dtype, group)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in tqdm(files, desc="loading weights", disable=not progress or len(files) < 2):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if not name.endswith(IGNORED_SUFFIXES):
                    for ours, tensor in checkpoint_tensors(name, f.get_tensor(name), args):
                        if group is not None:
                            tensor = shard_tensor(ours, tensor, args, group.rank, group.size)
                        _copy(params, ours, name, tensor, args)
                        loaded.add(ours)
    missing = set(params) - loaded
    if args.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise UnsupportedModelError(f"checkpoint {model_dir} lacks weights: {sorted(missing)[:5]}")
    return model.eval()


def _copy(params: dict, ours: str, name: str, tensor: torch.Tensor, args: ModelArgs) -> None:
    param = params.get(ours)
    if param is None:
        raise UnsupportedModelError(
            f"checkpoint tensor {name!r} has no place in the {args.family} model its config.json describes "
            "(a bias, norm or layer the config does not switch on); refusing rather than dropping it")
    if param.shape != tensor.shape:
        raise UnsupportedModelError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; "
                                    f"the config gives {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
