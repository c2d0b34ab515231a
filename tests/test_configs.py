"""Config files load into the typed configs, and bad values name the field."""
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppArgs
from swift_engine import EngineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("engine-*.yaml")), ids=lambda p: p.name)
def test_engine_presets_load(path):
    cfg = EngineConfig.from_yaml(path)
    assert cfg.cache_tokens >= 256


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_serve_configs_carry_valid_app_args(name):
    spec = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]
    assert AppArgs.model_validate(spec["args"]).engine.window_tokens > 0


@pytest.mark.parametrize("bad, field", [({"window_tokens": 0}, "window_tokens"), ({"device": "tpu"}, "device"),
                                        ({"dtype": "int8"}, "dtype"), ({"sink_tokens": -1}, "sink_tokens"),
                                        ({"windw_tokens": 8}, "windw_tokens")])
def test_bad_engine_values_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        EngineConfig(**bad)


def test_bad_store_url_names_the_field():
    with pytest.raises(ValidationError, match="store_url"):
        AppArgs(store_url="mysql://x")


TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. The function returns a list of the values in the "
        "dictionary, and raises a KeyError when the key is not found.")


def test_bundled_reference_model_is_trained():
    """The bundled reference checkpoint (the Quality section's 7 M model) loads, matches HF transformers,
    and is trained (English text scores far below the uniform perplexity of its 4096-token vocabulary).
    configs/local.yaml's real model is checked in tests/test_real_model.py."""
    import math

    import torch
    import transformers

    from swift_engine import StreamingEngine
    from swift_engine.models.loader import bundled_models, resolve_model_dir

    assert bundled_models() == ["swiftserve-llama-7m"]
    engine = StreamingEngine(EngineConfig(model="swiftserve-llama-7m", sink_tokens=4, window_tokens=252,
                                          num_pages=64), progress=False)
    try:
        ids = [engine.tokenizer.hf.bos_token_id] + engine.tokenizer.encode(TEXT)
        logprobs = engine.score_sync("s", ids)[1:]
        ppl = math.exp(-sum(logprobs) / len(logprobs))
        assert ppl < 200, f"perplexity {ppl:.0f}: the bundled weights look untrained"
        hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir("swiftserve-llama-7m"),
                                                               torch_dtype=torch.float32)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
        ref_lp = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), ref_lp, atol=1e-4)
    finally:
        engine.shutdown()
