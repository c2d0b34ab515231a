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
