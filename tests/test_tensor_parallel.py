"""Tensor parallelism on the CPU (gloo): an engine split over 2 and 4 ranks (local processes) gives
the single-rank engine's log-probs to 1e-5 in float32 and the same greedy tokens: chunked prefill,
decode, eviction past S + W, restore from a snapshot, several sessions batched in one step.

The checkpoint is the tiny model with a vocabulary of 262 rows (4 does not divide it: the
vocab shards are padded) and 2 KV heads (TP = 4 replicates them). One engine per TP size
serves every case (spawning ranks costs seconds on 2 cores).
"""
import asyncio
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from swift_engine import EngineConfig, EngineDeadError, EngineError, StreamingEngine, UnsupportedModelError
from swift_engine.models.random_init import random_model
from swift_engine.models.tiny import TINY_CONFIG, build_byte_tokenizer

TOL = 1e-5
CONFIG = {**TINY_CONFIG, "vocab_size": 262}


def write_checkpoint(path, config: dict):
    """A checkpoint of `config` with random weights and the byte tokenizer (ids 0..260)."""
    (path / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in random_model(config, seed=3).state_dict().items()}
    if config.get("tie_word_embeddings"):  # one tensor in the file, as HF saves tied models
        del weights["lm_head.weight"]
    save_file(weights, str(path / "model.safetensors"))
    build_byte_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp-tiny"), CONFIG)


def engine(checkpoint, tp: int, **kw) -> StreamingEngine:
    kw = {"dtype": "float32", "page_size": 8, **kw}
    cfg = EngineConfig(model=str(checkpoint), sink_tokens=4, window_tokens=28, num_pages=64, max_batch_tokens=32,
                       tensor_parallel_size=tp, **kw)
    return StreamingEngine(cfg, progress=False)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True, top_logprobs=3)


async def scenario(e: StreamingEngine) -> dict:
    """Every case on one engine; returns the numbers to compare across TP sizes."""
    out = {"prefill": await e.score("a", ids(20, 1)),              # before eviction (S + W = 32)
           "evicted": await e.score("a", ids(70, 2))}              # chunks of 32 > W, evicting as they go

    async def turn(sid: str, prompt: list[int]) -> list:
        return [(ev.token_id, ev.logprob, ev.top_logprobs)
                async for ev in e.generate(sid, prompt_token_ids=prompt, sampling=GREEDY)]
    # several sessions decoding in the same steps, one of them past S + W
    out["decode"] = await asyncio.gather(turn("b", ids(9, 3)), turn("c", ids(40, 4)), turn("a", ids(3, 5)))
    await e.restore("a", e.snapshot("a"))  # dropped, then re-prefilled from its sinks + tail
    out["restored"] = await turn("a", ids(5, 6))
    return out


def flat(x) -> list:
    """Numbers in order (token ids as floats too)."""
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in flat(item)]
    return [] if x is None else [float(x)]


@pytest.fixture(scope="module")
def single(checkpoint):
    e = engine(checkpoint, 1)
    try:
        yield asyncio.run(scenario(e))
    finally:
        e.shutdown()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_rank(checkpoint, single, tp):
    e = engine(checkpoint, tp)
    try:
        assert e.is_alive() and e.inspect(lambda c: c.cache.k.shape[2]) == max(CONFIG["num_key_value_heads"] // tp, 1)
        got = asyncio.run(scenario(e))
        # failure of any rank fails the engine as a whole (the replica's health check): sessions fail over
        rank = e._client.workers.procs[-1]
        rank.kill()
        rank.join(timeout=30)
        assert not e.is_alive()
        for _ in range(2):  # the engine is dead as a whole: every call fails at once
            with pytest.raises(EngineDeadError):
                e.score_sync("z", ids(3, 9))
    finally:
        e.shutdown()
    for case in single:
        ref, mine = flat(single[case]), flat(got[case])
        assert len(ref) == len(mine) and ref, case
        worst = max(abs(a - b) for a, b in zip(ref, mine))
        assert worst <= TOL, f"{case}: TP={tp} differs from TP=1 by {worst:.2e}"
    tokens = [[t for t, _, _ in turn] for turn in got["decode"]]
    assert tokens == [[t for t, _, _ in turn] for turn in single["decode"]]


def test_biases_and_tied_embeddings_are_split_too(tmp_path):
    """q/k/v and gate/up biases are sharded, o and down biases added once after the all-reduce;
    a tied LM head shares the embedding's vocabulary shard."""
    config = {**CONFIG, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}
    ckpt = write_checkpoint(tmp_path, config)
    got = []
    for tp in (1, 2):
        e = engine(ckpt, tp)
        try:
            got.append(e.score_sync("s", ids(50, 7)))
        finally:
            e.shutdown()
    assert max(abs(a - b) for a, b in zip(*map(flat, got), strict=True)) <= TOL


def test_a_split_the_model_does_not_allow_is_refused_naming_the_field(checkpoint):
    with pytest.raises(UnsupportedModelError, match="tensor_parallel_size: 3 does not divide"):
        engine(checkpoint, 3, device="cpu")
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
