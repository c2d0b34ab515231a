"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, seed)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="completion tokens at most")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="stop strings, excluded from the text")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [B, V]; return ids and their log-probs.

    Log-probs are of the model's raw distribution (before temperature/top-k/top-p),
    as vLLM and the OpenAI API report them.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    ids = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        ids[i] = _sample_row(logits[i], p, generators[i])
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    ids_host, lps_host = torch.stack([ids.double(), chosen.double()]).tolist()  # one device sync
    return [int(t) for t in ids_host], lps_host


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen)[0]
