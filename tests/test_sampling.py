"""The batched sampler, alone and through the engine: distributions, seeds independent of the batch, logit_bias,
penalties, logprobs."""
import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from swift_engine import InvalidRequestError, SamplingParams
from swift_engine.sampling import LogitState, Sampler

V = 40
CPU = torch.device("cpu")


@dataclass
class Row:
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    seed: int = 0
    logit_state: LogitState | None = None


def rows_for(sampler, params: SamplingParams, n: int, outputs: list[int] | None = None) -> list[Row]:
    rows = [Row(params, list(outputs or []) + [0] * i) for i in range(n)]  # step i: fresh noise per row
    for r in rows:
        sampler.prepare(r)
    return rows


def logits_row(seed: int = 0) -> torch.Tensor:
    return 2.5 * torch.randn(V, generator=torch.Generator().manual_seed(seed))


def filtered_softmax(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """The reference, the plain way (as vLLM): min-p, then top-k, then top-p over what top-k left."""
    probs = torch.softmax(logits / temperature, dim=-1)
    probs = probs * (probs >= min_p * probs.max())
    order = torch.argsort(probs, descending=True)[:top_k or V]
    ranked = torch.zeros_like(probs)
    ranked[order] = probs[order] / probs[order].sum()
    kept, mass = torch.zeros_like(probs), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept[i], mass = ranked[i], mass + ranked[i].item()
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 10, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 12, 0.9, 0.0), (1.0, 0, 1.0, 0.1)])
def test_empirical_distribution_matches_the_filtered_softmax(temperature, top_k, top_p, min_p):
    sampler, n = Sampler(V, CPU), 20_000
    logits = logits_row(1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=1234)
    ids = sampler.sample(logits.expand(n, V), rows_for(sampler, params, n), context=lambda r: []).ids
    empirical = torch.bincount(torch.tensor(ids), minlength=V).double() / n
    expected = filtered_softmax(logits.double(), temperature, top_k, top_p, min_p)
    assert not empirical[expected == 0].any(), "drew a token the filters remove"
    assert 0.5 * (empirical - expected).abs().sum() < 0.025  # total variation; sampling noise is about 0.01


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    sampler = Sampler(V, CPU)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=99)
    others = [SamplingParams(), SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.8, min_p=0.2, seed=5, repetition_penalty=1.3, logit_bias={3: 5.0})]
    alone, batched = [], []
    for step in range(30):
        logits = logits_row(step)
        row = rows_for(sampler, seeded, 1, outputs=[0] * step)
        alone += sampler.sample(logits[None], row, context=lambda r: []).ids
        mixed = rows_for(sampler, others[step % 4], 3) + row + rows_for(sampler, others[(step + 1) % 4], 2)
        batch = torch.stack([logits_row(100 + step + i) for i in range(3)] + [logits]
                            + [logits_row(200 + step + i) for i in range(2)])
        batched.append(sampler.sample(batch, mixed, context=lambda r: [1, 2]).ids[3])
    assert alone == batched
    other_seed = [sampler.sample(logits_row(s)[None], rows_for(sampler, seeded.model_copy(update={"seed": 100}), 1,
                                                                [0] * s), context=lambda r: []).ids[0]
                  for s in range(30)]
    assert other_seed != alone


def test_unseeded_rows_differ_and_greedy_is_argmax():
    sampler = Sampler(V, CPU)
    logits = logits_row(3).expand(64, V)
    fresh = [Row(SamplingParams(temperature=1.0)) for _ in range(64)]
    for r in fresh:
        sampler.prepare(r)
    assert len(set(sampler.sample(logits, fresh, context=lambda r: []).ids)) > 5
    greedy = sampler.sample(logits[:2], [Row(SamplingParams()), Row(SamplingParams())], context=lambda r: []).ids
    assert greedy == [int(logits[0].argmax())] * 2


def test_logit_bias_forces_and_bans_tokens():
    sampler = Sampler(V, CPU)
    logits = logits_row(4)[None]
    top = int(logits.argmax())
    forced = SamplingParams(temperature=1.0, seed=1, logit_bias={7: 100.0})
    banned = SamplingParams(logit_bias={top: -100.0})
    out = sampler.sample(logits.expand(2, V), rows_for(sampler, forced, 1) + rows_for(sampler, banned, 1),
                         context=lambda r: [])
    assert out.ids[0] == 7
    assert out.ids[1] == int(logits[0].masked_fill(torch.arange(V) == top, -1e9).argmax())
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        sampler.prepare(Row(SamplingParams(logit_bias={V: 1.0})))


