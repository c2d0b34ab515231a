"""What a Hugging Face config means for the arithmetic, per model family.

The config is read through transformers' own config class for its `model_type`,
so defaults, old field spellings (`rope_scaling`, top-level `rope_theta`) and
derived fields (`layer_types`) are exactly what HF's forward would use. Every
field HF's modeling code reads for a family is either honoured here or refused
by name with UnsupportedModelError; none is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import CONFIG_MAPPING
from transformers.activations import ACT2FN

from ..errors import UnsupportedModelError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# norm slots: attention input, MLP input, attention output, MLP output (None: the family has none there)
PLAIN_NORMS = ("input_layernorm", "post_attention_layernorm", None, None)


@dataclass(frozen=True)
class Family:
    qkv_bias: str | bool = False   # a config field name, or a constant
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    act_field: str = "hidden_act"
    qk_norm: bool = False
    norms: tuple = PLAIN_NORMS
    norm_offset: float = 0.0       # Gemma stores norm weights as w - 1
    partial_rotary: bool = False   # reads rope_parameters.partial_rotary_factor
    rope_interleaved: bool = False  # GLM rotates pairs (2i, 2i+1), the others halves
    windows: str = "none"          # "all": sliding_window on every layer; "layer_types": per layer
    gemma: bool = False            # embedding scale, query_pre_attn_scalar, logit soft-capping
    fused: tuple = ()              # checkpoint tensors that hold several of our linears


FAMILIES = {
    "llama": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Family(windows="all"),
    "qwen2": Family(qkv_bias=True, windows="layer_types"),
    "qwen3": Family(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, windows="layer_types"),
    "glm": Family(qkv_bias="attention_bias", partial_rotary=True, rope_interleaved=True, fused=("gate_up_proj",)),
    "glm4": Family(qkv_bias="attention_bias", partial_rotary=True, rope_interleaved=True, fused=("gate_up_proj",),
                   norms=("input_layernorm", "post_attention_layernorm", "post_self_attn_layernorm",
                          "post_mlp_layernorm")),
    "gemma2": Family(qkv_bias="attention_bias", o_bias="attention_bias", act_field="hidden_activation",
                     norms=("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm",
                            "post_feedforward_layernorm"),
                     norm_offset=1.0, windows="layer_types", gemma=True),
    "phi3": Family(partial_rotary=True, windows="all", fused=("qkv_proj", "gate_up_proj")),
}


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    rotary_dim: int             # leading head dims that are rotated (partial rotary)
    rope_interleaved: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    hidden_act: str
    norms: tuple
    norm_offset: float
    embed_scale: float | None
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    tie_word_embeddings: bool
    fused: tuple
    sliding_window: int | None  # the smallest window of the model's sliding-window layers
    sliding_layers: tuple
    max_position_embeddings: int | None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        return _parse(cfg)


def family_of(cfg: dict) -> str:
    """By `architectures`, else by `model_type` (as HF's Auto classes do)."""
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and not archs and cfg.get("model_type") in FAMILIES:
        family = cfg["model_type"]
    if family is None:
        raise UnsupportedModelError(
            f"architecture {archs or cfg.get('model_type')!r} is not supported; supported: {sorted(ARCHITECTURES)} "
            f"(or a config without `architectures` whose model_type is one of {sorted(FAMILIES)})")
    return family


def _parse(cfg: dict) -> ModelArgs:
    family = family_of(cfg)
    f = FAMILIES[family]
    if cfg.get("quantization_config"):
        raise UnsupportedModelError("quantization_config: quantized checkpoints are not supported")
    try:
        hf = CONFIG_MAPPING[family](**{k: v for k, v in cfg.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"config.json is not a valid {family} config: {exc}") from exc
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    flag = _flag_reader(hf)
    window, local = _windows(hf, f)
    return ModelArgs(
        family=family, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
        num_kv_heads=hf.num_key_value_heads or heads, head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps,
        **_rope(hf, f, head_dim), qkv_bias=flag(f.qkv_bias), o_bias=flag(f.o_bias), mlp_bias=flag(f.mlp_bias),
        qk_norm=f.qk_norm, hidden_act=_activation(getattr(hf, f.act_field)), norms=f.norms,
        norm_offset=f.norm_offset, **_gemma(hf, f, head_dim), tie_word_embeddings=bool(hf.tie_word_embeddings),
        fused=f.fused, sliding_window=window, sliding_layers=local,
        max_position_embeddings=getattr(hf, "max_position_embeddings", None))


def _flag_reader(hf):
    """A family's bias flag: a constant, or the config field that switches it."""
    return lambda v: bool(getattr(hf, v, False)) if isinstance(v, str) else v


def _rope(hf, f: Family, head_dim: int) -> dict:
    rope = dict(hf.rope_parameters or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope_parameters.rope_type {kind!r} is not supported (supported: {ROPE_TYPES})")
    factor = float(rope.get("partial_rotary_factor", 1.0))
    if factor != 1.0 and not f.partial_rotary:
        raise UnsupportedModelError(f"partial_rotary_factor {factor}: this family rotates the whole head")
    return dict(rope_theta=float(rope["rope_theta"]), rope_scaling=rope if kind != "default" else None,
                rotary_dim=int(head_dim * factor), rope_interleaved=f.rope_interleaved)


def _activation(name: str) -> str:
    if name not in ACT2FN:
        raise UnsupportedModelError(f"hidden_act {name!r} is not a transformers activation")
    return name


def _gemma(hf, f: Family, head_dim: int) -> dict:
    if not f.gemma:
        return dict(embed_scale=None, attn_scale=head_dim ** -0.5, attn_softcap=None, final_softcap=None)
    if getattr(hf, "use_bidirectional_attention", None):
        raise UnsupportedModelError("use_bidirectional_attention: only causal attention is supported")
    return dict(embed_scale=hf.hidden_size ** 0.5, attn_scale=hf.query_pre_attn_scalar ** -0.5,
                attn_softcap=hf.attn_logit_softcapping, final_softcap=hf.final_logit_softcapping)


def _windows(hf, f: Family) -> tuple[int | None, tuple]:
    """The model's own sliding window and the layers that use it."""
    window = getattr(hf, "sliding_window", None)
    if f.windows == "none" or window is None:
        return None, ()
    if f.windows == "all":
        return int(window), tuple(range(hf.num_hidden_layers))
    types = list(hf.layer_types)
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise UnsupportedModelError(f"layer_types {bad} are not supported (supported: {LAYER_TYPES})")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (int(window) if local else None), local


def beyond_llama_block(a: ModelArgs) -> list[str]:
    """Arithmetic beyond the Llama/Qwen decoder block (what the fused GPU forward implements)."""
    checks = {
        "o_proj bias": a.o_bias, "mlp_bias": a.mlp_bias, f"hidden_act {a.hidden_act}": a.hidden_act != "silu",
        f"{a.family} norms": a.norms != PLAIN_NORMS or a.norm_offset != 0.0,
        "partial rotary": a.rotary_dim != a.head_dim, "interleaved rotary": a.rope_interleaved,
        "embedding scale": a.embed_scale is not None, "attention scale": a.attn_scale != a.head_dim ** -0.5,
        "attention soft-capping": a.attn_softcap is not None, "final logit soft-capping": a.final_softcap is not None,
    }
    return [name for name, used in checks.items() if used]
