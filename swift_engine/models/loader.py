"""Load a Llama-family checkpoint (local dir or hub id) or build one with random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .llama import CausalLM, ModelArgs


BUNDLED = Path(__file__).resolve().parent / "checkpoints"  # trained reference models shipped in the package


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "config.json").is_file()) if BUNDLED.is_dir() else []


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; "tiny" -> the random-weight tiny model; a bundled checkpoint's name
    (`swiftserve-llama-7m`) -> its folder in the package; else a hub id (downloaded)."""
    if model == "tiny":
        from .tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in bundled_models():
        return BUNDLED / model
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(
        model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]))


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def random_model(cfg: dict, device="cpu", dtype=torch.float32, seed: int = 0) -> CausalLM:
    """Random init (normal 0.02, unit norms) for tests and benchmarks: same arithmetic as real weights."""
    args = ModelArgs.from_hf_config(cfg)
    with torch.device("meta"):
        model = CausalLM(args)
    model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()


def load_model(model_dir: Path, device="cpu", dtype=torch.float32, progress: bool = True) -> CausalLM:
    args = ModelArgs.from_hf_config(read_config(model_dir))
    with torch.device("meta"):
        model = CausalLM(args)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in tqdm(files, desc="loading weights", disable=not progress or len(files) < 2):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in params:
                    with torch.no_grad():
                        params[name].copy_(f.get_tensor(name))
                    loaded.add(name)
    missing = set(params) - loaded
    if args.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights: {sorted(missing)[:5]}")
    return model.eval()
