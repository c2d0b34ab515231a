"""The embedded test model: a tiny Llama with fixed-seed random weights and a byte-level tokenizer.

Written once as an ordinary Hugging Face checkpoint directory, so it loads
through the same path as real models and HF transformers can load it too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .random_init import random_model
from .resolve import default_cache_dir

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 264,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "float32",
}
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VERSION = "v1"


def build_byte_tokenizer():
    """Byte-level BPE with no merges: every byte is a token, plus chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE)


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257], "bos_token_id": 256}))
    model = random_model(TINY_CONFIG, seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    build_byte_tokenizer().save_pretrained(str(path))
    return path


def ensure_tiny_checkpoint(cache_dir: Path | None = None) -> Path:
    """Create the tiny checkpoint once; replicas racing here all end with the same files."""
    target = (cache_dir or default_cache_dir()) / f"tiny-{VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    write_tiny_checkpoint(tmp)
    try:
        os.rename(tmp, target)  # atomic; loses the race harmlessly if another process won
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