def penalized_choice(logits: list[float], params: SamplingParams, outputs: list[int], context: list[int]) -> int:
    sampler = Sampler(len(logits), CPU)
    row = Row(params, list(outputs))
    sampler.prepare(row)
    return sampler.sample(torch.tensor([logits]), [row], context=lambda r: context).ids[0]


def test_penalties_follow_vllm_semantics():
    # frequency: subtracted per occurrence in the output
    assert penalized_choice([2.0, 1.0], SamplingParams(frequency_penalty=0.4), [0, 0], []) == 0   # 2 - 0.8 > 1
    assert penalized_choice([2.0, 1.0], SamplingParams(frequency_penalty=0.4), [0, 0, 0], []) == 1  # 2 - 1.2 < 1
    # presence: subtracted once, however often the token occurred
    assert penalized_choice([2.0, 1.0], SamplingParams(presence_penalty=0.9), [0, 0, 0, 0], []) == 0
    assert penalized_choice([2.0, 1.0], SamplingParams(presence_penalty=1.1), [0], []) == 1
    # presence and frequency count the output only, not the context
    assert penalized_choice([2.0, 1.0], SamplingParams(presence_penalty=2.0), [], [0, 0]) == 0
    # repetition: over context and output; divides positive logits, multiplies negative ones
    assert penalized_choice([2.0, 1.5], SamplingParams(repetition_penalty=1.5), [], [0]) == 1   # 2 / 1.5 < 1.5
    assert penalized_choice([2.0, 1.5], SamplingParams(repetition_penalty=1.5), [0], []) == 1
    assert penalized_choice([-1.0, -1.4], SamplingParams(repetition_penalty=1.5), [], [0]) == 1  # -1.5 < -1.4
    assert penalized_choice([2.0, 1.5], SamplingParams(repetition_penalty=1.5), [], [1]) == 0


def test_penalty_state_follows_sampled_tokens_across_steps():
    sampler = Sampler(3, CPU)
    row = Row(SamplingParams(frequency_penalty=1.0))
    sampler.prepare(row)
    logits = torch.tensor([[3.0, 2.5, 2.2]])
    picks = []
    for _ in range(4):
        picks.append(sampler.sample(logits, [row], context=lambda r: []).ids[0])
        row.output_ids.append(picks[-1])
    assert picks == [0, 1, 2, 0]  # each pick lowers that token by 1 for the next step


def test_logprobs_are_of_the_raw_distribution_with_top_alternatives():
    sampler = Sampler(V, CPU)
    logits = logits_row(5)[None].expand(3, V)
    raw = torch.log_softmax(logits[0], dim=-1)
    params = [SamplingParams(temperature=0.3, logit_bias={9: 50.0}, seed=3, top_logprobs=5),
              SamplingParams(top_logprobs=20), SamplingParams()]
    rows = [Row(p) for p in params]
    for r in rows:
        sampler.prepare(r)
    out = sampler.sample(logits, rows, context=lambda r: [])
    assert out.ids[0] == 9 and out.logprobs[0] == pytest.approx(raw[9].item(), abs=1e-5)
    values, ids = raw.topk(20)
    assert [t for t, _ in out.top[0]] == ids[:5].tolist() and [t for t, _ in out.top[1]] == ids.tolist()
    assert [lp for _, lp in out.top[1]] == pytest.approx(values.tolist(), abs=1e-5)
    assert out.top[2] is None


async def test_through_the_engine_a_seeded_turn_is_the_same_alone_and_in_a_batch():
    from swift_engine import EngineConfig, StreamingEngine

    engine = StreamingEngine(EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8), progress=False)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)

    async def ids(sid, sampling, prompt):
        return [ev.token_id async for ev in engine.generate(sid, prompt_token_ids=prompt, sampling=sampling)]
    try:
        alone = await ids("alone", seeded, [5, 6, 7, 8])
        others = [SamplingParams(max_tokens=15 + i, temperature=0.8, top_k=5 * i, ignore_eos=True,
                                 repetition_penalty=1.2, logit_bias={i: 3.0}) for i in range(1, 5)]
        together = await asyncio.gather(ids("batched", seeded, [5, 6, 7, 8]),
                                        *(ids(f"o{i}", p, [9, i, 11]) for i, p in enumerate(others)))
        assert together[0] == alone
    finally:
        engine.shutdown()
