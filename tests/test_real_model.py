"""The local default, SmolLM2-135M-Instruct (real weights from a GGUF file), through the engine and the server.

The tiny random models keep the other tests fast; these pin what only real weights show: the
engine equals HF transformers on them, a greedy chat answers facts, and a stream far past S + W
stays fluent. The model comes from configs/local.yaml, so these test what `swiftserve serve` runs.
"""
import math
from pathlib import Path

import openai
import pytest
import torch
import yaml

from deployments.config import AppArgs
from swift_engine import EngineConfig, StreamingEngine, resolve_model_dir
from swift_engine.layers.reference import reference_logits
from swift_engine.models.loader import load_model
from tests.serve_utils import LOCAL_CONFIG, running_app
from tests.test_model_equivalence import stream_logits

ROOT = Path(__file__).resolve().parents[1]
ARGS = AppArgs.model_validate(yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"])


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir(ARGS.engine.model)


@pytest.fixture(scope="module")
def ours(model_dir):
    return load_model(model_dir, progress=False)


@pytest.fixture(scope="module")
def text_ids(model_dir):
    """Text the model never saw (the start of this project's README as it was in December 2026, written
    after SmolLM2; a fixed copy: the docs change, this must not), BOS first."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.encode((ROOT / "tests" / "data" / "unseen_text.md").read_text(), add_special_tokens=False)
    assert len(ids) >= 1024, "the tests below stream 1,024 tokens of it"
    return [tok.bos_token_id] + ids


def test_local_default_is_the_packaged_real_model(model_dir):
    cfg = yaml.safe_load((model_dir / "config.json").read_text())
    assert ARGS.model_id == ARGS.engine.model == "smollm2-135m-instruct"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert ARGS.engine.sink_tokens + ARGS.engine.window_tokens <= cfg["max_position_embeddings"]
    assert resolve_model_dir(ARGS.engine.model) == model_dir  # the second start finds the cached checkpoint


def test_engine_equals_hf_dense_before_eviction(model_dir, ours, text_ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = text_ids[:256]
    with torch.no_grad():
        dense = hf(torch.tensor([ids])).logits[0].float()
    got = stream_logits(ours, ids, S=4, W=1020, chunk=64)
    assert (got - dense).abs().max() <= 1e-3, "real weights: engine and HF disagree"
    assert torch.equal(got.argmax(-1), dense.argmax(-1))


def test_engine_equals_streaming_reference_after_eviction(ours, text_ids):
    """128 tokens through S + W = 32 (the reference runs token by token: the slow part)."""
    ids = text_ids[:128]
    ref = reference_logits(ours, ids, 4, 28)
    got = stream_logits(ours, ids, S=4, W=28, chunk=12)
    assert (got - ref).abs().max() <= 1e-3
    # it really evicted: full attention disagrees at the end
    assert (stream_logits(ours, ids, 4, 1020, 128)[-1] - ref[-1]).abs().max() > 1e-2


def test_stream_far_past_the_cache_stays_fluent(ours, text_ids):
    """8x the cache through one session: perplexity stays near that of the first cache-full
    (where the engine equals dense attention) instead of blowing up as a model past its window does."""
    ids = text_ids[:1024]
    cfg = EngineConfig(model="in-memory", sink_tokens=4, window_tokens=124, num_pages=32, max_batch_tokens=128)
    engine = StreamingEngine(cfg, model=ours, tokenizer=None)
    try:
        lps = []
        for s in range(0, len(ids), 128):
            lps += engine.score_sync("long", ids[s:s + 128])
    finally:
        engine.shutdown()
    ppl = lambda xs: math.exp(-sum(xs) / len(xs))
    first, late = ppl(lps[1:128]), ppl(lps[512:])
    assert late < 1.5 * first and late < 40, (first, late)


CHAT = [  # (question, words one of which the greedy answer must contain)
    ("What is the capital of France?", ["Paris"]),
    ("And what is the capital of Italy?", ["Rome"]),
    ("How many days are there in a week?", ["7", "seven"]),
]


@pytest.mark.ray
async def test_greedy_chat_over_http_answers_facts(ray_local):
    with running_app(tiny=False) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        history = []
        for question, answers in CHAT:
            history.append({"role": "user", "content": question})
            reply = await client.chat.completions.create(
                model=ARGS.model_id, messages=history, max_tokens=40, temperature=0.0,
                extra_headers={"x-session-id": "facts"})
            text = reply.choices[0].message.content
            assert any(a.lower() in text.lower() for a in answers), (question, text)
            history.append({"role": "assistant", "content": text})
