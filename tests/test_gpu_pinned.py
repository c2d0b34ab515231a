"""GPU path with pinned regions: Triton kernels and CUDA graphs read sessions whose page tables point
at one shared copy of a pinned region (P not a multiple of the page size, P > W), batched with plain
S-sink sessions, against the slow reference with P sinks. Skipped without CUDA."""
import random

import pytest
import torch

from swift_engine.config import EngineConfig
from swift_engine.engine.cache import PageTable, SinkWindowCache
from swift_engine.engine.model_runner import ModelRunner
from swift_engine.layers.reference import reference_logits
from tests.test_gpu import CONFIGS, cpu_model, on, rel

S, W, PAGE, P = 4, 60, 16, 75
PLAIN = "plain"  # a session with the usual S sinks in the same batches


def make_streams(laps: int) -> dict:
    """Four streams that start with the same P tokens, and one plain stream."""
    rnd = random.Random(3)
    pinned = [rnd.randrange(512) for _ in range(P)]
    streams = {s: pinned + [rnd.randrange(512) for _ in range(laps * (P + W))] for s in range(4)}
    streams[PLAIN] = [rnd.randrange(512) for _ in range(laps * (S + W) + 40)]
    return streams


def shared_pinned_logits(base, streams, device, dtype, backend):
    """Sessions 0-3 on one pinned copy plus the plain session, chunks then decodes; returns (logits per
    session, runner). Checked on the CPU torch path too (float32, one lap): every session within 5e-7
    of the reference."""
    a = base.args
    rnd = random.Random(4)
    cache = SinkWindowCache(S, W, PAGE, 1024, (a.num_layers, a.num_kv_heads, a.head_dim), device, dtype,
                            max_pinned_tokens=P)
    runner = ModelRunner(on(base, device, dtype), cache,
                         EngineConfig(max_batch_tokens=512, attention_backend=backend, max_pinned_tokens=P))
    tables = {s: PageTable(sink_cap=P) for s in range(4)}
    tables[PLAIN] = PageTable()
    got = {s: [] for s in streams}
    fed = {s: 0 for s in streams}

    def step(work):
        sids = list(work)
        plans = [cache.append(tables[s], work[s]) for s in sids]
        chunks = [streams[s][fed[s]:fed[s] + work[s]] for s in sids]
        out = runner.run(chunks, plans, [list(range(work[s])) for s in sids])
        for s, o in zip(sids, out):
            cache.evict(tables[s])
            got[s].append(o.float().cpu())
            fed[s] += work[s]

    step({0: P + 5, PLAIN: 40})  # session 0 prefills the pinned region once
    cache.pinned.publish(tables[0], "region")
    for s in range(1, 4):  # the others point at it: their first computed token is at position P
        assert cache.pinned.attach(tables[s], "region")
        fed[s] = P
        got[s].append(None)
    while left := {s: len(streams[s]) - fed[s] for s in streams if fed[s] < len(streams[s])}:
        n = rnd.choice([1, 1, 1, 1, 7, 33, 64])
        step({s: min(n, k) for s, k in left.items()})
    assert cache.pinned.pages_saved() == 3 * -(-P // PAGE)
    return got, runner


@pytest.fixture(scope="module")
def base_and_refs():
    """The float32 CPU model and reference_logits of every stream (P sinks; S for the plain one)."""
    base, streams = cpu_model(CONFIGS["llama-gqa"]), make_streams(laps=3)
    return base, streams, {s: reference_logits(base, ids, S if s == PLAIN else P, W) for s, ids in streams.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_graphs_read_shared_pinned_pages(base_and_refs, dtype):
    base, streams, refs = base_and_refs
    got, runner = shared_pinned_logits(base, streams, "cuda", dtype, "triton")
    errs = {s: rel(torch.cat([p for p in pieces if p is not None]), refs[s][P if pieces[0] is None else 0:])
            for s, pieces in got.items()}
    print(f"{dtype}: rel err vs reference per session {errs}")
    assert max(errs.values()) <= (1e-4 if dtype == torch.float32 else 2e-2)
    gpu = runner.gpu
    assert gpu.wide_graphs and gpu.stats["graph_steps"] > 0  # decodes of pinned sessions replayed as graphs
