"""Every checkpoint loads exactly or is refused by name; the cache fits what the model was trained on."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from swift_engine import EngineConfig, StreamingEngine, UnsupportedModelError
from swift_engine.models.families import ModelArgs
from swift_engine.models.loader import bundled_models, load_model
from swift_engine.models.random_init import random_model
from tests.model_configs import BASE, hf_model, save_hf_checkpoint
from tests.test_model_equivalence import stream_logits

IDS = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def dense(hf, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def rewrite_weights(path, change) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def rewrite_config(path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_a_tensor_the_config_does_not_switch_on_is_refused_by_name(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.ones(64)))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_model(tmp_path, progress=False)


def test_a_missing_or_misshapen_tensor_is_refused_by_name(tmp_path):
    save_hf_checkpoint("qwen3_bias", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.self_attn.o_proj.bias"))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_model(tmp_path, progress=False)
    save_hf_checkpoint("llama", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(UnsupportedModelError, match=r"model\.norm\.weight.*\(65,\)"):
        load_model(tmp_path, progress=False)


@pytest.mark.parametrize("arch", ["llama_biases_gelu", "qwen3_bias"])
def test_biases_and_activation_are_honoured(tmp_path, arch):
    """Once: o_proj bias dropped (1.29 off HF), mlp_bias dropped (0.76), gelu read as silu (0.28)."""
    hf = save_hf_checkpoint(arch, tmp_path)
    assert (stream_logits(load_model(tmp_path, progress=False), IDS, 4, 60, 13) - dense(hf)).abs().max() <= 1e-4


def test_config_without_architectures_loads_by_model_type(tmp_path):
    hf = save_hf_checkpoint("glm4", tmp_path)
    rewrite_config(tmp_path, architectures=None)
    ours = load_model(tmp_path, progress=False)
    assert ours.args.family == "glm4"
    assert (stream_logits(ours, IDS, 4, 60, 40) - dense(hf)).abs().max() <= 1e-4


@pytest.mark.parametrize("fields, named", [
    (dict(architectures=["Phi3ForCausalLM"], model_type="phi3", rope_scaling={
        "type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
        original_max_position_embeddings=1024), "longrope"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}), "yarn"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="swishy"), "swishy"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama", quantization_config={"quant_method": "awq"}),
     "quantization_config"),
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel"),
])
def test_fields_we_do_not_implement_are_refused_by_name(fields, named):
    with pytest.raises(UnsupportedModelError, match=named):
        ModelArgs.from_hf_config({**BASE, **fields})


def engine_on(cfg: dict, **engine) -> StreamingEngine:
    model = random_model({**BASE, **cfg})
    return StreamingEngine(EngineConfig(model="in-memory", page_size=8, **engine), model=model)


@pytest.mark.parametrize("arch, cfg", [
    ("mistral", dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32)),
    ("qwen2", dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                   sliding_window=32, max_window_layers=1)),
    ("gemma2", dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=32)),
])
def test_a_cache_wider_than_the_models_own_window_is_refused_with_the_w_that_fits(arch, cfg):
    """Once: Mistral's window was never read (2.05 off HF), Qwen2's use_sliding_window neither (0.905)."""
    with pytest.raises(UnsupportedModelError, match=r"window_tokens <= 28 fits"):
        engine_on(cfg, sink_tokens=4, window_tokens=60)
    engine_on(cfg, sink_tokens=4, window_tokens=28).shutdown()


def test_a_model_window_equal_to_the_cache_matches_hf(tmp_path):
    hf = save_hf_checkpoint("mistral_window", tmp_path)  # sliding_window 64 = S + W
    ids = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = load_model(tmp_path, progress=False)
    assert (stream_logits(ours, ids, 4, 60, 9) - dense(hf, ids)).abs().max() <= 1e-4


def test_the_cache_is_shrunk_to_the_trained_length_with_a_warning(caplog):
    """Once: chat ran W = 1020 on the bundled model trained on 512 positions."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=128)
    with caplog.at_level(logging.WARNING):
        e = engine_on(cfg, sink_tokens=4, window_tokens=1020)
    assert (e.config.sink_tokens, e.config.window_tokens) == (4, 124)
    assert e.inspect(lambda c: c.cache.W) == 124
    assert "max_position_embeddings 128" in caplog.text
    e.shutdown()
    with pytest.raises(UnsupportedModelError, match="sink_tokens"):
        engine_on(cfg, sink_tokens=128, window_tokens=4)


@pytest.mark.skipif("swiftserve-llama-7m" not in bundled_models(), reason="bundled model not shipped")
def test_bundled_model_chat_defaults_stay_within_its_512_positions():
    e = StreamingEngine(EngineConfig(model="swiftserve-llama-7m", sink_tokens=4, window_tokens=1020), progress=False)
    assert e.config.cache_tokens == 512
    e.shutdown()


def test_families_outside_the_fused_gpu_block_are_named_for_the_backend_choice():
    from swift_engine.models.families import beyond_llama_block

    assert beyond_llama_block(hf_args("llama")) == []
    assert "attention soft-capping" in beyond_llama_block(hf_args("gemma2"))
    assert "partial rotary" in beyond_llama_block(hf_args("glm4"))


def hf_args(arch: str) -> ModelArgs:
    return ModelArgs.from_hf_config(hf_model(arch).config.to_dict())
