"""Host tier on CUDA: pinned host memory, copy stream. A session's pages survive the round trip byte for
byte and it continues bit-identical (bfloat16) to one that never left (each run alone: a batch with
other rows may sum in another order). Overlap with decode steps: benchmarks/host_tier.py. Skipped
without CUDA."""
import pytest
import torch

from swift_engine.config import EngineConfig
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.models.random_init import random_model
from swift_engine.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=512, intermediate_size=1024,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096)
S, W, P = 4, 1020, 16
PAGE_BYTES = 2 * 4 * P * 2 * 64 * 2  # k and v, 4 layers, 2 KV heads of 64 bfloat16


def core(num_pages: int, host_sessions: int = 0) -> EngineCore:
    model = random_model(SHAPE, "cuda", torch.bfloat16, seed=0)
    cfg = EngineConfig(device="cuda", dtype="bfloat16", sink_tokens=S, window_tokens=W, page_size=P,
                       num_pages=num_pages, max_batch_tokens=256, max_running=8,
                       host_cache_bytes=host_sessions * 66 * PAGE_BYTES)
    return EngineCore(cfg, model, None)


def submit(c: EngineCore, sid: str, ids: list[int], kind="generate", max_tokens=8) -> Request:
    req = Request(f"{sid}-{len(c.sessions)}-{c.tokens_generated}", sid, kind, ids, emit=lambda ev: None,
                  sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True) if kind == "generate" else None)
    c.submit(req)
    return req


def run(c: EngineCore, *reqs) -> None:
    while any(r.phase != "done" for r in reqs):
        c.step()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def pages_bytes(c: EngineCore, sid: str) -> list[torch.Tensor]:
    t = c.sessions[sid].table
    pages = torch.tensor(t.sink_pages + list(t.window_pages), device="cuda")
    # as bytes: slots never written hold whatever torch.empty gave, NaN patterns included (NaN != NaN)
    return [x.view(x.shape[0], -1, P, *x.shape[2:])[:, pages].contiguous().view(torch.uint8)
            for x in (c.cache.k, c.cache.v)]


def test_round_trip_is_byte_for_byte_and_the_session_continues_bit_identical():
    tiered, alone = core(num_pages=400, host_sessions=2), core(num_pages=400)  # a session holds <= 66 pages
    for c in (tiered, alone):
        run(c, submit(c, "s", ids(1500, 1)))  # past its first eviction
    before = pages_bytes(tiered, "s")
    tiered.scheduler.evict_session(tiered.sessions["s"])  # as page pressure or an idle-cache policy would
    assert tiered.host.holds("s") and not tiered.sessions["s"].table.pages
    tiered.host.reload("s", tiered.sessions["s"].table)  # there and back once by hand: compare the bytes
    tiered.host.wait()
    assert all(torch.equal(x, y) for x, y in zip(before, pages_bytes(tiered, "s")))  # in other pool pages
    tiered.scheduler.evict_session(tiered.sessions["s"])
    back = submit(tiered, "s", ids(4, 4))  # through the engine: admitted, copied back, run once arrived
    run(tiered, back)
    ref = submit(alone, "s", ids(4, 4))
    run(alone, ref)
    assert back.output_ids == ref.output_ids and tiered.reprefills == 0 and tiered.host.reloads == 2
    a, b = submit(tiered, "s", ids(16, 5), kind="score"), submit(alone, "s", ids(16, 5), kind="score")
    run(tiered, a), run(alone, b)
    assert a.logprobs == b.logprobs  # bit-identical


def test_host_memory_is_pinned():
    c = core(num_pages=160, host_sessions=1)
    assert c.host.num_pages == 66
    # registered page-locked memory (torch's is_pinned() knows only its own allocator's blocks): only a
    # registered range can be unregistered. Registered again after, so its finalizer's unregister holds.
    # (Not a second cudaHostRegister refused with 712: a refused call leaves CUDA's last error set, and
    # the next test's first kernel launch raised it.)
    cudart, base, nbytes = torch.cuda.cudart(), c.host.host.data_ptr(), c.host.host.numel()
    assert int(cudart.cudaHostUnregister(base)) == 0
    assert int(cudart.cudaHostRegister(base, nbytes, 0)) == 0
