"""Before eviction our model + sink/window cache must equal HF transformers' dense forward;
after eviction it must equal the slow StreamingLLM reference."""
import pytest
import torch

from swift_engine.config import EngineConfig
from swift_engine.engine.cache import PageTable, SinkWindowCache
from swift_engine.engine.model_runner import ModelRunner
from swift_engine.layers.reference import reference_logits
from swift_engine.models.loader import load_model
from tests.model_configs import CONFIGS, save_hf_checkpoint

ARCHS = list(CONFIGS)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_checkpoint(request.param, path)
    return hf, load_model(path, progress=False)


def stream_logits(model, ids, S, W, chunk, page_size=4) -> torch.Tensor:
    """Logits of every token, fed in chunks through the engine's own cache and runner."""
    a = model.args
    cache = SinkWindowCache(S, W, page_size, 256, (a.num_layers, a.num_kv_heads, a.head_dim), "cpu", torch.float32)
    runner = ModelRunner(model, cache, EngineConfig(max_batch_tokens=max(chunk, 1)))
    table, out = PageTable(), []
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        plan = cache.append(table, len(part))
        out.append(runner.run([part], [plan], [list(range(len(part)))])[0])
        cache.evict(table)
        assert table.tokens <= S + W
        assert table.pages <= cache.steady_pages
    return torch.cat(out)


def test_prefill_and_decode_equal_hf_dense(pair):
    hf, ours = pair
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        dense = hf(torch.tensor([ids])).logits[0].float()
    one_prefill = stream_logits(ours, ids, S=4, W=60, chunk=len(ids))
    by_token = stream_logits(ours, ids, S=4, W=60, chunk=1)
    assert (one_prefill - dense).abs().max() <= 1e-4
    assert (by_token - dense).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def evicted(pair):
    """A stream of 10 (S + W) tokens and the reference's logits over it (slow: computed once per model)."""
    _, ours = pair
    S, W = 4, 12
    ids = torch.randint(0, 97, (10 * (S + W),), generator=torch.Generator().manual_seed(2)).tolist()
    ref = reference_logits(ours, ids, S, W)
    # the window really evicted: a dense pass over the same tokens disagrees at the end
    dense = stream_logits(ours, ids, S, len(ids), len(ids))
    assert (dense[-1] - ref[-1]).abs().max() > 1e-3
    return S, W, ids, ref


@pytest.mark.parametrize("chunk", [1, 7, 13, 25])
def test_after_eviction_equals_reference(pair, evicted, chunk):
    _, ours = pair
    S, W, ids, ref = evicted
    assert (stream_logits(ours, ids, S, W, chunk) - ref).abs().max() <= 1e-4


def test_no_sinks_is_pure_window_attention(pair):
    _, ours = pair
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    assert (stream_logits(ours, ids, 0, 9, 5) - reference_logits(ours, ids, 0, 9)).abs().max() <= 1e-4


def test_sharded_checkpoint_loads_the_same(tmp_path):
    from tests.model_configs import hf_model

    hf = hf_model("qwen3", seed=5)
    hf.save_pretrained(str(tmp_path / "one"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = load_model(tmp_path / "one", progress=False), load_model(tmp_path / "sharded", progress=False)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_unsupported_architecture_is_named():
    from swift_engine.errors import UnsupportedModelError
    from swift_engine.models.llama import ModelArgs

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelArgs.from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_sessions_batched_with_mixed_chunks_equal_reference(pair):
    """Several sessions in every step, each fed its own mix of chunk sizes, well past eviction."""
    _, ours = pair
    S, W, a = 4, 12, ours.args
    cache = SinkWindowCache(S, W, 4, 256, (a.num_layers, a.num_kv_heads, a.head_dim), "cpu", torch.float32)
    runner = ModelRunner(ours, cache, EngineConfig(max_batch_tokens=64))
    gen = torch.Generator().manual_seed(4)
    streams = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (48, 30, 56)]
    sizes = [[1], [7, 3], [13, 1, 5]]
    tables, fed, outs = [PageTable() for _ in streams], [0] * 3, [[] for _ in streams]
    for step in range(100):
        live = [i for i in range(3) if fed[i] < len(streams[i])]
        if not live:
            break
        chunks = [streams[i][fed[i]:fed[i] + sizes[i][step % len(sizes[i])]] for i in live]
        plans = [cache.append(tables[i], len(c)) for i, c in zip(live, chunks)]
        logits = runner.run(chunks, plans, [list(range(len(c))) for c in chunks])
        for i, c, lg in zip(live, chunks, logits):
            cache.evict(tables[i])
            fed[i] += len(c)
            outs[i].append(lg)
    for stream, out in zip(streams, outs):
        assert (torch.cat(out) - reference_logits(ours, stream, S, W)).abs().max() <= 1e-4
