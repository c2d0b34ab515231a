"""Sampling parameters and the batched sampler: one device pass for the whole batch.

Every row is sampled by an exponential race (argmax of p / E, E ~ Exp(1)), with
E drawn from a counter-based hash of (seed, step, token): a row's noise
depends only on its own seed and step, so a seed gives the same tokens
whatever else is in the batch, and no row needs its own generator or loop.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20  # as the OpenAI API
_MASK32 = 0xFFFFFFFF


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="completion tokens at most")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top token's probability")
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1, description="same seed, same tokens, in any batch")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once per token in the output")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per occurrence in the output")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="divides the logits of tokens in the "
                                                                           "context or output (vLLM)")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> added to its logit")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="most likely alternatives to report")
    stop: list[str] = Field(default_factory=list, description="stop strings, excluded from the text")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        if any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("logit_bias values must be within [-100, 100]")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class SamplingRow(Protocol):
    """What the sampler reads of a request (the engine's Request has these)."""

    sampling: SamplingParams
    seed: int                  # drawn at submission when the request has none
    output_ids: list[int]      # their count is the row's step
    logit_state: "LogitState | None"


@dataclass
class LogitState:
    """One request's device tensors for logit_bias and penalties, built at its first sample."""

    bias: torch.Tensor    # [V] float32, added to the logits
    seen: torch.Tensor    # [V] bool: in the context or the output (repetition penalty)
    counts: torch.Tensor  # [V] int32: occurrences in the output (presence, frequency)


@dataclass
class Sampled:
    ids: list[int]
    logprobs: list[float]                       # of the raw model distribution
    top: list[list[tuple[int, float]] | None]   # the row's top_logprobs alternatives, when asked


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.V, self.device = vocab_size, device
        self._token_keys = _hash32(torch.arange(vocab_size, device=device, dtype=torch.int64) * 0x2545F491 & _MASK32)
        # on a GPU the race is one fused kernel instead of ~25 passes over [B, V]; compiled here, not mid-step
        self._race_pick = torch.compile(_race_pick, dynamic=True) if device.type == "cuda" else _race_pick
        for rows in (1, 2) if device.type == "cuda" else ():  # one row is its own compiled case
            self._race_pick(torch.rand(rows, vocab_size, device=device),
                            torch.zeros(rows, 3, dtype=torch.int64, device=device), self._token_keys)

    def prepare(self, row: SamplingRow) -> None:
        """At submission: check token ids against the vocabulary; draw a seed for an unseeded row."""
        p = row.sampling
        bad = next((t for t in p.logit_bias if not 0 <= t < self.V), None)
        if bad is not None:
            raise InvalidRequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {self.V})")
        row.seed = (p.seed if p.seed is not None else secrets.randbits(64)) & (2**64 - 1)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               context: Callable[[SamplingRow], list[int]]) -> Sampled:
        """One token per row of `logits` [B, V]; `context(row)`: the ids a repetition penalty counts
        besides the output (asked once per penalized request)."""
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1)
        params = [r.sampling for r in rows]
        processed = [i for i, p in enumerate(params) if p.logit_bias or p.penalized]
        if processed:
            logits = self._process(logits.clone(), [rows[i] for i in processed], processed, context)
        if all(p.greedy for p in params):
            ids = logits.argmax(dim=-1)
        else:
            ids = self._race(logits, rows, params)
        if processed:
            self._count(ids, [rows[i] for i in processed], processed)
        return self._to_host(ids, raw, [p.top_logprobs for p in params])

    # ---- logit processing (bias, penalties: vLLM semantics) -----------------------
    def _process(self, logits: torch.Tensor, rows: list[SamplingRow], at: list[int], context) -> torch.Tensor:
        for r in rows:
            if r.logit_state is None:
                r.logit_state = self._new_state(r, context(r) if r.sampling.repetition_penalty != 1.0 else [])
        bias, seen, counts = (torch.stack([getattr(r.logit_state, f) for r in rows]) for f in ("bias", "seen", "counts"))
        pen = torch.tensor([(r.sampling.repetition_penalty, r.sampling.presence_penalty,
                             r.sampling.frequency_penalty) for r in rows], device=self.device)
        x = logits[at] + bias
        rep = pen[:, 0:1]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - pen[:, 1:2] * (counts > 0) - pen[:, 2:3] * counts
        logits[at] = x
        return logits

    def _new_state(self, row: SamplingRow, context_ids: list[int]) -> LogitState:
        p = row.sampling
        bias = torch.zeros(self.V, device=self.device)
        if p.logit_bias:
            bias[torch.tensor(list(p.logit_bias), device=self.device)] = torch.tensor(
                list(p.logit_bias.values()), device=self.device)
        seen = torch.zeros(self.V, dtype=torch.bool, device=self.device)
        seen[torch.tensor(context_ids + row.output_ids, dtype=torch.long, device=self.device)] = True
        counts = torch.zeros(self.V, dtype=torch.int32, device=self.device)
        if row.output_ids:
            counts.index_add_(0, torch.tensor(row.output_ids, device=self.device),
                              torch.ones(len(row.output_ids), dtype=torch.int32, device=self.device))
        return LogitState(bias, seen, counts)

    def _count(self, ids: torch.Tensor, rows: list[SamplingRow], at: list[int]) -> None:
        """Add the sampled tokens to the rows' penalty state, with one update for all rows."""
        seen = torch.stack([r.logit_state.seen for r in rows])
        counts = torch.stack([r.logit_state.counts for r in rows])
        chosen = ids[at][:, None]
        seen.scatter_(1, chosen, True)
        counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.int32))
        for r, s, c in zip(rows, seen, counts):  # rebinds views: no device work per row
            r.logit_state.seen, r.logit_state.counts = s, c

    # ---- temperature, min-p, top-k, top-p, then the race ---------------------------
    def _race(self, logits: torch.Tensor, rows: Sequence[SamplingRow], params: list[SamplingParams]) -> torch.Tensor:
        # one host -> device copy; float64 holds the 32-bit seed halves exactly
        knobs = torch.tensor([(p.temperature or 1.0, p.min_p, p.top_p, p.top_k if 0 < p.top_k < self.V else self.V,
                               p.greedy, r.seed & _MASK32, r.seed >> 32, len(r.output_ids))
                              for p, r in zip(params, rows)], dtype=torch.float64, device=self.device)
        temp, min_p, top_p, _, greedy = knobs[:, :5].float().unbind(1)
        keys = knobs[:, 5:].long()
        x = logits / temp[:, None]
        if any(p.min_p > 0 for p in params):
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            x = _top_k_top_p(x, knobs[:, 3].long(), top_p)
        elif any(0 < p.top_k < self.V for p in params):
            x = _top_k(x, knobs[:, 3].long(), max(p.top_k for p in params if 0 < p.top_k < self.V))
        race = self._race_pick(torch.softmax(x, dim=-1), keys, self._token_keys)
        return torch.where(greedy.bool(), logits.argmax(dim=-1), race)

    # ---- one device -> host copy ---------------------------------------------------
    def _to_host(self, ids: torch.Tensor, raw: torch.Tensor, tops: list[int]) -> Sampled:
        chosen = raw.gather(1, ids[:, None])
        cols = [ids[:, None].double(), chosen.double()]
        tops = [min(k, self.V) for k in tops]
        n = max(tops)
        if n:
            values, top_ids = raw.topk(n, dim=-1)
            cols += [top_ids.double(), values.double()]
        host = torch.cat(cols, dim=1).tolist()  # one sync (it releases the GIL while it waits)
        ids_h = [int(h[0]) for h in host]
        top = [list(zip(map(int, h[2:2 + k]), h[2 + n:2 + n + k])) if k else None for h, k in zip(host, tops)]
        return Sampled(ids_h, [h[1] for h in host], top)


def _race_pick(probs: torch.Tensor, keys: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) drawn per (seed, step, token) by a counter-based hash: a draw from p."""
    row = _hash32(keys[:, 0] ^ _hash32(keys[:, 1] ^ _hash32(keys[:, 2])))  # keys: seed low, seed high, step
    bits = _hash32(row[:, None] ^ token_keys[None, :])
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1): never log(0)
    return (probs / -torch.log(uniform)).argmax(dim=-1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply) in int64: multipliers < 2**31 keep products exact."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def _top_k(x: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    kth = x.topk(k_max, dim=-1).values.gather(1, (k.clamp(max=k_max) - 1)[:, None])
    return x.masked_fill((x < kth) & (k[:, None] < x.shape[1]), float("-inf"))


def _top_k_top_p(x: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best, then the smallest prefix whose mass reaches top_p (at least one token).
    A sort: on the H200 it beats the sort-free cuts (benchmarks/top_p_cut.py)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(x.shape[1], device=x.device)[None, :]
    sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return torch.empty_like(x).scatter_(1, order, sorted_x.masked_fill(drop, float("-inf")))

