"""Tiny Hugging Face configs (random weights) for each supported architecture."""
from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=2048, tie_word_embeddings=False)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict()),
    # partial/interleaved rotary, sandwich norms, (1 + w) norms, soft-capping, fused tensors
    "glm": ("GlmConfig", "GlmForCausalLM", dict(pad_token_id=0)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(pad_token_id=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=64, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
        initializer_range=0.2)),  # large enough weights that both caps bend the logits
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, partial_rotary_factor=0.75)),
}
# variants of a family's fields, checked against HF's dense forward (tests/test_checkpoints.py)
VARIANTS = {
    # fields the loader once dropped silently (issue 15)
    "llama_biases_gelu": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True,
                                                                  hidden_act="gelu")),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(attention_bias=True)),
    # a model window that holds the whole S + W = 64 cache
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64)),
}


def hf_model(arch: str, seed: int = 0):
    import transformers

    cfg_name, model_name, extra = {**CONFIGS, **VARIANTS}[arch]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # HF initialises norms to one and biases to zero: perturb them so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_checkpoint(arch: str, path: Path, seed: int = 0):
    model = hf_model(arch, seed)
    model.save_pretrained(str(path))
    return model
