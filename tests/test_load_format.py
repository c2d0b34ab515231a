"""load_format: dummy gives random weights of the checkpoint's shape (as vLLM's --load-format dummy)."""
import pytest
import torch
from pydantic import ValidationError

from swift_engine import EngineConfig, StreamingEngine
from swift_engine.models.tiny import write_tiny_checkpoint


def test_dummy_weights_have_the_checkpoint_shape_but_not_its_values(tmp_path):
    ckpt = str(write_tiny_checkpoint(tmp_path / "ckpt", seed=7))
    real = StreamingEngine(EngineConfig(model=ckpt, window_tokens=124, num_pages=64), progress=False)
    dummy = StreamingEngine(EngineConfig(model=ckpt, window_tokens=124, num_pages=64, load_format="dummy"),
                            progress=False)
    try:
        a, b = (e.inspect(lambda c: dict(c.model.named_parameters())) for e in (real, dummy))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
        events = dummy.generate_sync("s", prompt_token_ids=[1, 2, 3], sampling={"max_tokens": 4, "ignore_eos": True})
        assert events[-1].usage.completion_tokens == 4
    finally:
        real.shutdown(), dummy.shutdown()


def test_unknown_load_format_names_the_field():
    with pytest.raises(ValidationError, match="load_format"):
        EngineConfig(load_format="gguf-maybe")
